"""Shared set-up of the cluster-rehearsal tests (tests/test_pipeline_dp.py, test_offload.py,
test_resume_matrix.py): the tiny corpus and overrides of tests/test_trainer.py, launches of
tests/workers/resume_worker.py on N processes, in-process runs, and readers of a run directory.

Every multi-process launch uses one thread per process and TMPDIR inside the test's directory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from test_trainer import _write_corpus, base_overrides, clean_env  # noqa: F401  (the same tiny corpus and overrides; clean_env for launches)
from test_trainer import _env as env  # noqa: F401  (a launched process's environment)

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "resume_worker.py"

CELLS = {
    "cd": ["model.arch=cd", "objective.name=flm"],
    "nd": ["model.arch=nd", "objective.name=plm"],
    "ed": ["model.arch=ed", "objective.name=mlm", "objective.inputs_length=64", "objective.targets_length=14"],
}


def make_work(tmp_path_factory, name: str) -> Path:
    w = tmp_path_factory.mktemp(name)
    _write_corpus(w / "corpus")
    (w / "tmp").mkdir()
    return w


def launch(work: Path, nproc: int, spec: list[dict], name: str, timeout: int = 900) -> list[dict]:
    """Run `spec` (see tests/workers/resume_worker.py) in one torchrun launch of `nproc`
    processes; returns the worker's per-run timings."""
    path = work / f"{name}.json"
    path.write_text(json.dumps(spec))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        str(WORKER), str(path)], cwd=work, env=env(work), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    times = [json.loads(line) for line in Path(str(path) + ".times").read_text().splitlines()]
    print(f"{name}: {nproc}-process launch {time.perf_counter() - t:.1f}s; runs: "
          + ", ".join(f"{Path(r['run_dir']).name} {r['seconds']}s" for r in times))
    return times


@contextmanager
def inprocess():
    """train() in this process (one thread); afterwards the process group and the environment
    are put back as they were."""
    saved, threads = dict(os.environ), torch.get_num_threads()
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    torch.set_num_threads(1)
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if not had_group and torch.distributed.is_initialized():
            from train.engine.runtime import teardown_distributed

            teardown_distributed()
        os.environ.clear()
        os.environ.update(saved)


def run_inproc(overrides: list[str], **kw):
    from train.config import load_config
    from train.trainer.loop import train

    with inprocess():
        return train(load_config(None, overrides), **kw)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train loss; a step logged twice (a resume repeating it) keeps its last value."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def state(run_dir: Path) -> dict:
    ckpts = Path(run_dir) / "checkpoints"
    return json.loads((ckpts / (ckpts / "latest").read_text().strip() / "trainer_state.json").read_text())


def max_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) for s in steps)
