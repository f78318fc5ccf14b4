"""One FLOPs figure per step, everywhere (issue 15).

For every architecture x objective that runs on the embedded-style tiny corpus (every fitting
cell but `prompted`, which needs multitask data) and every parallel layout that runs on this
machine (ZeRO 0 in one process through the real `archscale compare`; ZeRO 2 on 2 processes;
2 pipeline stages on 2 processes), `--dry-run`, `plan`, the loop's metrics.jsonl
(`planned_flops_per_step`) and compare's table print the same planned training FLOPs per step:
the registry's `step_flops`. The loop's exact count (`flops`, attention per packed document)
stays within a band of it, so the planned figure describes what was trained.

The entry points (train, --dry-run, plan, submit, sweep, compare) also refuse the same invalid
configs with the same one line, before writing anything.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from test_trainer import _write_corpus, launch_workers
from train import registry

pytestmark = pytest.mark.slow

CELLS = [f"{a}:{o}" for a, s in registry.ARCHITECTURES.items() for o in s.objectives if o != "prompted"]
LAYOUTS = {  # name -> (processes, overrides)
    "zero0": (1, ["parallel.zero_stage=0"]),
    "zero2": (2, ["parallel.zero_stage=2"]),
    "pipe": (2, ["parallel.zero_stage=1", "parallel.pipeline_stages=2", "parallel.gradient_accumulation_steps=2"]),
}
SEQ, MICRO, STEPS = 128, 2, 2


def _pipelines(cell: str) -> bool:
    """Whether the cell's entry can be split into pipeline stages (eds cannot: its registry entry's
    pipeline_refusal says why, and the trainer refuses it in one line)."""
    from train.config import load_config

    spec = registry.get(cell.split(":")[0])
    model = load_config(None, [f"model.arch={spec.name}", "objective.name=plm"]).model
    return not spec.pipeline_refusal(spec.make_config(model))


LAYOUT_CELLS = {name: [c for c in CELLS if name != "pipe" or _pipelines(c)] for name in LAYOUTS}


def _data(work: Path) -> list[str]:
    """Overrides of every run here: the tiny corpus, byte tokenizer, 2 steps, loss every step."""
    return ["data.source=files", f"data.train_files={json.dumps([str(work / 'corpus' / '*.txt')])}",
            "data.tokenizer=builtin-bytes", f"data.cache_dir={work / 'cache'}", "data.eval_fraction=0.1",
            "logging.progress_bar=false", "checkpoint.keep_last=0", "schedule.train_tokens=null",
            f"schedule.max_steps={STEPS}",
            "logging.every_n_steps=1"]


COMPARE = dict(size="debug", seq_len=SEQ, micro_batch=MICRO, budget=f"steps={STEPS}", eval_every=0, eval_batches=1,
               checkpoint_every=1000)  # the budget in steps: compare refuses a schedule that misses its budget


def _compare_args(work: Path) -> list[str]:
    """`archscale compare` arguments for a 2-step run per cell on the tiny corpus."""
    return [a for k, v in COMPARE.items() for a in (f"--{k.replace('_', '-')}", str(v))] + ["--set", *_data(work)]


def _cell_overrides(cell: str, out: Path, work: Path) -> list[str]:
    """The overrides compare gives `cell` (its lengths per objective), as in compare itself."""
    import argparse

    from train.commands.compare import CompareArgs, cell_overrides

    args = CompareArgs.from_namespace(argparse.Namespace(out=str(out), set=_data(work), cells=[cell], **COMPARE))
    return cell_overrides(cell, args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(cell, layout): run directory}: compare in this process (ZeRO 0, world 1), then one
    2-process launch with every cell under ZeRO 2 and under 2 pipeline stages."""
    from train.commands.compare import main as compare_main
    from train.engine.runtime import teardown_distributed

    work = tmp_path_factory.mktemp("flops")
    _write_corpus(work / "corpus")
    env = dict(os.environ)
    try:
        assert compare_main(["--out", str(work / "zero0"), "--cells", *CELLS, *_compare_args(work)]) == 0
    finally:
        teardown_distributed()  # a world of one: its port and variables must not reach the launch below
        os.environ.clear()
        os.environ.update(env)
    out = {(c, "zero0"): work / "zero0" / c.replace(":", "-") / "seed-0" for c in CELLS}
    spec = []
    for name in ("zero2", "pipe"):
        for c in LAYOUT_CELLS[name]:
            ov = _cell_overrides(c, work / name, work) + LAYOUTS[name][1]
            spec.append({"overrides": ov, "result": True})
            out[(c, name)] = work / name / c.replace(":", "-") / "seed-0"
    launch_workers(work, spec)
    return out


def _config(run_dir: Path):
    from train.config import load_config

    return load_config(run_dir / "config.yaml")


CASES = [(c, lay) for lay in LAYOUTS for c in LAYOUT_CELLS[lay]]


