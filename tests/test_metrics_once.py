"""Metrics written once (issue 32, item 3): a resume keeps metrics.jsonl exactly as an
uninterrupted run writes it, whatever phase the kill hit.

The case of the issue: a run killed after its last checkpoint and its final evaluation's line,
before FINISHED, then resumed, logged the final held-out / yardstick line twice. The same state
comes from finishing a run, deleting its FINISHED and running the same command again (in this
process), and from a SIGKILL inside the final evaluation (the ARCHSCALE_TEST_FINAL_EVAL_PAUSE hook
of train/trainer/callbacks.py holds the run there). The rule itself (trim_jsonl) is checked on
lines written here.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = 4  # checkpoints at 3 and 4 (the tail), held-out lines at 2 and 4 (the final evaluation)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from bench.faults.common import setup

    return setup(tmp_path_factory.mktemp("metrics-once"))


@pytest.fixture(scope="module")
def inproc():
    from rehearse import inprocess  # rehearse imports tests/test_trainer.py: import it when the fixture runs

    with inprocess():
        yield


def overrides(work: Path, run_dir: Path) -> list[str]:
    """The issue's run (ND:PLM, ZeRO-1, byte tokenizer, debug model), 4 steps."""
    from bench.faults.common import run_overrides

    return run_overrides(work, run_dir, STEPS, every=3) + ["eval.every_n_steps=2"]


def run_inproc(ov: list[str]):
    from train.config import load_config
    from train.trainer.loop import train

    return train(load_config(None, ov))


def comparable(run_dir: Path) -> list[tuple]:
    """(step, kind, the line without what measures the machine: throughput, memory) of every line."""
    from bench.faults.kills import metric_lines

    return metric_lines(run_dir)


@pytest.fixture(scope="module")
def uninterrupted(work, inproc) -> Path:
    run = work / "uninterrupted"
    run_inproc(overrides(work, run))
    return run


def test_trim_keeps_what_an_uninterrupted_run_had_written_at_the_checkpoint(tmp_path):
    from train.trainer.callbacks import trim_jsonl

    def write(recs, tail=""):
        (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)

    def kept():
        return [(r["step"], "eval" if "eval_loss" in r else "train")
                for r in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines())]

    recs = [{"step": 3, "loss": 1.0}, {"step": 4, "loss": 0.9}, {"step": 4, "eval_loss": 1.1, "yardstick_nats": 2.0},
            {"step": 5, "loss": 0.8}]
    write(recs, '{"step": 6, "lo')  # a line a kill cut short
    trim_jsonl(tmp_path / "m.jsonl", 4)  # a checkpoint of step 4 mid-run: its lines were written before it
    assert kept() == [(3, "train"), (4, "train"), (4, "eval")]
    write(recs)
    trim_jsonl(tmp_path / "m.jsonl", 4, final=True)  # the last step: its final evaluation comes again
    assert kept() == [(3, "train"), (4, "train")]
    write([{"step": 0, "eval_loss": 1.5}])
    trim_jsonl(tmp_path / "m.jsonl", 0, final=True)  # a 0-step run evaluates at step 0
    assert kept() == []
    trim_jsonl(tmp_path / "absent.jsonl", 3)  # nothing to trim
    assert not (tmp_path / "absent.jsonl").exists()


def test_rerun_without_FINISHED_logs_the_final_evaluation_once(work, inproc, uninterrupted):
    """The issue's deterministic reproduction: finish, delete FINISHED, run the same command."""
    run = work / "rerun"
    shutil.copytree(uninterrupted, run)
    ov = overrides(work, run)
    (run / "FINISHED").unlink()
    before = (run / "metrics.jsonl").read_text()
    result = run_inproc(ov)
    assert result.step == STEPS and result.losses == [] and result.eval_loss is not None  # resumed at the end
    assert (run / "FINISHED").is_file()
    kinds = [(s, k) for s, k, _ in comparable(run)]
    assert len(kinds) == len(set(kinds)), kinds
    assert (run / "metrics.jsonl").read_text() == before  # the final line rewritten bitwise
    assert comparable(run) == comparable(uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["before its line", "after its line"])
def test_sigkill_inside_the_final_evaluation_then_resume_logs_each_line_once(work, inproc, uninterrupted, phase):
    """A real `archscale train` held inside its final evaluation by the test hook, SIGKILLed there
    (after the last checkpoint, before FINISHED), resumed: each (step, kind) once, as uninterrupted."""
    from bench.faults.common import kill_group, launch, wait_for
    from train.trainer.callbacks import FINAL_EVAL_PAUSE_ENV

    run = work / f"killed-{phase.split()[0]}"
    shutil.rmtree(run, ignore_errors=True)
    ov = overrides(work, run)
    final = run / "checkpoints" / f"step-{STEPS:08d}"

    def there() -> bool:
        latest = run / "checkpoints" / "latest"
        if not latest.is_file() or latest.read_text().strip() != final.name or not (run / "metrics.jsonl").is_file():
            return False  # the last save is not over yet
        logged = any(r["step"] == STEPS and "eval_loss" in r
                     for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()[-1:]))
        return logged == (phase == "after its line")

    p = launch(["train", *ov], work, **{FINAL_EVAL_PAUSE_ENV: 4})
    assert wait_for(p, there, 300), f"the run ended (rc {p.poll()}) before the kill point: {p.stdout.read()[-2000:]}"
    time.sleep(1.0 if phase == "before its line" else 0.0)  # past the save's pruning, inside the 4 s pause
    kill_group(p)
    assert not (run / "FINISHED").exists()
    result = run_inproc(ov)
    assert result.step == STEPS and (run / "FINISHED").is_file()
    kinds = [(s, k) for s, k, _ in comparable(run)]
    assert len(kinds) == len(set(kinds)), kinds
    assert comparable(run) == comparable(uninterrupted)
