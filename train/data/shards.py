"""Sharded, parallel, resumable tokenization (used by train/data/tokenize.py).

The corpus is cut into fixed document ranges of `data.shard_documents` documents (shard i holds
documents [i*S, (i+1)*S)), whatever the number of processes, so the tokens never depend on it.
Each shard is tokenized by one process and written atomically (a temporary name, then a rename:
train/atomic.py) as a `datasets` Arrow file to

    CACHE/tokenized/FINGERPRINT-sS/shard-IIIII-of-NNNNN.arrow

(FINGERPRINT: the source dataset's and the tokenizer's fingerprints, the columns and bad_rows).
A shard file that exists is complete: a killed tokenization, run again, tokenizes only the shards
that are missing; so does a second run or another rank (nothing left to do), and a Slurm job array
over shard ranges (`archscale tokenize --submit`, train/commands/tokenize.py). The result is the
concatenation of the shard files, memory-mapped (no copy).

Processes: `data.num_proc` (0 = one per core this process may run on, os.sched_getaffinity), at
most one per shard left to do; one process (or one shard) tokenizes in this process, no pool.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

from ..atomic import atomic_path

log = logging.getLogger("archscale.data")
BATCH = 256  # documents per tokenizer call (the batch does not change the tokens)
_JOB = None  # (ds, fn, features, start, stop): set before the pool forks, read by its workers
after_shard = None  # tests: called with the shard index after each shard this process wrote


def available_cores() -> int:
    """The cores this process may run on (its affinity: a Slurm task's CPUs, a taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def processes(num_proc: int) -> int:
    """data.num_proc resolved: 0 -> one process per available core."""
    return num_proc if num_proc > 0 else available_cores()


def num_shards(num_docs: int, shard_documents: int) -> int:
    return max(1, -(-num_docs // shard_documents))


def shard_dir(cfg, fp: str) -> Path:
    return Path(cfg.resolved_cache_dir()) / "tokenized" / f"{fp}-s{cfg.shard_documents}"


def shard_paths(d: Path, n: int) -> list[Path]:
    return [d / f"shard-{i:05d}-of-{n:05d}.arrow" for i in range(n)]


def parse_range(text: str, n: int) -> tuple[int, int]:
    """'A:B' -> (A, B), shards A..B-1 of n; a one-line ValueError for anything else."""
    a, sep, b = str(text).partition(":")
    try:
        lo, hi = int(a), int(b)
    except ValueError:
        lo = hi = None
    if not sep or lo is None or not 0 <= lo < hi or lo >= n:
        raise ValueError(f"shard range {text!r} is not valid: expected A:B with 0 <= A < B, A < {n} "
                         f"(the corpus has {n} shard(s) of data.shard_documents documents; B is capped at {n})")
    return lo, min(hi, n)


def _batches(i: int):
    """The columns of shard i, BATCH documents at a time (in a pool worker or in this process)."""
    ds, fn, features, size, n_docs = _JOB
    lo, hi = i * size, min((i + 1) * size, n_docs)
    for s in range(lo, hi, BATCH):
        e = min(s + BATCH, hi)
        yield fn(ds[s:e], list(range(s, e)))


def _tokenize_shard(i: int):
    """Shard i as a pyarrow Table (in memory)."""
    import pyarrow as pa

    features = _JOB[2]
    cols = {name: [] for name in features}
    for out in _batches(i):
        for name in cols:
            cols[name].extend(out[name])
    return pa.Table.from_pydict(cols, schema=features.arrow_schema)


def _write_shard(i: int, path: Path) -> None:
    """Shard i written batch by batch (a worker holds one batch, not the shard) to a temporary file,
    renamed onto path when complete."""
    from datasets.arrow_writer import ArrowWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        writer = ArrowWriter(features=_JOB[2], path=str(tmp))
        try:
            for out in _batches(i):
                writer.write_batch({name: out[name] for name in _JOB[2]})
            writer.finalize()
        finally:
            writer.close()


def _work(args):
    i, path = args
    if path is None:
        return i, _tokenize_shard(i)
    _write_shard(i, Path(path))
    return i, None


def _init_worker():
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the pool is the parallelism
    # the pool is terminated (SIGTERM) when a shard fails or the caller is interrupted: exit through
    # Python, so the shard being written removes its temporary file (atomic_path)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))


def run(ds, fn, features, fields, fp: str, cfg, what: str, shard_range: tuple[int, int] | None = None):
    """Tokenize ds (fn: batch, indices -> columns) in shards. Returns (the concatenated Dataset, or
    None when only `shard_range` (A, B) was asked for: a job-array task writes those shards and reads
    nothing; seconds spent tokenizing; shards tokenized now)."""
    import datasets
    from datasets.table import InMemoryTable

    global _JOB
    ds = ds.select_columns(fields)
    n_docs, size = len(ds), cfg.shard_documents
    n = num_shards(n_docs, size)
    on_disk = bool(ds.cache_files)  # an in-memory dataset (tests) is tokenized in memory, not cached
    paths = shard_paths(shard_dir(cfg, fp), n) if on_disk else [None] * n
    lo, hi = shard_range or (0, n)
    todo = [i for i in range(lo, hi) if paths[i] is None or not paths[i].exists()]
    done = (hi - lo) - len(todo)
    procs = min(processes(cfg.num_proc), len(todo)) or 1
    if todo:
        log.info("%s: %d documents, shards %d:%d of %d (%d documents each): %d already done, tokenizing %d "
                 "with %d process(es)", what, n_docs, lo, hi, n, size, done, len(todo), procs)
    t0 = time.perf_counter()
    tables = {}
    _JOB = (ds, fn, features, size, n_docs)
    try:
        work = [(i, None if paths[i] is None else str(paths[i])) for i in todo]
        if procs == 1:
            results = map(_work, work)
        else:
            pool = multiprocessing.get_context("fork").Pool(procs, initializer=_init_worker)
            results = pool.imap_unordered(_work, work)
        try:
            for i, table in results:
                if table is not None:
                    tables[i] = table
                if after_shard is not None:
                    after_shard(i)
        finally:
            if procs > 1:
                pool.terminate()
                pool.join()
    finally:
        _JOB = None
    dt = time.perf_counter() - t0
    if shard_range is not None:
        return None, dt, len(todo)
    parts = [datasets.Dataset.from_file(str(p)) if p is not None else datasets.Dataset(InMemoryTable(tables[i]))
             for i, p in enumerate(paths)]
    out = parts[0] if n == 1 else datasets.concatenate_datasets(parts)
    out._fingerprint = fp  # the tokens' identity (the stream's fingerprint): as before the shards
    return out, dt, len(todo)
