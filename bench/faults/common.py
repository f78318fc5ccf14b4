"""What every part of the fault campaign shares: a tiny corpus, the tiny run's overrides, the real
CLI as a subprocess, hashes of every file of a tree, and the row of the summary table.

Every run is on the CPU, one thread, with the byte tokenizer over a synthetic corpus written here:
no download, no GPU, seconds per run.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

ROOT = Path(__file__).resolve().parents[2]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")
PAUSE_ENV = "ARCHSCALE_TEST_SAVE_PAUSE"  # train/trainer/checkpointing.py: a pause between save phases
DELAY_ENV = "ARCHSCALE_TEST_SAVE_DELAY"  # train/trainer/callbacks.py: a sleep after the engine files


@dataclass
class Row:
    """One line of the summary table: an item of issue 19, how many cases were tried and passed."""

    item: str
    tried: int = 0
    passed: int = 0
    failures: list = field(default_factory=list)  # "case: what went wrong"
    notes: str = ""  # what was fixed / how it was run
    skipped: str = ""  # a one-line reason when the item could not run here

    def case(self, name: str, ok: bool, why: str = "") -> bool:
        self.tried += 1
        self.passed += bool(ok)
        if not ok:
            self.failures.append(f"{name}: {why}")
        return ok

    @property
    def ok(self) -> bool:
        return not self.skipped and self.tried > 0 and self.passed == self.tried


def format_table(rows: list[Row]) -> str:
    lines = ["| item | tried | passed | notes |", "|---|---:|---:|---|"]
    for r in rows:
        note = f"skipped: {r.skipped}" if r.skipped else r.notes
        lines.append(f"| {r.item} | {r.tried} | {r.passed} | {note} |")
    for r in rows:
        lines += [f"FAILED {r.item}: {f}" for f in r.failures]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- the tiny run
def write_corpus(d: Path, n_docs: int = 24, seed: int = 0) -> None:
    """Short synthetic documents from a small vocabulary (tests/test_trainer.py's corpus)."""
    r = random.Random(seed)
    words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 8))) for _ in range(150)]
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(" ".join(r.choice(words) for _ in range(r.randint(4, 14))).capitalize() + "."
                        for _ in range(r.randint(10, 30)))
        (d / f"doc{i:03d}.txt").write_text(text + "\n")


def base_overrides(work: Path, corpus: Optional[Path] = None) -> list[str]:
    """Tiny data, the debug model, 64-token rows, every step logged, no progress bar."""
    corpus = corpus or work / "corpus"
    return ["data.source=files", f"data.train_files={json.dumps([str(corpus / '*.txt')])}",
            "data.tokenizer=builtin-bytes", f"data.cache_dir={work / 'cache'}", "data.eval_fraction=0.1",
            "model.size=debug", "objective.seq_length=64", "parallel.micro_batch_size=2",
            "optim.lr=3e-3", "schedule.name=constant", "logging.every_n_steps=1", "logging.progress_bar=false",
            "logging.tensorboard=false", "eval.num_batches=1", "eval.every_n_steps=0", "checkpoint.keep_last=0"]


def run_overrides(work: Path, run_dir: Path, steps: int, every: int = 3) -> list[str]:
    """The campaign's run: ND:PLM, ZeRO-1 (sharded optimizer files), accumulation 2, a checkpoint
    every `every` steps (keep 2, so pruning runs), a held-out loss every 4 steps."""
    return base_overrides(work) + [f"run_dir={run_dir}", "model.arch=nd", "objective.name=plm",
                                   "parallel.zero_stage=1", "parallel.gradient_accumulation_steps=2",
                                   f"schedule.max_steps={steps}", f"checkpoint.every_n_steps={every}",
                                   "checkpoint.keep_last=2", "eval.every_n_steps=4"]


def setup(work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "corpus").is_dir():
        write_corpus(work / "corpus")
    (work / "tmp").mkdir(exist_ok=True)
    return work


def env(work: Path, **extra) -> dict:
    """CPU, one thread, TMPDIR inside `work`, no rendezvous variables, no test hooks unless given."""
    e = {k: v for k, v in os.environ.items() if k not in DIST_ENV and k not in (PAUSE_ENV, DELAY_ENV)}
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TMPDIR=str(work / "tmp"),
             PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH")) if p))
    e.update({k: str(v) for k, v in extra.items()})
    return e