@pytest.mark.parametrize("cell,layout", CASES, ids=[f"{c}-{lay}" for c, lay in CASES])
def test_dry_run_plan_loop_and_compare_report_one_flops_per_step(cell, layout, runs, capsys):
    from train.commands.comparison import cell_table
    from train.commands.dryrun import describe
    from train.commands.plan import plan_config

    run_dir = runs[(cell, layout)]
    cfg = _config(run_dir)
    world = LAYOUTS[layout][0]
    spec = registry.get(cfg.model.arch)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    loop = {r["planned_flops_per_step"] for r in steps}
    assert len(loop) == 1  # one figure for the whole run
    loop = loop.pop()

    text = describe(cfg, {}, world)
    vocab = int(re.search(r"vocab (\d+) \(tokenizer builtin-bytes\)", text)[1])
    m = re.search(r"x (\d+) rows = (\S+) per step\)", text)
    dry = float(m[2])
    planned = plan_config(cfg, gpus=world, vocab=vocab, fix=False)["time"]["flops_per_step"]
    result = json.loads((run_dir / "result.json").read_text())
    lines = cell_table([{"name": cell.upper(), "runs": [{**result, "seed": 0}]}]).splitlines()
    head, row = ([c.strip() for c in line.strip("|").split("|")] for line in (lines[0], lines[2]))
    compared = float(row[head.index("planned FLOPs/step")])

    want = spec.step_flops(spec.make_config(cfg.model, vocab), cfg.objective, int(m[1]))
    assert want > 0
    assert loop == pytest.approx(want, rel=1e-12)  # the loop computes it: exact
    assert planned == pytest.approx(want, rel=1e-12)
    assert dry == pytest.approx(want, rel=1e-3) and compared == pytest.approx(want, rel=1e-3)  # printed, 4 digits
    assert result["planned_flops_per_step"] == loop
    # what the loop counted exactly (attention per packed document, real split points) is close
    exact = steps[-1]["flops"] / STEPS
    assert 0.5 < exact / want < 1.5, (exact, want)


BAD_CONFIGS = [  # (overrides, compare's cell, the one line)
    (["model.arch=ed"], "ed:flm", "objective 'flm' does not fit arch 'ed'"),
    (["parallel.pipeline_stages=2", "parallel.zero_stage=2"], "cd:flm", "ZeRO stage 2 with parallel.pipeline_stages=2"),
    (["model.compile=true", "parallel.zero_stage=3"], "cd:flm", "model.compile=true with ZeRO-3"),
]
# Not here: parallel.pipeline_stages above the model's layer count. `submit` checks the config
# without model_zoo (a login node never imports torch), so it cannot count layers and reports the
# world size instead; the job refuses it at start-up (train's check).


def _entry_points(tmp: Path, overrides: list[str], cell: str, grid: Path) -> dict[str, list[str]]:
    (grid.parent / "base.yaml").write_text("{}\n")
    grid.write_text(f"config: base.yaml\ndir: {tmp / 'sweep'}\noverrides: {json.dumps(overrides)}\n"
                    f"grid: {{seed: [0]}}\n")
    return {
        "sweep": ["sweep", str(grid), "--dry-run"],
        "train": ["train", f"run_dir={tmp / 'run'}", *overrides],
        "dry run": ["train", f"run_dir={tmp / 'run'}", *overrides, "--dry-run"],
        "plan": ["plan", *overrides],
        "submit": ["submit", "--dry-run", "--run-dir", str(tmp / "run"), *overrides],
        "compare": ["compare", "--cells", cell, "--out", str(tmp / "compare-out"),
                    *(["--set", *overrides] if cell == "cd:flm" else [])],
    }


@pytest.mark.parametrize("overrides,cell,line", BAD_CONFIGS, ids=["ed-flm", "zero2-pipeline", "compile-zero3"])
def test_every_entry_point_refuses_a_bad_config_with_one_line(overrides, cell, line, tmp_path, monkeypatch, capsys,
                                                             tmp_path_factory):
    from train.cli import main
    from train.engine.runtime import teardown_distributed

    monkeypatch.chdir(tmp_path)
    env = dict(os.environ)
    errors = {}
    grid = tmp_path_factory.mktemp("grid") / "grid.yaml"  # the sweep's grid file, outside tmp_path
    for name, argv in _entry_points(tmp_path, overrides, cell, grid).items():
        try:
            rc = main(argv)
        finally:  # train sets up a world of one before its checks: no port or variable may leak
            teardown_distributed()
            os.environ.clear()
            os.environ.update(env)
        errors[name] = (rc, [e for e in capsys.readouterr().err.strip().splitlines() if e])
    for name, (rc, err) in errors.items():
        assert rc != 0 and len(err) == 1 and line in err[0], (name, rc, err)
    assert not list(tmp_path.iterdir())  # nothing written
