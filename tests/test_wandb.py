"""Weights & Biases logging (issue 31 item 2; train/trainer/wandb_log.py), with the real wandb in
offline mode (WANDB_MODE=offline, WANDB_DIR in the test's directory: no network). The offline run
files (RUN-ID.wandb) are read back record by record (`wandb_records`: the leveldb-style log wandb
writes, each record a wandb_internal_pb2.Record) and checked against config.yaml and metrics.jsonl.
"""
from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytest.importorskip("wandb")  # in archscale[test] (requirements/cpu.lock); off the suite only outside it

MACHINE = {"tokens_per_s", "mfu", "planned_peak_gib", "measured_peak_gib", "startup_rss_gib"}  # measure the machine


def wandb_records(path: Path):
    """The records of an offline run file: a 7-byte header (":W&B", magic 0xBEE1, version), then
    32 KiB blocks of chunks, each [crc32 u32, length u16, type u8] + data (type 1 = a whole record,
    2 / 3 / 4 = its first / middle / last part; a block's tail under 7 bytes is zero padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def offline_runs(wandb_dir: Path) -> list[dict]:
    """Every offline run under `wandb_dir`, oldest first: its id, group, name, tags, config and history rows."""
    out = []
    for d in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        run = {"rows": []}
        for rec in wandb_records(next(d.glob("run-*.wandb"))):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                r = rec.run
                run.update(start=r.start_time.ToNanoseconds(), id=r.run_id, group=r.run_group, name=r.display_name, tags=list(r.tags), project=r.project,
                           config={i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                run["rows"].append({".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
        out.append(run)
    return sorted(out, key=lambda r: r["start"])  # directory names hold the second only


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """WANDB_MODE=offline into tmp_path/wb; wandb reads its environment once per process (its
    settings singleton), so it is torn down before and after."""
    import wandb

    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    yield tmp_path / "wb"
    wandb.teardown()


# ---------------------------------------------------------------------------------------- config
def test_off_by_default_and_a_missing_package_is_one_line_before_any_work(monkeypatch):
    import importlib.util

    from train.config import ConfigError, load_config
    from train.trainer.loop import check

    assert load_config(None, []).logging.wandb.enabled is False
    cfg = load_config(None, ["schedule.max_steps=1", "logging.wandb.enabled=true", "logging.wandb.tags=[a,b]"])
    assert cfg.logging.wandb.tags == ["a", "b"]
    check(cfg, 1)  # installed: fine
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ConfigError) as e:
        check(cfg, 1)
    assert "\n" not in str(e.value) and "pip install 'archscale[wandb]'" in str(e.value)
    check(load_config(None, ["schedule.max_steps=1"]), 1)  # off: wandb is not needed


# ---------------------------------------------------------------------------------------- a run
@pytest.mark.slow
def test_config_and_every_jsonl_metric_reach_one_wandb_run_across_resumes(tmp_path, offline):
    """6 steps, held-out lines at 2, 4 and 6, checkpoints at 3 and 5. First start: stopped after
    step 5; its checkpoint is deleted (a kill before it was saved), so the second start resumes
    from 3 and trains 4 and 5 again (trim_jsonl drops their lines), then finishes. A third start of
    the finished run (FINISHED deleted) evaluates step 6 again. W&B: one id, each (step, line) sent
    once, steps rising across the three offline files, every JSONL metric at its step."""
    from rehearse import run_inproc
    from test_trainer import _write_corpus, base_overrides

    _write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    ov = base_overrides(tmp_path) + [f"run_dir={run}", "schedule.max_steps=6", "checkpoint.every_n_steps=3",
                                     "eval.every_n_steps=2", "eval.windows=4", "logging.tensorboard=false",
                                     "logging.wandb.enabled=true", "logging.wandb.project=p",
                                     "logging.wandb.group=g", "logging.wandb.tags=[t1,t2]"]
    run_inproc(ov, max_steps_now=5)
    first_id = json.loads((run / "wandb.json").read_text())["id"]
    shutil.rmtree(run / "checkpoints" / "step-00000005")
    run_inproc(ov)
    (run / "FINISHED").unlink()
    run_inproc(ov)

    runs = offline_runs(offline)
    assert len(runs) == 3 and {r["id"] for r in runs} == {first_id}
    assert json.loads((run / "wandb.json").read_text())["id"] == first_id
    assert {(r["project"], r["group"], r["name"], tuple(r["tags"])) for r in runs} == {("p", "g", "run", ("t1", "t2"))}
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    for r in runs:
        assert {k: r["config"][k] for k in config} == config  # the resolved config, every section
    steps = [row["_step"] for r in runs for row in r["rows"]]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]  # monotonic, each step once, 4-5 not resent
    assert [row["_step"] for row in runs[2]["rows"]] == []  # the rerun's final evaluation: already sent
    rows = {row["_step"]: row for r in runs for row in r["rows"]}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {line["step"] for line in lines if "eval_loss" in line} == {2, 4, 6}
    for line in lines:
        row = rows[line["step"]]
        for k, v in line.items():
            if k in MACHINE:  # the retrained steps 4-5 keep the first start's row: its first line held the memory keys
                assert k in row or line["step"] in (4, 5), (line["step"], k)
            elif k != "step" and v is not None:  # the rest is bitwise the same after a resume
                assert row[k] == pytest.approx(v, rel=1e-12, abs=0), (line["step"], k)


@pytest.mark.slow
def test_resume_never_starts_a_new_wandb_run(tmp_path, offline):
    from rehearse import run_inproc
    from test_trainer import _write_corpus, base_overrides

    _write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    ov = base_overrides(tmp_path) + [f"run_dir={run}", "schedule.max_steps=2", "eval.yardstick=false",
                                     "logging.tensorboard=false", "logging.wandb.enabled=true"]
    run_inproc(ov)
    first = json.loads((run / "wandb.json").read_text())["id"]
    run_inproc(ov + ["checkpoint.resume=never"])
    runs = offline_runs(offline)
    assert [r["id"] for r in runs] == [first, json.loads((run / "wandb.json").read_text())["id"]]
    assert runs[1]["id"] != first and [row["_step"] for row in runs[1]["rows"]] == [1, 2]


# ---------------------------------------------------------------------------------------- groups
def test_compare_sweep_and_ladder_group_their_runs(tmp_path):
    from unittest import mock

    from slurm.render import trainer_command
    from slurm.submit import Sweep, submit_sweep
    from train.commands.compare import CompareArgs, cell_overrides
    from train.commands.compare.cells import parse_cell
    from train.config import load_config

    out = tmp_path / "cmp-1"
    args = CompareArgs(cells=(parse_cell("cd:flm"), parse_cell("nd:plm")), out=str(out), seeds=2)
    w = load_config(None, cell_overrides(args.cells[1], args, seed_index=1)).logging.wandb
    assert (w.group, w.name) == ("cmp-1", "nd-plm/seed-1")
    mine = CompareArgs(cells=args.cells, out=str(out), set=("logging.wandb.group=mine",))
    assert load_config(None, cell_overrides(args.cells[0], mine)).logging.wandb.group == "mine"  # --set wins

    (tmp_path / "base.yaml").write_text("schedule: {max_steps: 10}\n")
    (tmp_path / "grid.yaml").write_text("config: base.yaml\ndir: sw\ngrid:\n  model.arch: [cd, nd]\n")
    sweep = Sweep.from_yaml(tmp_path / "grid.yaml")
    cells = sweep.cells()
    assert sweep.wandb_overrides(cells[1]) == ["logging.wandb.group=sw", "logging.wandb.name=nd"]
    with mock.patch("slurm.submit.trainer_command", side_effect=trainer_command) as command:
        submit_sweep(sweep, dry_run=True)
    assert command.call_args_list[1].args[1] == ["logging.wandb.group=sw", "logging.wandb.name=nd", "model.arch=nd"]
    (tmp_path / "base.yaml").write_text("logging: {wandb: {group: fromyaml}}\n")
    assert sweep.wandb_overrides(cells[1]) == ["logging.wandb.name=nd"]  # the base config's group stays

    from train.commands.ladder.command import parse_args
    from train.commands.ladder.plan import plan_rung

    _, lad = parse_args(["--cells", "cd:flm", "--sizes", "64x2,128x2", "--budgets", "10240,16384", "--budget-unit",
                         "tokens", "--out", str(tmp_path / "lad")])
    runs = [load_config(None, list(r.overrides)).logging.wandb for r in plan_rung(lad, lad.rungs[0]).runs]
    assert {w.group for w in runs} == {"lad"}  # one group per ladder, every rung and run in it
    assert [w.name for w in runs[:3]] == ["64x2/cd-flm/seed-0/stable", "64x2/cd-flm/seed-0/decay-10240",
                                          "64x2/cd-flm/seed-0/decay-16384"]