def cli() -> list[str]:
    """The installed `archscale` entry point beside this Python (the real CLI), else `python -m train`."""
    exe = Path(sys.executable).with_name("archscale")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "train"]


def run_cli(args: list[str], work: Path, timeout: float = 300, **extra) -> subprocess.CompletedProcess:
    """The CLI as a subprocess. One that runs past `timeout` (killed) comes back with exit status 124 and a
    last stderr line saying so: a failed case, not a traceback that ends the campaign (a loaded machine
    once took over 300 s for one case, 2026-12-06)."""
    try:
        return subprocess.run(cli() + args, cwd=work, env=env(work, **extra), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        return subprocess.CompletedProcess(e.cmd, 124, out, f"{err}\nbench.faults: timed out after {timeout:.0f} s "
                                                            f"(killed; the machine's load?)")


def launch(args: list[str], work: Path, **extra) -> subprocess.Popen:
    """The CLI in a session of its own (a SIGKILL of the group leaves nothing behind)."""
    return subprocess.Popen(cli() + args, cwd=work, env=env(work, **extra), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    p.wait(timeout=60)


def wait_for(p: subprocess.Popen, cond: Callable[[], bool], timeout: float = 180.0) -> bool:
    """Poll `cond` until it holds (True) or the process ends / the time is up (False)."""
    end = time.monotonic() + timeout
    while not cond():
        if p.poll() is not None or time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def logged_step(run_dir: Path) -> int:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return 0
    steps = [0]
    for line in text.splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            pass
    return max(steps)


# ---------------------------------------------------------------------------------- comparisons
def hashes(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of every file under `paths` (files or trees; the lock file's content excluded)."""
    out: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def diff_hashes(before: dict, after: dict) -> list[str]:
    changed = [f"changed {k}" for k in before if k in after and before[k] != after[k]]
    return changed + [f"deleted {k}" for k in before if k not in after] + [f"new {k}" for k in after if k not in before]


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def fp32_weights(step_dir: Path) -> dict:
    """The checkpoint's fp32 weights (zero_to_fp32's progress lines silenced)."""
    import contextlib
    import io

    from train.trainer.weights import engine_weights

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return engine_weights(Path(step_dir))


def same_run(ref: Path, run: Path, steps: int) -> str:
    """'' when `run` ended as `ref` did: final weights bitwise, every logged loss bitwise and once,
    the same counters and data position; else what differs."""
    import torch

    final = f"checkpoints/step-{steps:08d}"
    if not (run / final / "COMPLETE").is_file():
        return f"no complete {final}"
    a, b = fp32_weights(ref / final), fp32_weights(run / final)
    if a.keys() != b.keys() or not a:
        return "different weight keys"
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    if bad:
        return f"weights differ: {bad[:3]}"
    if logged_steps(run) != list(range(1, steps + 1)):
        return f"logged steps {logged_steps(run)}"
    if losses(ref) != losses(run):
        return "losses differ"
    sa, sb = (json.loads((d / final / "trainer_state.json").read_text()) for d in (ref, run))
    diff = [k for k in ("step", "tokens_seen", "target_tokens", "flops", "data_position") if sa[k] != sb[k]]
    return f"trainer state differs: {diff}" if diff else ""


def one_error_line(p: subprocess.CompletedProcess, expect: str = "") -> str:
    """'' when the process failed as the house asks: non-zero exit, no traceback, exactly one
    `error:` line on stderr (containing `expect`); else what is wrong."""
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    if p.returncode == 0:
        return "exit 0"
    if "Traceback" in p.stderr or "Traceback" in p.stdout:
        return f"traceback: {p.stderr.strip().splitlines()[-1][:300] if p.stderr.strip() else ''}"
    if len(errors) != 1:
        return f"{len(errors)} error lines: {p.stderr.strip()[-300:]!r}"
    if expect and expect.lower() not in errors[0].lower():
        return f"message lacks {expect!r}: {errors[0][:300]}"
    return ""
