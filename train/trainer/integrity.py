"""Reading a run's files safely: a checkpoint is verified before anything loads it, and a run
directory is locked while a trainer uses it.

`verify_checkpoint`: every file COMPLETE lists (checkpointing.save_checkpoint writes the list with
the sizes) must be there with its size, so a shard truncated or deleted after the save is refused;
every ``*.pt`` must unpickle with ``torch.load(weights_only=True)`` (tensors and plain data, plus the
DeepSpeed classes of SAFE_GLOBALS), so a pickle that would run code is refused before DeepSpeed's
own loader (which unpickles everything) or zero_to_fp32 sees it. `safe_torch_load` is the one
weights-only load of the trainer's files (export, init.from_checkpoint, `archscale inspect --batch`).

`RunLock`: an fcntl lock on ``RUN/.lock``; a second trainer on a run directory in use is refused
with one line instead of writing beside the first.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from .checkpointing import COMPLETE, CheckpointError

LOCK_FILE = ".lock"
# The classes (besides tensors and plain data) that DeepSpeed's checkpoint files pickle.
SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address")


def safe_torch_load(path: str | Path, what: str = "checkpoint file", *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` (tensors, plain data and SAFE_GLOBALS only), with a
    one-line CheckpointError for a file that is unreadable or that pickles anything else."""
    import importlib
    import pickle

    import torch

    allowed = []
    for name in SAFE_GLOBALS:
        mod, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError):
            pass
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = next((l.strip() for l in str(e).splitlines() if "GLOBAL" in l), "not tensors")
        raise CheckpointError(f"{what} {path} refused: it pickles objects a weights-only load does not allow "
                              f"({detail[:160]}); it was not written by this trainer: do not load it") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{what} {path} is unreadable (truncated or corrupted: {first}); "
                              f"use another one") from None


def verify_checkpoint(step_dir: str | Path) -> None:
    """Refuse (CheckpointError, one line) a complete checkpoint whose files were damaged after the
    save: a file COMPLETE lists that is missing or has another size, a COMPLETE that is not the
    JSON the save wrote, a ``*.pt`` that is unreadable or pickles more than weights. Reads no tensor data."""
    step_dir = Path(step_dir)
    fix = f"delete {step_dir} to resume from the checkpoint before it, or point checkpoint.resume at another one"
    try:
        marker = json.loads((step_dir / COMPLETE).read_text()) if (step_dir / COMPLETE).exists() else {}
        files = marker.get("files")
        if files is not None and not isinstance(files, dict):
            raise ValueError("files is not a mapping")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{step_dir}: corrupted {COMPLETE} marker ({str(e)[:100]}): {fix}") from None
    for name, size in (files or {}).items():
        f = step_dir / name
        if not f.is_file():
            raise CheckpointError(f"{step_dir}: {name} is missing (deleted after the save): {fix}")
        if f.stat().st_size != size:
            raise CheckpointError(f"{step_dir}: {name} has {f.stat().st_size} bytes, the save wrote {size} "
                                  f"(truncated or changed): {fix}")
    for f in sorted(step_dir.rglob("*.pt")):
        try:
            safe_torch_load(f, mmap=True)
        except CheckpointError as e:
            raise CheckpointError(f"{e} ({fix})") from None


class RunLock:
    """An exclusive fcntl lock on ``RUN/.lock`` while one trainer uses the run directory (rank 0
    takes it; the kernel drops it when the process ends, also on SIGKILL). The file keeps the
    holder's pid, host and start time for the message a second trainer gets."""

    def __init__(self):
        self.fd: Optional[int] = None

    def acquire(self, root: Path) -> None:
        import fcntl

        root.mkdir(parents=True, exist_ok=True)
        path = root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(f"run_dir={root} is in use by another trainer ({holder}; lock {path}): wait for "
                                  f"it to end or stop it, or train in another run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None
