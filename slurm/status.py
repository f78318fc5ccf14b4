"""What is running, pending, done or failed, and the last step of each run: from the run
directories (FINISHED marker, checkpoints/latest, metrics.jsonl, slurm/submissions.jsonl) and
the scheduler (squeue, then scontrol show job, then sacct)."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

from . import cluster
from .render import FINISHED
from .submit import submissions

# scheduler state -> the word status prints
_STATES = {
    "PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
    "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running",
    "STAGE_OUT": "running", "SIGNALING": "running", "RESIZING": "running",
    "COMPLETED": "completed", "CANCELLED": "cancelled", "TIMEOUT": "failed", "FAILED": "failed",
    "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed", "DEADLINE": "failed",
    "PREEMPTED": "pending",
}


@dataclasses.dataclass
class RunStatus:
    name: str
    run_dir: pathlib.Path
    state: str  # done | running | pending | completed | failed | cancelled | not submitted | unknown
    job_id: str | None
    slurm_state: str | None  # the scheduler's own word, e.g. TIMEOUT
    detail: str  # reason / exit code
    step: int | None  # the last step: newest complete checkpoint, or newest metrics line

    def line(self) -> str:
        step = "-" if self.step is None else str(self.step)
        slurm = f"{self.slurm_state} {self.detail}".strip() if self.slurm_state else ""
        return f"{self.name:<28} {self.state:<13} {step:>8}  {self.job_id or '-':<12} {slurm}"


def last_step(run_dir) -> int | None:
    run_dir = pathlib.Path(run_dir)
    latest = run_dir / "checkpoints" / "latest"
    if latest.exists():
        m = re.search(r"(\d+)", latest.read_text())
        if m:
            return int(m.group(1))
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        lines = metrics.read_bytes()[-65536:].decode(errors="replace").splitlines()
        for line in reversed(lines):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
    return None


def _runs(path: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    manifest = path / "sweep.json"
    if manifest.exists():
        cells = json.loads(manifest.read_text())["cells"]
        return [(c["name"], pathlib.Path(c["run_dir"])) for c in cells]
    return [(path.name, path)]


def status(path) -> list[RunStatus]:
    """One RunStatus per run: a run directory, or every cell of a sweep directory."""
    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise cluster.SlurmError(f"{path} is not a directory")
    runs = _runs(path)
    jobs = {}
    for name, run_dir in runs:
        subs = submissions(run_dir)
        jobs[name] = subs[-1]["job_id"] if subs else None
    states = {}
    wanted = [j for j in jobs.values() if j]
    if wanted:
        try:
            states = cluster.job_states(wanted)
        except cluster.SlurmError:  # no scheduler here: the run directories still tell a lot
            states = {}
    out = []
    for name, run_dir in runs:
        jid = jobs[name]
        slurm_state, detail = states.get(jid, (None, "")) if jid else (None, "")
        if (run_dir / FINISHED).exists():
            state = "done"
        elif slurm_state:
            state = _STATES.get(slurm_state.split()[0].rstrip("+"), slurm_state.lower())
        else:
            state = "unknown" if jid else "not submitted"
        out.append(RunStatus(name, run_dir, state, jid, slurm_state, detail, last_step(run_dir)))
    return out


def format_status(rows: list[RunStatus]) -> str:
    head = f"{'run':<28} {'state':<13} {'step':>8}  {'job':<12} slurm"
    counts = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return "\n".join([head, *(r.line() for r in rows), f"{len(rows)} run(s): {summary}"])
