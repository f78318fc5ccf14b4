"""SIGKILL at random points of a tiny CPU run, resumed after each, then compared bitwise with an
uninterrupted run of the same config; and SIGUSR1 / SIGTERM sent as Slurm sends them.

One run is killed again and again (`kill_campaign`): each launch resumes from the newest complete
checkpoint and is killed (SIGKILL to its whole process group) at a point drawn from a seeded RNG:

- "start": a random time after the launch (imports, data, model, checkpoint load);
- "step": once the run has logged a drawn step, plus a random fraction of a step (inside the
  step, the held-out loss or the periodic save);
- "save": inside a checkpoint save. ARCHSCALE_TEST_SAVE_PAUSE makes the save pause after each of
  its phases (tmp made, engine files written, trainer state, COMPLETE, renamed, latest replaced);
  the kill lands at a random time inside the save, and which phase it hit is recorded;
- "final": inside the final evaluation, after the last step's checkpoint and before FINISHED
  (ARCHSCALE_TEST_FINAL_EVAL_PAUSE holds the run there): the last kills of the campaign, one
  before the evaluation's line is written and one after (the state that logged it twice, issue 32).

After every kill the newest complete checkpoint must verify (train/trainer/integrity.py: every
file there, every pickle weights-only) and must never be a `.tmp`; the next launch must resume
from it. At the end the run finishes and must equal the uninterrupted run: weights bitwise, every
logged loss bitwise and logged once, the same counters and data position; and metrics.jsonl
holds each (step, kind) line once, equal to the uninterrupted run's line for line (timings aside).
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path

from .common import (PAUSE_ENV, Row, kill_group, launch, logged_step, run_cli, run_overrides, same_run,
                     wait_for)

PAUSE = 0.25  # seconds after each of the save's 6 phases (kills inside a save)
FINAL_PAUSE = 1.0  # seconds before and after the final evaluation's line (kills inside it)
FINAL_PAUSE_ENV = "ARCHSCALE_TEST_FINAL_EVAL_PAUSE"  # train/trainer/callbacks.py: FINAL_EVAL_PAUSE_ENV
FINAL_PHASES = ("before its line", "after its line")


def measured(key: str) -> bool:
    """A field of a metrics line that measures this machine, not the run (so differs between equal
    runs): throughput, MFU, and the memory keys of the fit check (`*_gib`: the measured peak and
    the start-up RSS, and the planned peak beside them, all on the first line of a launch)."""
    return key in ("tokens_per_s", "mfu") or key.endswith("_gib")


def metric_lines(run: Path) -> list[tuple]:
    """(step, kind, the line without its measured fields) of every line of RUN/metrics.jsonl, in order."""
    from train.trainer.callbacks import line_kind

    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], line_kind(r), {k: v for k, v in r.items() if not measured(k)}) for r in recs]


def same_lines(ref: Path, run: Path) -> str:
    """'' when every (step, kind) of run's metrics.jsonl is there once and the lines equal ref's
    (training, held-out and yardstick values bitwise); else the first difference."""
    a, b = metric_lines(ref), metric_lines(run)
    seen: set = set()
    twice = [(s, k) for s, k, _ in b if (s, k) in seen or seen.add((s, k))]
    if twice:
        return f"metrics.jsonl lines logged twice (step, kind): {twice[:4]}"
    diff = next((f"line {i + 1}: {x[:2]} != {y[:2]}" if x[:2] != y[:2] else f"line {i + 1} {x[:2]} differs"
                 for i, (x, y) in enumerate(zip(a, b)) if x != y), "")
    return diff or (f"{len(b)} metrics lines, the uninterrupted run has {len(a)}" if len(a) != len(b) else "")


def reference(work: Path, steps: int, every: int) -> Path:
    """The uninterrupted run (one launch, no hook)."""
    ref = work / f"ref-{steps}-{every}"
    if not (ref / "FINISHED").is_file():
        shutil.rmtree(ref, ignore_errors=True)
        p = run_cli(["train", *run_overrides(work, ref, steps, every)], work)
        if p.returncode:
            raise RuntimeError(f"the uninterrupted run failed: {p.stderr[-2000:]}")
    return ref


def _resume_point(run: Path):
    from train.trainer.checkpointing import newest_checkpoint

    return newest_checkpoint(run / "checkpoints")


def _phase(run: Path, step_name: str) -> str:
    """Where inside its save a kill landed, from what the save left."""
    ck = run / "checkpoints"
    tmp, final = ck / (step_name + ".tmp"), ck / step_name
    latest = (ck / "latest").read_text().strip() if (ck / "latest").exists() else ""
    if tmp.is_dir():
        if (tmp / "COMPLETE").exists():
            return "COMPLETE written, not renamed"
        if (tmp / "trainer_state.json").exists():
            return "trainer state written"
        return "engine files" if any((tmp / "engine").glob("*.pt")) else "tmp made"
    if final.is_dir():
        return "renamed, latest not replaced" if latest != step_name else "latest replaced (pruning)"
    return "before the save"


def _kill_once(work: Path, run: Path, ov: list[str], kind: str, rng: random.Random, steps: int) -> tuple[str, str]:
    """One launch killed at a `kind` point; returns (where it was killed, '' or what went wrong)."""
    before = _resume_point(run)
    from_step = int(before.name[5:]) if before else 0
    p = launch(["train", *ov], work, **({PAUSE_ENV: PAUSE} if kind == "save" else {}),
               **({FINAL_PAUSE_ENV: FINAL_PAUSE} if kind.startswith("final") else {}))
    where = ""
    if kind.startswith("final"):
        return _kill_in_final(run, p, kind, rng, steps)
    if kind == "start":
        delay = rng.uniform(0.0, 6.0)
        wait_for(p, lambda: False, delay)
        where = f"start +{delay:.1f}s (logged step {logged_step(run)})"
    elif kind == "step":
        target = min(from_step + rng.randint(1, 5), steps - 1)
        if not wait_for(p, lambda: logged_step(run) >= target):
            return where, f"the run ended (rc {p.poll()}) before step {target}: {p.stdout.read()[-800:]}"
        extra = rng.uniform(0.0, 0.3)
        time.sleep(extra)
        where = f"step {target} +{extra:.2f}s"
    else:
        t0 = time.time()
        tmps = lambda: [d for d in (run / "checkpoints").glob("step-*.tmp")  # noqa: E731
                        if int(d.name[5:13]) > from_step and d.stat().st_mtime >= t0 - 1]
        if not wait_for(p, lambda: bool(tmps())):
            return where, f"no save started (rc {p.poll()}): {p.stdout.read()[-800:]}"
        name = tmps()[0].name[:-4]
        time.sleep(rng.uniform(0.0, 6 * PAUSE))
        kill_group(p)
        return f"save of {name}: {_phase(run, name)}", _after_kill(run, p)
    kill_group(p)
    return where, _after_kill(run, p)


def _final_logged(run: Path, steps: int) -> bool:
    """Whether metrics.jsonl's last line is the final evaluation's (step `steps`, kind eval)."""
    try:
        last = metric_lines(run)[-1:]
    except (OSError, ValueError):  # no file yet, or a line being written
        return False
    return bool(last) and last[0][:2] == (steps, "eval")


def _kill_in_final(run: Path, p, kind: str, rng: random.Random, steps: int) -> tuple[str, str]:
    """A kill inside the final evaluation ("final: before its line" / "final: after its line"):
    once the last checkpoint is `latest`, at a random time inside FINAL_PAUSE around the line."""
    latest, name = run / "checkpoints" / "latest", f"step-{steps:08d}"
    after = kind.endswith(FINAL_PHASES[1])

    def there() -> bool:
        done = latest.is_file() and latest.read_text().strip() == name
        return done and (_final_logged(run, steps) if after else True)

    if not wait_for(p, there):
        return kind, f"the run ended (rc {p.poll()}) before its final evaluation: {p.stdout.read()[-800:]}"
    time.sleep(rng.uniform(0.1, 0.8) * FINAL_PAUSE)  # past the save's pruning, inside the pause
    kill_group(p)
    hit = FINAL_PHASES[1] if _final_logged(run, steps) else FINAL_PHASES[0]
    why = _after_kill(run, p) or ("" if hit == kind.split(": ")[1] else f"the kill landed {hit}")
    return f"final evaluation of step {steps}: {hit}", why


def _after_kill(run: Path, p) -> str:
    """'' when the run can resume from a verified complete checkpoint (or there is none yet)."""
    from train.trainer.checkpointing import CheckpointError
    from train.trainer.integrity import verify_checkpoint

    if p.returncode == 0:
        return "the run finished before the kill"
    if (run / "FINISHED").exists():
        return "FINISHED after a kill"
    point = _resume_point(run)
    if point is None:
        return ""
    if point.name.endswith(".tmp") or not (point / "COMPLETE").is_file():
        return f"would resume from an incomplete {point.name}"
    try:
        verify_checkpoint(point)
    except CheckpointError as e:
        return f"the newest complete checkpoint does not verify: {e}"
    return ""


def kill_campaign(work: Path, kills: int = 20, in_save: int = 6, at_start: int = 3, steps: int = 40,
                  every: int = 2, seed: int = 19, in_final: bool = True, log=print) -> Row:
    """`kills` SIGKILLs at seeded points, then (`in_final`) one before and one after the final
    evaluation's line, then the final resume compared with the uninterrupted run."""
    row = Row(f"SIGKILL at random points ({in_save} inside a save), resume, bitwise equal")
    ref = reference(work, steps, every)
    run = work / f"killed-{steps}-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    ov = run_overrides(work, run, steps, every)
    rng = random.Random(seed)
    kinds = ["save"] * in_save + ["start"] * at_start + ["step"] * (kills - in_save - at_start)
    rng.shuffle(kinds)
    kinds += [f"final: {ph}" for ph in FINAL_PHASES] if in_final else []
    phases = []
    for i, kind in enumerate(kinds):
        where, why = _kill_once(work, run, ov, kind, rng, steps)
        row.case(f"kill {i + 1} ({kind}: {where})", not why, why)
        phases.append(where)
        log(f"  {'ok  ' if not why else 'FAIL'} kill {i + 1:2d} {kind.split(':')[0]:5s} {where}{': ' + why if why else ''}")
        if why:
            break
    p = run_cli(["train", *ov], work)
    why = "" if p.returncode == 0 else f"the final resume failed (rc {p.returncode}): {p.stderr[-600:]}"
    why = why or same_run(ref, run, steps) or same_lines(ref, run)
    row.case("final weights and metrics bitwise equal to the uninterrupted run", not why, why)
    log(f"  {'ok  ' if not why else 'FAIL'} final resume: "
        f"{why or 'bitwise equal (weights, losses, counters; every metrics line once)'}")
    save_phases = sorted({w.split(': ', 1)[1] for w in phases if w.startswith('save')})
    row.notes = (f"{len(kinds)} kills of one {steps}-step ND:PLM ZeRO-1 run (seed {seed}), then a final resume; "
                 f"inside the save: {', '.join(save_phases) or 'none'}"
                 f"{'; inside the final evaluation: ' + ', '.join(FINAL_PHASES) if in_final else ''}")
    return row


