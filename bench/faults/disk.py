"""Disk full: the run directory on a small tmpfs (root mounts one), so that a checkpoint save runs
out of space. The save must fail with one clear line (exit != 0, no traceback), the previous
checkpoint must stay `latest`, verify and load, and once space is back (the tmpfs remounted
larger) the same command must resume and end bitwise equal to an uninterrupted run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .common import Row, fp32_weights, one_error_line, run_cli, run_overrides, same_run
from .kills import reference

STEPS, EVERY = 12, 2
SMALL = "3m"  # one checkpoint of the campaign's run is ~1.8 MB: the second save does not fit


def _mount(d: Path, size: str, remount: bool = False) -> str:
    """'' when mounted; else mount's one-line complaint."""
    opts = f"remount,size={size}" if remount else f"size={size}"
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
    return "" if p.returncode == 0 else (p.stderr.strip().splitlines() or [f"mount exited {p.returncode}"])[0]


def disk_full(work: Path, log=print) -> Row:
    row = Row("disk full (ENOSPC in a save): one line, previous checkpoint intact, resumes")
    mnt = work / "tmpfs"
    shutil.rmtree(mnt, ignore_errors=True)
    mnt.mkdir(parents=True)
    if os.geteuid() != 0:
        row.skipped = "not root: cannot mount a tmpfs"
        return row
    err = _mount(mnt, SMALL)
    if err:
        row.skipped = f"mount -t tmpfs failed: {err}"
        return row
    try:
        _campaign(work, mnt / "run", mnt, row, log)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    row.notes = f"run dir on a {SMALL} tmpfs (one checkpoint ~1.8 MB), then remounted at 64m"
    return row


def _campaign(work: Path, run: Path, mnt: Path, row: Row, log) -> None:
    from train.trainer.checkpointing import newest_checkpoint, read_latest
    from train.trainer.integrity import verify_checkpoint

    ref = reference(work, STEPS, EVERY)
    ov = run_overrides(work, run, STEPS, EVERY)
    p = run_cli(["train", *ov], work)
    why = one_error_line(p, "no space left")
    row.case("the full save fails with one line", not why, why)
    log(f"  {'ok  ' if not why else 'FAIL'} save on a full disk: {why or [l for l in p.stderr.splitlines() if l.startswith('error:')][0][:200]}")
    latest = read_latest(run / "checkpoints")
    why = "" if latest is not None and latest == newest_checkpoint(run / "checkpoints") else f"latest is {latest}"
    if not why:
        try:
            verify_checkpoint(latest)
            why = "" if fp32_weights(latest) else "no weights"
        except Exception as e:  # noqa: BLE001 (reported as the case's failure)
            why = f"{type(e).__name__}: {e}"
    leftovers = [d.name for d in (run / "checkpoints").glob("*.tmp")]
    why = why or (f"a half-written save was left: {leftovers}" if leftovers else "")
    row.case("the previous checkpoint is latest, verifies and loads; no .tmp left", not why, why)
    log(f"  {'ok  ' if not why else 'FAIL'} previous checkpoint {latest.name if latest else None} intact: {why or 'yes'}")
    err = _mount(mnt, "64m", remount=True)
    if err:
        row.case("space back (remount)", False, err)
        return
    p = run_cli(["train", *ov], work)
    why = (f"resume rc {p.returncode}: {p.stderr[-400:]}" if p.returncode else "") or same_run(ref, run, STEPS)
    row.case("resumes once space is back, bitwise equal to the uninterrupted run", not why, why)
    log(f"  {'ok  ' if not why else 'FAIL'} resume with space back: {why or 'bitwise equal'}")
