"""A tiny sweep made with the real trainer (in this process): CD:FLM, ND:MLM from scratch,
NC-A (the CD:FLM checkpoint continued as ND:MLM) and MT-F of the NC-A model (configs/mtf.yaml on a
mixture). Then `archscale eval` over each run's
checkpoints and `archscale report` over the sweep: the NC-A run starts from the CD weights
exactly, its tokens / FLOPs include its parent's, it is flagged as not compute-matched, the
page is self-contained. Also LM-A (MLM -> FLM) weights and a checkpoint of another family refused.

Cost: 5 in-process runs of 4 steps on a byte-tokenized synthetic corpus (no tokenizer
training, nothing from ~/.cache), one thread.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch

STEPS = 4
ROOT = Path(__file__).resolve().parents[1]


def _write_corpus(d: Path, n_docs: int = 16, seed: int = 0) -> None:
    r = random.Random(seed)
    words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 8))) for _ in range(150)]
    d.mkdir(parents=True)
    for i in range(n_docs):
        text = " ".join(" ".join(r.choice(words) for _ in range(r.randint(4, 14))).capitalize() + "."
                        for _ in range(r.randint(10, 30)))
        (d / f"doc{i:03d}.txt").write_text(text + "\n")


def _task_file(path: Path) -> Path:
    recs = [{"input": f"{w} is a", "answer_choices": ["word", "number"], "label": int(w.isdigit()),
             "task": f"kind/{p}"} for p in ("a", "b") for w in ("cat", "12", "dog", "7")]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Runs the sweep once for every test of this module; yields (work dir, {name: run dir})."""
    from train.commands.compare import mlm_lengths
    from train.config import load_config
    from train.data.mixture import build_mixture
    from train.trainer.loop import train

    env, threads = dict(os.environ), torch.get_num_threads()
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    torch.set_num_threads(1)
    os.environ["DS_ACCELERATOR"] = "cpu"
    w = tmp_path_factory.mktemp("report")
    _write_corpus(w / "corpus")
    inputs, targets = mlm_lengths(64)
    base = ["data.source=files", f"data.train_files={json.dumps([str(w / 'corpus' / '*.txt')])}",
            "data.tokenizer=builtin-bytes", f"data.cache_dir={w / 'cache'}", "data.eval_fraction=0.15",
            "model.size=debug", "parallel.micro_batch_size=2", "parallel.zero_stage=1", "optim.lr=3e-3",
            "schedule.name=constant", f"schedule.max_steps={STEPS}", "logging.every_n_steps=1",
            "logging.progress_bar=false", "logging.tensorboard=false", "eval.num_batches=1", "eval.every_n_steps=2",
            "checkpoint.every_n_steps=2", "checkpoint.keep_last=0"]
    mlm = ["objective.name=mlm", f"objective.seq_length={inputs + targets}", f"objective.inputs_length={inputs}",
           f"objective.targets_length={targets}"]
    runs = {"cd-flm": w / "sweep" / "cd-flm", "nd-mlm": w / "sweep" / "nd-mlm", "nca": w / "sweep" / "nd-mlm-nca",
            "mtf": w / "sweep" / "nd-mlm-nca-mtf", "lma": w / "lma"}
    mixture = w / "mixture.jsonl"
    build_mixture([_task_file(w / "kind.jsonl")], mixture, cap=4)  # 4 of the 8 records of each prompt
    cfg = lambda name, extra: load_config(None, base + [f"run_dir={runs[name]}"] + extra)  # noqa: E731
    try:
        train(cfg("cd-flm", ["model.arch=cd", "objective.name=flm", "objective.seq_length=64"]))
        train(cfg("nd-mlm", ["model.arch=nd"] + mlm))
        nca = cfg("nca", ["model.arch=nd", f"init.from_checkpoint={runs['cd-flm']}"] + mlm)
        train(nca, max_steps_now=0)  # the step-0 checkpoint: the weights NC-A starts from
        train(nca)  # resumes from step 0 and finishes
        # MT-F from the NC-A model with the preset (Adafactor: ZeRO-0), at this test's lengths
        train(load_config(ROOT / "configs" / "mtf.yaml", base + [
            f"run_dir={runs['mtf']}", "model.arch=nd", f"init.from_checkpoint={runs['nca']}", "parallel.zero_stage=0",
            "schedule.train_tokens=null", "data.format=multitask", f"data.train_files=[{mixture}]",
            "objective.name=prompted", "objective.seq_length=64", "objective.inputs_length=48",
            "objective.targets_length=16"]))
        train(cfg("lma", ["model.arch=cd", "objective.name=flm", "objective.seq_length=64",
                          f"init.from_checkpoint={runs['nd-mlm']}"]), max_steps_now=0)
        yield w, runs
    finally:
        torch.set_num_threads(threads)
        if not had_group and torch.distributed.is_initialized():
            from train.engine.runtime import teardown_distributed

            teardown_distributed()  # DeepSpeed's cached groups too: later modules run train() again
        os.environ.clear()
        os.environ.update(env)


