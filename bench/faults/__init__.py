"""The fault and bad-input campaign (issue 19): kill -9 anywhere, SIGUSR1 / SIGTERM, Slurm requeue
by time limit, a full disk, malicious files and bad inputs, each through the real CLI on a tiny CPU
run, with nothing lost.

    python -m bench.faults                      # everything, full size (~15 min on 2 cores)
    python -m bench.faults --only kills inputs  # some parts: security inputs kills signals disk requeue
    python -m bench.faults --quick              # CI size (what tests/test_faults.py runs)
    python -m bench.faults --work DIR --json out.json

Prints one line per case as it runs, then the summary table (item, tried, passed, notes) that
docs/reliability.md records; exits 1 if any case failed. Parts: security.py, inputs.py, kills.py
(kills and signals), disk.py, requeue.py; common.py holds the harness.
"""
from __future__ import annotations

from .common import Row, format_table  # noqa: F401

PARTS = ("security", "inputs", "kills", "signals", "disk", "requeue")


def run_parts(work, parts=PARTS, quick: bool = False, kills: int = 20, log=print,
              cases: list[str] | None = None) -> list[Row]:
    """`cases`: only these bad-input cases (names as printed; default all)."""
    from .common import setup

    setup(work)
    rows = []
    for part in parts:
        log(f"== {part}")
        try:
            rows.append(_part(part, work, quick, kills, log, cases))
        except Exception as e:  # the part itself broke (e.g. the local Slurm controller went away): a failed
            row = Row(f"{part}: the part did not finish")  # row with the reason; the other parts still report
            row.case(part, False, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            log(f"  FAIL {part}: {row.failures[-1] if row.failures else e}")
            rows.append(row)
    return rows


def _part(part: str, work, quick: bool, kills: int, log, cases=None) -> Row:
    if part == "security":
        from .security import security

        return security(work, log=log)
    if part == "inputs":
        from .inputs import bad_inputs

        return bad_inputs(work, cases, log=log)
    if part == "kills":
        from .kills import kill_campaign

        if quick:
            return kill_campaign(work, kills=4, in_save=2, at_start=1, steps=12, log=log)
        return kill_campaign(work, kills=kills, in_save=max(5, kills // 3), at_start=3, steps=2 * kills + 8, log=log)
    if part == "signals":
        from .kills import signal_campaign

        return signal_campaign(work, log=log)
    if part == "disk":
        from .disk import disk_full

        return disk_full(work, log=log)
    from .requeue import requeue_campaign

    return requeue_campaign(work, log=log)
