"""Slurm requeue by time limit, at least 3 times, on the project's local cluster
(slurm/local_cluster.sh): the real trainer under `archscale submit`'s job script with `--time=2`
and USR1 41 s before it. Each cut: the trainer saves at the next step and exits 0, the script
requeues the job, the next start resumes. The job runs long enough to be cut `cuts` times; the
final weights must equal those of the same run uninterrupted (run beside it, outside Slurm).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from .common import DELAY_ENV, ROOT, Row, env, run_overrides, same_run

SCRIPT = ROOT / "slurm" / "local_cluster.sh"
SAVE_SLEEP = 0.3  # seconds of sleep in each save of the job (callbacks.SAVE_DELAY_ENV)
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _state(job_id: str):
    from slurm import cluster

    state = cluster.job_states([job_id]).get(job_id, (None,))[0]
    word = state.split()[0].rstrip("+") if state else None
    return word if word in ENDED else None


def requeue_campaign(work: Path, cuts: int = 3, log=print) -> Row:
    row = Row(f"Slurm requeue by time limit >= {cuts} times, final weights equal")
    up = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if up.returncode:
        row.skipped = f"slurm/local_cluster.sh start failed: {(up.stderr or up.stdout).strip().splitlines()[-1:]}"
        return row
    conf = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True).stdout.strip()
    os.environ["SLURM_CONF"] = conf.split("=", 1)[1]
    import slurm
    from slurm import Resources

    # The job's pace is set by a sleep in every save (a checkpoint every step, SAVE_DELAY), so that
    # it depends little on the machine's load: a cut every ~50-80 s of a 2-minute limit, and
    # (cuts + 1) x 70 s of steps is cut `cuts` times or more; after the last cut the limit is
    # raised so that the rest ends in one go. The reference runs the same steps without the sleep.
    pace = SAVE_SLEEP + _step_seconds(work)
    steps = int((cuts + 1) * 70 / pace) // 10 * 10
    every = 1
    run, ref = work / "requeued", work / "requeue-ref"
    for d in (run, ref):
        shutil.rmtree(d, ignore_errors=True)
    ov = run_overrides(work, run, steps, every) + ["eval.every_n_steps=0"]
    e = {k: v for k, v in env(work).items() if k in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM",
                                                   "PYTHONPATH", "TMPDIR")}
    e[DELAY_ENV] = str(SAVE_SLEEP)
    sub = slurm.submit(None, [o for o in ov if not o.startswith("run_dir=")], run_dir=run, env=e,
                       resources=Resources(time="2", signal_seconds=41, max_restarts=3 * cuts + 6))
    refp = subprocess.Popen([*_cli(), "train", *run_overrides(work, ref, steps, every), "eval.every_n_steps=0"],
                            cwd=work, env=env(work),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log(f"  job {sub.job_id}: {steps} steps (~{pace:.2f} s each: a checkpoint and a {SAVE_SLEEP} s sleep per step); "
        f"the reference runs beside it")
    end = time.monotonic() + 60 * (3 * cuts + 10)
    state, raised = None, False
    while time.monotonic() < end and state is None:
        time.sleep(2)
        state = _state(sub.job_id)
        text = "".join(p.read_text(errors="replace") for p in (run / "slurm").glob("job-*.out"))
        if not raised and text.count("stopped by SIGUSR1 at step") >= cuts:
            r = subprocess.run(["scontrol", "update", f"JobId={sub.job_id}", "TimeLimit=30"], capture_output=True)
            raised = r.returncode == 0
            log(f"  {cuts} cuts seen; time limit raised to 30 min: {raised}")
    if state is None:
        subprocess.run(["scancel", sub.job_id], capture_output=True)
    refp.wait(timeout=900)
    out = "".join(p.read_text(errors="replace") for p in sorted((run / "slurm").glob("job-*.out")))
    stopped = [int(n) for n in re.findall(r"stopped by SIGUSR1 at step (\d+)", out)]
    requeues = out.count("requeueing (time limit")
    row.case("job completed", state == "COMPLETED", f"state {state}; log tail {out[-600:]!r}")
    row.case(f"cut and requeued by the time limit >= {cuts} times", requeues >= cuts and len(stopped) >= cuts,
             f"{requeues} requeues, stopped at {stopped}")
    why = same_run(ref, run, steps) if state == "COMPLETED" else "not completed"
    row.case("final weights and metrics equal to the uninterrupted run", not why, why)
    log(f"  state {state}; {requeues} requeues (stopped at steps {stopped}); comparison: {why or 'bitwise equal'}")
    row.notes = f"job {sub.job_id}, --time=2, USR1 41 s before; stopped at steps {stopped}, {requeues} requeues"
    return row


def _step_seconds(work: Path) -> float:
    """The median seconds per step of the campaign's 12-step reference run (made if missing)."""
    import json
    import statistics

    from .kills import reference

    recs = [json.loads(line) for line in (reference(work, 12, 2) / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r.get("tokens_per_s")]
    dts = [(b["tokens_seen"] - a["tokens_seen"]) / b["tokens_per_s"] for a, b in zip(recs, recs[1:])]
    return statistics.median(dts) if dts else 0.25


def _cli() -> list[str]:
    from .common import cli

    return cli()