def _state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())


@pytest.mark.parametrize("child,parent", [("nca", "cd-flm"), ("lma", "nd-mlm")])
def test_adaptation_starts_from_the_parent_weights(sweep, child, parent):
    """NC-A (CD:FLM -> ND:MLM) and LM-A (MLM -> FLM): the adapted run's step-0 weights are the
    parent's final weights, key for key and bit for bit."""
    from train.trainer.weights import engine_weights

    _, runs = sweep
    start = engine_weights(runs[child] / "checkpoints" / "step-00000000")
    final = engine_weights(runs[parent] / "checkpoints" / f"step-{STEPS:08d}")
    assert start.keys() == final.keys()
    for k in final:
        assert torch.equal(start[k], final[k]), k
    assert _state(runs[child], 0)["tokens_seen"] == 0  # the run's own counters start at zero


def test_eval_then_report(sweep, tmp_path, capsys):
    from train.cli import main
    from train.commands.report import report

    w, runs = sweep
    tasks = _task_file(tmp_path / "kind.jsonl")
    for name in ("cd-flm", "nd-mlm", "nca", "mtf"):
        assert main(["eval", str(runs[name]), "--tasks", str(tasks), "--steps", "50%,100%"]) == 0
        res = json.loads((runs[name] / "eval" / f"step-{STEPS:08d}.json").read_text())
        if name == "mtf":  # finetuned on train files only: no held-out split, not an error
            assert res["heldout"]["loss"] is None and "no eval split" in res["heldout"]["corpus"]
            continue
        assert json.loads((runs[name] / "eval" / "step-00000002.json").read_text())["requested"] == "50%"
        # the held-out loss at the last step is the trainer's own final held-out loss
        final = [json.loads(l) for l in (runs[name] / "metrics.jsonl").read_text().splitlines()][-1]
        assert res["heldout"]["loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
        zs = res["zero_shot"]
        assert set(zs["tasks"]) == {"kind/a", "kind/b"} and list(zs["datasets"]) == ["kind"]
        assert zs["mean"]["acc"] == zs["datasets"]["kind"]["acc"]
    capsys.readouterr()

    assert main(["report", str(w / "sweep")]) == 0
    printed = capsys.readouterr().out
    assert "nd-mlm-nca" in printed and "not compute-matched" in printed
    out = w / "sweep" / "report"
    for f in ("report.html", "report.json", "loss.png", "zero_shot.png", "report.md", "yardstick.png"):
        assert (out / f).is_file(), f
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and not re.search(r'src="(?!data:)', page)
    assert "The common yardstick" in page and "continuation loss (nats/token)" in page
    md = (out / "report.md").read_text()
    assert "## Pairwise differences" in md and str(runs["cd-flm"]) in md  # every number names its runs

    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["runs"]}
    assert set(rows) == {"cd-flm", "nd-mlm", "nd-mlm-nca", "nd-mlm-nca-mtf"}
    # pretrain -> adapt -> finetune: three phases, every one's cost in the finetuned model's total
    mtf = rows["nd-mlm-nca-mtf"]
    assert [(p["arch"], p["objective"]) for p in mtf["phases"]] == [("cd", "flm"), ("nd", "mlm")]
    assert mtf["total"]["tokens_seen"] == sum(_state(runs[n], STEPS)["tokens_seen"] for n in ("cd-flm", "nca", "mtf"))
    assert "CD:FLM -&gt; ND:MLM -&gt; ND:PROMPTED" in page and mtf["zero_shot"]["step"] == STEPS
    cd, scratch, nca = rows["cd-flm"], rows["nd-mlm"], rows["nd-mlm-nca"]
    cd_state, nca_state = _state(runs["cd-flm"], STEPS), _state(runs["nca"], STEPS)
    # phases add up: NC-A's totals are its own counters plus the CD run's final ones
    assert [p["checkpoint"] for p in nca["phases"]] == [str(runs["cd-flm"] / "checkpoints" / f"step-{STEPS:08d}")]
    for key in ("tokens_seen", "target_tokens", "flops"):
        assert nca["own"][key] == nca_state[key] and nca["inherited"][key] == cd_state[key]
        assert nca["total"][key] == pytest.approx(nca_state[key] + cd_state[key])
        assert cd["total"][key] == cd_state[key] and not cd["phases"]
    # the adapted model's curve starts where its parent's cost ends
    assert min(t for t, _, _ in nca["loss_curve"]) > cd_state["tokens_seen"]
    # compute matching: NC-A saw its parent's tokens too; the two from-scratch runs saw about the same
    assert "T" in nca["flags"] and "F" in nca["flags"] and mtf["flags"] == "TF"
    assert not cd["flags"] and not scratch["flags"]
    assert abs(scratch["total"]["tokens_seen"] - cd["total"]["tokens_seen"]) <= 0.05 * cd["total"]["tokens_seen"]
    assert cd["params"] == scratch["params"] == nca["params"]  # CD and ND: the same parameters
    assert nca["zero_shot"]["step"] == STEPS and nca["heldout_loss"] is not None
    # adapted vs from scratch: the first NC-A step at which its held-out loss reaches ND:MLM's final one
    c = nca["catch_up"]
    target = [json.loads(l) for l in (runs["nd-mlm"] / "metrics.jsonl").read_text().splitlines()][-1]["eval_loss"]
    lines = (runs["nca"] / "metrics.jsonl").read_text().splitlines()
    evals = [(m["step"], m["eval_loss"]) for m in map(json.loads, lines) if "eval_loss" in m]
    assert (c["reference"], c["target_loss"], c["reference_steps"]) == ("nd-mlm", target, STEPS)
    assert c["steps"] == next((st for st, loss in evals if loss <= target), None)
    assert rows["nd-mlm-nca-mtf"]["catch_up"] is None  # no from-scratch ND:PROMPTED run to compare with

    # a single run directory works too, and a directory without runs is a clear error
    res = report([runs["cd-flm"]], tmp_path / "one")
    assert len(res["rows"]) == 1 and not res["rows"][0]["flags"]
    assert main(["report", str(tmp_path / "one")]) == 2
    assert "no run directory" in capsys.readouterr().err