def signal_campaign(work: Path, steps: int = 12, every: int = 2, log=print) -> Row:
    """SIGUSR1, then SIGTERM, to the trainer's process group (as srun forwards Slurm's signal):
    each time the run saves the step it is at, says so in one line, exits 0 without FINISHED (the
    job script then requeues, docs/slurm.md), and the same command resumes; the end is bitwise
    equal to the uninterrupted run."""
    row = Row("SIGUSR1 / SIGTERM: save, exit for requeue, resume bitwise equal")
    ref = reference(work, steps, every)
    run = work / f"signalled-{steps}"
    shutil.rmtree(run, ignore_errors=True)
    ov = run_overrides(work, run, steps, every)
    at = 0
    for sig, k in ((signal.SIGUSR1, 3), (signal.SIGTERM, 3)):
        p = launch(["train", *ov], work)
        target = at + k
        ok = wait_for(p, lambda: logged_step(run) >= target)
        kill_group(p, sig) if ok else p.kill()
        out = p.stdout.read()
        point = _resume_point(run)
        saved = int(point.name[5:]) if point else -1
        why = ("" if ok else "never reached the step") or (f"rc {p.returncode}" if p.returncode != 0 else "") or \
              ("" if f"stopped by {sig.name}" in out else "no 'stopped by' line") or \
              ("FINISHED written" if (run / "FINISHED").exists() else "") or \
              ("" if saved >= target and saved == logged_step(run) else f"saved {saved}, logged {logged_step(run)}")
        row.case(f"{sig.name} at step {target}", not why, why)
        log(f"  {'ok  ' if not why else 'FAIL'} {sig.name} at step >= {target}: saved step {saved}, rc {p.returncode}"
            f"{': ' + why if why else ''}")
        at = max(saved, at)
    p = run_cli(["train", *ov], work)
    why = ("" if p.returncode == 0 else f"resume rc {p.returncode}") or same_run(ref, run, steps) or same_lines(ref, run)
    row.case("resumed run bitwise equal", not why, why)
    log(f"  {'ok  ' if not why else 'FAIL'} resumed after both signals: {why or 'bitwise equal'}")
    row.notes = "signal to the process group as srun forwards it; exit 0 + checkpoint is the requeue contract"
    return row
