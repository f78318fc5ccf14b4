"""Run directories and checkpoints that a crash, a kill or a preemption can never corrupt.

Layout (DESIGN.md):

    RUN/
      config.yaml  ds_config.json  metrics.jsonl  tb/  slurm/  eval/  export/  plots/
      checkpoints/
        step-00001200/          engine files (written by a callable) + trainer_state.json
                                + config.yaml + COMPLETE
        step-00001300.tmp/      a save in progress, or one a crash interrupted: never read
        latest                  "step-00001200": the newest complete checkpoint, replaced atomically

A save writes everything into ``step-N.tmp``, writes ``COMPLETE`` last, renames the directory to
``step-N`` and then replaces ``latest`` (train/atomic.py: a temporary file + ``os.replace``). A kill at any
point leaves either the previous checkpoint as ``latest`` or the new one; readers skip anything
without ``COMPLETE`` and every ``*.tmp``.

Distributed discipline without importing torch.distributed: every rank calls ``save_checkpoint``
with its ``is_rank0`` flag and a ``barrier`` callable (``torch.distributed.barrier`` in the
trainer, a no-op in a single process); all ranks run the engine writer (DeepSpeed's save is
collective), rank 0 alone creates, marks, renames and prunes. The checkpoint directory must be
on a filesystem all ranks share.

The engine writer plugs the trainer's engine in (train/engine/engines.py), ``lambda d:
engine.save(d)``: DeepSpeed's files under ``step-N/engine``, without DeepSpeed's own ``latest``
file. Load with ``engine.load(step_dir)``.

COMPLETE lists every file of the checkpoint and its size, so that train/trainer/integrity.py can
refuse a shard truncated or deleted after the save. A save that runs out of disk space removes
its ``.tmp`` and raises a one-line CheckpointError; the previous checkpoint stays ``latest``.

torch and numpy are imported only by the RNG functions.
"""
from __future__ import annotations

import base64
import dataclasses
import errno
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..atomic import atomic_write_text  # noqa: F401  (re-exported: checkpointing.atomic_write_text)
from ..atomic import fsync_dir as _fsync_dir

COMPLETE = "COMPLETE"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
TMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"
_STEP_RE = re.compile(r"^step-(\d+)$")
_LEFTOVER_RE = re.compile(r"^step-(\d+)\.(tmp|old)$")
# Test hook: with ARCHSCALE_TEST_SAVE_PAUSE=S, save_checkpoint sleeps S seconds after each of its
# phases (tmp made, engine written, state written, COMPLETE written, renamed, latest replaced), so
# a kill can land in any of them (bench/faults). Unset in real runs.
SAVE_PAUSE_ENV = "ARCHSCALE_TEST_SAVE_PAUSE"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, unreadable); one-line message."""


def step_dir_name(step: int) -> str:
    """``1200`` -> ``"step-00001200"`` (zero-padded so names sort by step)."""
    return f"step-{step:08d}"


def parse_step(name: str) -> Optional[int]:
    """The step of a complete-checkpoint directory name; None for anything else (``.tmp`` included)."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return parse_step(path.name) is not None and (path / COMPLETE).is_file()


