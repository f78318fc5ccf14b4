"""Atomic writes: a reader (another rank, a resumed run) sees the old file or the new one, never
half of one. Write to a temporary name beside the target, then `os.replace` it onto the target.

A leaf module (the standard library only), so `train/data` uses it without the checkpoint
machinery; `train.trainer.checkpointing` re-exports `atomic_write_text`.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename in it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (``.NAME.PID.tmp``: hidden, and per process, so ranks that
    write the same file at once never share it) for the block to write a file or a directory to;
    replaced onto `path` when the block ends, removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, encoding: Optional[str] = None) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never half of one."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