def test_checkpoint_of_another_family_is_refused(sweep, tmp_path):
    """ED weights cannot start a CD run (and vice versa): one clear error before any training."""
    import model_zoo
    from train.trainer import checkpointing as ckpt
    from train import registry
    from train.trainer.loop import load_init_weights

    _, runs = sweep
    src = runs["cd-flm"] / "checkpoints" / f"step-{STEPS:08d}"
    fake = tmp_path / "ed-run" / "checkpoints" / f"step-{STEPS:08d}"  # an "ED" checkpoint: its config says so
    fake.mkdir(parents=True)
    state = json.loads((src / ckpt.STATE_FILE).read_text())
    state["config"]["model"]["arch"] = "ed"
    (fake / ckpt.STATE_FILE).write_text(json.dumps(state))
    (fake / ckpt.COMPLETE).write_text("{}\n")  # a marker that lists no files (the JSON every save writes)
    with pytest.raises(ValueError, match=r"is a ED checkpoint \(encoder_decoder\); this run's architecture needs "
                                         r"a decoder checkpoint"):
        load_init_weights(model_zoo.build("cd", "debug"), str(fake.parent.parent), registry.get("cd"))
    with pytest.raises(ValueError, match=r"is a CD checkpoint \(decoder\)"):
        load_init_weights(model_zoo.build("ed", "debug"), str(src), registry.get("ed"))


def test_matched_reference_is_the_budget_most_runs_share():
    from train.commands.report import matched_reference

    assert matched_reference([101, 100, 202, 251]) == 100  # two from-scratch runs vs two adapted ones
    assert matched_reference([100, 300, 300]) == 300
    assert matched_reference([100, 200]) == 100  # a tie: the smaller budget
    assert matched_reference([]) == 0


def test_parent_chain_prefers_the_recorded_checkpoint(tmp_path):
    """A run directory in init.from_checkpoint means its newest checkpoint *now*; a checkpoint the
    trainer recorded in trainer_state.json (`init.checkpoint`) wins over it. Chains are followed."""
    from train.trainer import checkpointing as ckpt
    from train.commands.report import parent_phases

    def step(run, n, tokens, config, init=None):
        d = tmp_path / run / "checkpoints" / ckpt.step_dir_name(n)
        d.mkdir(parents=True)
        state = {"step": n, "tokens_seen": tokens, "target_tokens": tokens // 2, "flops": 10.0 * tokens,
                 "config": config, **({"init": {"checkpoint": str(init)}} if init else {})}
        (d / ckpt.STATE_FILE).write_text(json.dumps(state))
        (d / ckpt.COMPLETE).write_text("")
        return d, state

    cd = {"model": {"arch": "cd"}, "objective": {"name": "flm"}}
    early, _ = step("cd", 2, 200, cd)
    step("cd", 4, 400, cd)  # trained on after the child started
    nca_cfg = {"model": {"arch": "nd"}, "objective": {"name": "mlm"}, "init": {"from_checkpoint": str(tmp_path / "cd")}}
    nca, nca_state = step("nca", 3, 300, nca_cfg, init=early)
    assert [(p["step"], p["tokens_seen"]) for p in parent_phases(nca_cfg, nca_state)] == [(2, 200)]
    assert [p["step"] for p in parent_phases(nca_cfg, {})] == [4]  # not recorded: resolved now
    mtf_cfg = {"model": {"arch": "nd"}, "objective": {"name": "prompted"}, "init": {"from_checkpoint": str(nca)}}
    chain = parent_phases(mtf_cfg, {})
    assert [(p["arch"], p["objective"], p["tokens_seen"]) for p in chain] == [("cd", "flm", 200), ("nd", "mlm", 300)]
    with pytest.raises(Exception, match="not a complete checkpoint"):
        parent_phases({"init": {"from_checkpoint": str(tmp_path / "nowhere")}}, {})