# ----------------------------------------------------------------------------------------------
# Run directory
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunLayout:
    """The paths of a run directory."""

    root: Path
    checkpoints: Path

    @classmethod
    def of(cls, run_dir: str | Path, checkpoints_dir: Optional[str | Path] = None) -> "RunLayout":
        root = Path(run_dir)
        return cls(root, Path(checkpoints_dir) if checkpoints_dir else root / "checkpoints")

    @classmethod
    def from_config(cls, cfg: Any) -> "RunLayout":
        """From a RunConfig (``run_dir``, ``checkpoint.dir``)."""
        return cls.of(cfg.run_dir, cfg.checkpoint.dir)

    config_yaml = property(lambda self: self.root / "config.yaml")
    ds_config_json = property(lambda self: self.root / "ds_config.json")
    metrics_jsonl = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tb")
    slurm = property(lambda self: self.root / "slurm")
    eval = property(lambda self: self.root / "eval")
    export = property(lambda self: self.root / "export")
    plots = property(lambda self: self.root / "plots")
    latest = property(lambda self: self.checkpoints / LATEST)

    def create(self) -> "RunLayout":
        """Make the run and checkpoint directories (rank 0, before anything is written)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        return self

    def write_run_files(self, config_yaml: str, ds_config: Optional[dict] = None) -> None:
        """Write the resolved config and the DeepSpeed JSON into the run directory (rank 0)."""
        self.create()
        atomic_write_text(self.config_yaml, config_yaml)
        if ds_config is not None:
            atomic_write_text(self.ds_config_json, json.dumps(ds_config, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Trainer state and RNG
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainerState:
    """Everything besides the engine's files that an exact resume needs (saved as JSON)."""

    step: int = 0
    """Optimizer steps taken."""
    tokens_seen: int = 0
    """Tokens the model has read (inputs + targets, padding excluded): the budget's unit."""
    target_tokens: int = 0
    """Tokens that carried a loss (labels != -100): fewer than tokens_seen for PLM and MLM."""
    flops: float = 0.0
    """Training FLOPs so far (analytic, from the model's flops_per_token)."""
    data_position: dict = field(default_factory=dict)
    """The data stream's resumable position (opaque here; owned by train/data)."""
    rng_states: list = field(default_factory=list)
    """``capture_rng_state()`` of every rank, indexed by rank."""
    world_size: int = 1
    """Processes of the run that saved it (a different world size resumes via a universal checkpoint)."""
    config: dict = field(default_factory=dict)
    """The resolved run config (``to_dict``), so a checkpoint is self-describing."""
    init: dict = field(default_factory=dict)
    """Where the weights came from (init.from_checkpoint): the parent checkpoint's resolved path,
    step, tokens_seen, target_tokens and flops, so the cost of every phase adds up. Empty for a
    run trained from scratch."""
    branch: dict = field(default_factory=dict)
    """For a decay branch (a run resumed from another run's checkpoint, e.g. a WSD-S budget): its
    parent_run_dir, parent_checkpoint and parent_step, as RUN/branch.json. Empty otherwise."""
    version: int = 1
    """Format version of this file."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainerState":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read trainer state {path}: {e}") from e
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: corrupted trainer state (a JSON {type(data).__name__}, not an object); "
                                  f"resume from another checkpoint (checkpoint.resume=PATH)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{path}: unknown trainer-state keys {unknown}; known: {sorted(known)}")
        defaults = cls()
        for k, v in data.items():  # no field is a bool; a float field takes an int
            want = type(getattr(defaults, k))
            if isinstance(v, bool) or not isinstance(v, (int, float) if want is float else want):
                raise CheckpointError(f"{path}: corrupted trainer state: {k}={str(v)[:40]!r} is not a "
                                      f"{want.__name__}; resume from another checkpoint (checkpoint.resume=PATH)")
        return cls(**data)

    def rng_state_for(self, rank: int) -> Optional[dict]:
        """The saved RNG state of ``rank``; None when the saving run had fewer ranks."""
        return self.rng_states[rank] if rank < len(self.rng_states) else None


def _b64(t) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str):
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng_state() -> dict:
    """This process's python, numpy, torch (and CUDA, if in use) RNG states, as JSON-able data."""
    import numpy as np
    import torch

    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``: the next random numbers are the ones the saver would have drawn."""
    import numpy as np
    import torch

    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = [_unb64(s) for s in state["cuda"]]
        for i, s in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------------------------
# Save, prune, find
# ----------------------------------------------------------------------------------------------

def list_checkpoints(checkpoints_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first. Incomplete and ``*.tmp`` dirs are skipped."""
    d = Path(checkpoints_dir)
    if not d.is_dir():
        return []
    out = [(parse_step(p.name), p) for p in d.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(out)  # type: ignore[arg-type]


def read_latest(checkpoints_dir: str | Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, if that checkpoint is complete; else None."""
    d = Path(checkpoints_dir)
    try:
        name = (d / LATEST).read_text().strip()
    except OSError:
        return None
    path = d / name
    return path if name and "/" not in name and is_complete(path) else None


def newest_checkpoint(checkpoints_dir: str | Path) -> Optional[Path]:
    """``latest`` if it names a complete checkpoint, else the complete checkpoint with the highest step.

    ``latest`` wins over the step numbers so that a run started afresh in a directory holding an
    older run's higher-step checkpoints resumes its own.
    """
    latest = read_latest(checkpoints_dir)
    if latest is not None:
        return latest
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def save_checkpoint(checkpoints_dir: str | Path, state: TrainerState,
                    write_engine: Callable[[Path], None], *, is_rank0: bool = True,
                    barrier: Callable[[], None] = lambda: None, keep_last: int = 0,
                    keep_every_n_steps: int = 0, keep_steps: tuple[int, ...] = (),
                    config_yaml: Optional[str] = None) -> Path:
    """Write checkpoint ``step-{state.step}`` atomically; call on every rank.

    1. rank 0 makes a fresh ``step-N.tmp`` (removing a leftover of a crashed save); barrier
    2. every rank: ``write_engine(tmp_dir)`` (its shard of the engine state); barrier
    3. rank 0: ``trainer_state.json`` (+ ``config.yaml``), then ``COMPLETE``, rename to ``step-N``,
       replace ``latest``, prune to ``keep_last``; barrier
    An exception anywhere before the rename leaves the previous checkpoint as ``latest`` and an
    ignored ``.tmp`` directory (removed by the next save or prune); a full disk removes the
    ``.tmp`` at once and raises a one-line CheckpointError. Returns the final path.
    """
    ckpt = Path(checkpoints_dir)
    name = step_dir_name(state.step)
    final, tmp = ckpt / name, ckpt / (name + TMP_SUFFIX)
    try:
        _write_tmp(ckpt, tmp, state, write_engine, is_rank0=is_rank0, barrier=barrier, config_yaml=config_yaml)
    except Exception as e:
        if _disk_full(e, ckpt):
            if is_rank0:
                shutil.rmtree(tmp, ignore_errors=True)  # never read; removed now to give the space back
            prev = read_latest(ckpt)
            raise CheckpointError(f"no space left on the device of {ckpt} while saving {name} (the save was removed; "
                                  f"the newest checkpoint is still {prev.name if prev else 'none'}): free space or "
                                  f"lower checkpoint.keep_last, then resume with the same command") from None
        raise
    if is_rank0:
        _publish(ckpt, tmp, final)
        if keep_last:
            prune_checkpoints(ckpt, keep_last, keep_every_n_steps, protect=(final,), keep_steps=keep_steps)
    barrier()
    return final


def _write_tmp(ckpt: Path, tmp: Path, state: TrainerState, write_engine: Callable[[Path], None], *,
               is_rank0: bool, barrier: Callable[[], None], config_yaml: Optional[str]) -> None:
    """Steps 1 and 2 of save_checkpoint, and step 3 up to COMPLETE: everything inside `tmp`."""
    if is_rank0:
        ckpt.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _pause()
    barrier()
    write_engine(tmp)
    barrier()
    _pause()
    if is_rank0:
        state.save(tmp / STATE_FILE)
        if config_yaml is not None:
            atomic_write_text(tmp / "config.yaml", config_yaml)
        _pause()
        marker = {"step": state.step, "time": time.time(), "files": _manifest(tmp)}
        atomic_write_text(tmp / COMPLETE, json.dumps(marker) + "\n")
        _pause()


def _publish(ckpt: Path, tmp: Path, final: Path) -> None:
    """Rank 0, after COMPLETE: rename `tmp` to `final` (replacing a save of the same step through
    `.old`), then point `latest` at it. A kill between the two leaves `latest` at the previous
    checkpoint; both are complete."""
    if final.exists():  # saving a step again (e.g. at the end right after a periodic save)
        old = ckpt / (final.name + _OLD_SUFFIX)
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(ckpt)
    _pause()
    atomic_write_text(ckpt / LATEST, final.name + "\n")
    _pause()


def _manifest(step_dir: Path) -> dict[str, int]:
    """Every file under `step_dir` (COMPLETE aside) and its size."""
    return {str(p.relative_to(step_dir)): p.stat().st_size for p in sorted(step_dir.rglob("*"))
            if p.is_file() and p.name != COMPLETE}


def _pause() -> None:
    if os.environ.get(SAVE_PAUSE_ENV):  # test hook: see SAVE_PAUSE_ENV
        time.sleep(float(os.environ[SAVE_PAUSE_ENV]))


def _disk_full(e: BaseException, where: Path) -> bool:
    """An error of a write that ran out of space: ENOSPC, or torch.save's RuntimeError on a full disk."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(e) or "file write failed" in str(e):
        return True
    try:
        return isinstance(e, RuntimeError) and shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def prune_checkpoints(checkpoints_dir: str | Path, keep_last: int, keep_every_n_steps: int = 0,
                      protect: tuple[Path, ...] = (), keep_steps: tuple[int, ...] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (rank 0 only); returns what it deleted.

    Never deleted: the newest complete checkpoint, the one ``latest`` names, ``protect``, steps
    that are multiples of ``keep_every_n_steps`` and the steps in ``keep_steps`` (checkpoint.at_steps). Leftover ``step-N.tmp`` / ``.old`` dirs of
    crashed saves go too (call this only while no save is in progress). keep_last=0 keeps all.
    """
    ckpt = Path(checkpoints_dir)
    removed: list[Path] = []
    if not ckpt.is_dir():
        return removed
    for p in ckpt.iterdir():
        if p.is_dir() and _LEFTOVER_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if keep_last <= 0:
        return removed
    complete = list_checkpoints(ckpt)
    keep = {p.resolve() for _, p in complete[-keep_last:]} | {Path(p).resolve() for p in protect}
    latest = read_latest(ckpt)
    if latest is not None:
        keep.add(latest.resolve())
    for step, p in complete:
        if p.resolve() in keep or step in keep_steps or (keep_every_n_steps and step % keep_every_n_steps == 0):
            continue
        shutil.rmtree(p)
        removed.append(p)
    return removed


def find_resume_point(run_dir: str | Path, resume: str = "auto", *,
                      checkpoints_dir: Optional[str | Path] = None) -> Optional[Path]:
    """The checkpoint directory to resume from, or None to start fresh.

    resume="never": None. "auto": the newest complete checkpoint of this run (``latest``, else the
    highest complete step), None if there is none. A path: a complete checkpoint directory, or a
    run / checkpoints directory (its newest complete checkpoint); anything else is an error.
    A path outside this run's checkpoints (another run's: a decay branch's parent) is where the
    run *starts*: once this run holds a complete checkpoint of its own, that one is resumed
    (the same command continues a branch after a kill or a requeue, never restarts it).
    """
    if resume == "never":
        return None
    layout = RunLayout.of(run_dir, checkpoints_dir)
    if resume == "auto":
        return newest_checkpoint(layout.checkpoints)
    found = _resume_path(resume)  # a bad path is an error, also for a run that has checkpoints
    own = newest_checkpoint(layout.checkpoints)
    if own is not None and found.resolve().parent != layout.checkpoints.resolve():
        return own
    return found


def _resume_path(resume: str) -> Path:
    """The complete checkpoint a checkpoint.resume path names (find_resume_point)."""
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume={resume}: no such path")
    if parse_step(path.name) is not None or path.name.endswith(TMP_SUFFIX):
        if is_complete(path):
            return path
        raise CheckpointError(f"checkpoint.resume={resume}: incomplete checkpoint (no {COMPLETE} marker, "
                              f"an interrupted save); use resume=auto or an older checkpoint")
    for d in (path / "checkpoints", path):
        found = newest_checkpoint(d)
        if found is not None:
            return found
    raise CheckpointError(f"checkpoint.resume={resume}: no complete checkpoint in this directory")


def resolve_checkpoint(path: str | Path, step: Optional[int] = None, *, what: str = "") -> Path:
    """The complete checkpoint directory `path` names: a run directory's newest (or its `step`), or
    a checkpoint directory itself. The one step-directory lookup of export, eval, analyze, report
    and init.from_checkpoint (`what` names the option in the message, e.g. "init.from_checkpoint").
    Raises CheckpointError with a one-line message."""
    path = Path(path)
    name = f"{what}={path}" if what else str(path)
    if (path / "checkpoints").is_dir():
        if step is None:
            found = newest_checkpoint(path / "checkpoints")
            if found is None:
                raise CheckpointError(f"{name} has no complete checkpoint: train it first, or point at a run "
                                      f"directory that holds one or at a checkpoints/step-N directory")
            return found
        d = path / "checkpoints" / step_dir_name(step)
        if not is_complete(d):
            have = [s for s, _ in list_checkpoints(path / "checkpoints")]
            raise CheckpointError(f"no complete checkpoint for step {step} in {path}; complete steps: {have}")
        return d
    if step is None and is_complete(path):
        return path
    raise CheckpointError(f"{name} is not a complete checkpoint (no {COMPLETE} marker) nor a run directory with "
                          f"checkpoints/: point at one of those")
