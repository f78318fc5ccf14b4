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

Each shard is checked before it is used (train/data/checksums.py): its size and checksum are recorded
in `shard-....arrow.sum` before the shard is renamed into place, and a shard whose size or checksum
does not match (a copy cut short, changed bytes) is named in one warning line and re-tokenized from
the source, atomically, like a missing one. The size is checked always; the checksum at every open
while the shards in question total at most VERIFY_BYTES (4 GiB: ~0.25 s from the page cache at
xxh3's 18 GB/s, a few seconds from a disk), above that by `archscale tokenize --verify` (all of them
at any size). Every process that opens the cache checks it (rank 0 first, which rebuilds; the other
ranks, after the barrier, find it whole). A shard written before the records existed is opened: if
it reads, it is trusted, and recorded now where checksums are read at this open (else by --verify);
if it does not read, it is rebuilt.

After a crash, checksums above the cap too (the crash rule). A shard can only be damaged where it
was being written: a process killed mid-write leaves only its temporary file (the rename did not
happen), but a machine that dies (a node lost, power) may keep a rename whose data never reached the
disk (the data is not fsynced before the rename: zeros, or a shorter file, under the right name and
record). So every process that writes shards first puts a marker beside them,
`.writing-HOST-PID.json` ({host, pid, boot id, started, the shards it will write}), and removes it
when it stops writing, normally or by an exception. A marker whose writer is not running is an
unclean end: on this machine, its boot id is another boot's or its pid is gone. The next open
checksums the shards that marker lists, whatever VERIFY_BYTES (rebuilding the bad ones, as above,
after one warning line naming the tokenization that did not end cleanly), then removes it, once every
shard was checked (an open of part of the shards, a job-array task, leaves it). A writer on another
machine cannot be asked whether it runs: its shards are checked at every open while its marker is
there, and `archscale tokenize --verify` (every checksum) removes it. A training run that dies does
not need the rule: it only reads shards (what it writes, rank 0's tokenization at start-up, is under
a marker). The cost is one read of the shards the crashed writer listed (0.5-1 s per GB from a
disk at 1-2 GB/s).

A shard to re-tokenize (missing, corrupt) whose source files are gone (`datasets`' Arrow cache of
the data files, which the shards are re-tokenized from: the pool's workers open it by name) is one
line naming the shard, the file and the fix (restore the source or a whole copy of the cache).
There is no other way to a cache without its source: it is found by the source's fingerprint, so a
`data.train_files` that matches nothing, or a hub dataset neither cached nor reachable, is refused
at load (one line) before any shard is looked up.

Processes: `data.num_proc` (0 = one per core this process may run on, os.sched_getaffinity), at
most one per shard left to do; one process (or one shard) tokenizes in this process, no pool.
The pool's workers start from multiprocessing's fork server, a clean single-threaded process, and
never by forking this one: by the time it tokenizes, this process has native threads (Arrow's
jemalloc background thread, its I/O pool, tqdm's monitor), and a fork taken while one of them holds
a lock leaves the child waiting on it for ever (seen once in CI: one Slurm array task of three hung
after "tokenizing 3 with 2 process(es)"). The job (dataset, tokenize function, features) is pickled
to each worker once, at its start; a memory-mapped dataset pickles as its file paths.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..atomic import atomic_path, atomic_write_text
from . import checksums

log = logging.getLogger("archscale.data")
BATCH = 256  # documents per tokenizer call (the batch does not change the tokens)
_JOB = None  # (ds, fn, features, size, n_docs): set here, and in each pool worker by _init_worker
after_shard = None  # tests: called with the shard index after each shard this process wrote
VERIFY_BYTES: int | None = 4 << 30  # checksums at open up to this many bytes of shards; None = always


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
        checksums.write_record(path, tmp)  # before the rename: a shard that exists has its record


def _work(args):
    i, path = args
    if path is None:
        return i, _tokenize_shard(i)
    _write_shard(i, Path(path))
    return i, None


def _init_worker(job):
    global _JOB
    _JOB = job
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the pool is the parallelism
    # the pool is terminated (SIGTERM) when a shard fails or the caller is interrupted: exit through
    # Python, so the shard being written removes its temporary file (atomic_path)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))


def _readable(path: Path) -> str | None:
    """None when the Arrow file opens (its headers and record batches are where they claim); else why."""
    import datasets
    import pyarrow as pa

    try:
        datasets.Dataset.from_file(str(path))
    except (OSError, ValueError, pa.ArrowException) as e:
        return f"it does not read as Arrow: {' '.join(str(e).split())[:120]}"
    return None


def _problem(path: Path, content: bool, unrecorded: list) -> str | None:
    """None when the shard at path is there and whole (its record: size, and checksum when `content`);
    else what is wrong ("missing" when it is not there). A shard with no record (written before records
    existed) is trusted if it reads, appended to `unrecorded`, and recorded now when `content`
    (recording reads the whole file, as a check would)."""
    if not path.exists():
        return "missing"
    if checksums.has_record(path):
        return checksums.problem(path, content)
    why = _readable(path)
    if why is None:
        unrecorded.append(path)
        if content:
            checksums.write_record(path)
    return why


def _need_source(ds, path: Path, why: str, what: str) -> None:
    """A shard is re-tokenized from the source dataset's files (memory-mapped; the pool's workers open
    them again by name): where one of them is gone, the shard cannot be rebuilt: one line, not a
    traceback from a worker. (The tokenized cache is found by the source's fingerprint, so the source
    was there when it was loaded; this is the window after, e.g. `datasets`' cache of the source
    files deleted under a run.)"""
    gone = [f["filename"] for f in ds.cache_files if not os.path.exists(f["filename"])]
    if gone:
        raise ValueError(f"{what}: cached shard {path} must be re-tokenized ({why}) but its source {gone[0]} is "
                         f"gone; restore the source (run again: data.train_files are read into it again) or a "
                         f"whole copy of the cache (the shard and its {path.name}{checksums.SUFFIX})")


MARK = ".writing-"  # CACHE/tokenized/FP-sS/.writing-HOST-PID.json: a writer at work there (crash rule)


def _boot_id() -> str:
    """This boot of this machine (Linux): a pid of an earlier boot names no process of this one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@contextmanager
def _writing(d: Path | None, todo: list[int], tag: str = ""):
    """A marker in the shard directory for as long as this process writes the shards `todo` there,
    removed when the block ends (normally or by an exception: Python ran its cleanup). A marker that
    outlives its writer means that writer ended uncleanly (SIGKILL, OOM, a node that died, power lost),
    and its shards are checksummed at the next open, whatever the cache's size (_crashed)."""
    if d is None or not todo:
        yield
        return
    import json
    import socket

    d.mkdir(parents=True, exist_ok=True)
    host, pid = socket.gethostname(), os.getpid()
    mark = d / f"{MARK}{host}-{pid}{tag}.json"
    atomic_write_text(mark, json.dumps({"host": host, "pid": pid, "boot": _boot_id(),
                                                  "started": time.time(), "shards": todo}) + "\n")
    try:
        yield
    finally:
        mark.unlink(missing_ok=True)


def _crashed(d: Path | None, lo: int, hi: int, everything: bool) -> tuple[set[int], list[Path]]:
    """(shards to checksum at this open whatever VERIFY_BYTES, markers to remove once they are checked):
    the shards in [lo, hi) listed by every marker in d whose writer is not known to be running (a
    marker that lists none of them is left for an open that reads them). A writer on this
    machine runs iff the marker's boot is this boot and its pid is alive: else it ended uncleanly, and
    its marker is removed after the check. One on another machine cannot be asked: its shards are
    checked at every open while its marker is there (a writer still at work leaves it until it ends),
    and it is removed only when `everything` (`archscale tokenize --verify`: every checksum read)."""
    import json
    import socket

    if d is None or not d.is_dir():
        return set(), []
    suspect, stale = set(), []
    here, boot = socket.gethostname(), _boot_id()
    for mark in sorted(d.glob(f"{MARK}*.json")):
        try:
            rec = json.loads(mark.read_text())
            host, pid, shards = str(rec["host"]), int(rec["pid"]), [int(i) for i in rec["shards"]]
        except (OSError, ValueError, KeyError, TypeError):  # a marker cut short by the crash itself: all
            rec, host, pid, shards = {}, "", 0, list(range(lo, hi))
        shards = [i for i in shards if lo <= i < hi]
        if not shards:
            continue
        if host == here and rec.get("boot") == boot and _alive(pid):
            continue  # a writer at work on this machine (this process, another rank, an array task)
        elsewhere = bool(host) and host != here
        log.warning("tokenized cache %s: a tokenization (%s pid %s, shards %s) %s; checking the checksums of the "
                    "shards it wrote", d, host or "?", pid or "?", _ranges(shards),
                    "on another machine is running or did not end cleanly" if elsewhere else "did not end cleanly")
        suspect.update(shards)
        if everything or not elsewhere:
            stale.append(mark)
    return suspect, stale


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _ranges(ids: list[int]) -> str:
    return f"{min(ids)}..{max(ids)} ({len(ids)})" if ids else "none"


def _check_contents(paths: list[Path | None]) -> bool:
    """Whether the checksums of these shards are read at this open (VERIFY_BYTES)."""
    if VERIFY_BYTES is None:
        return True
    total = sum(p.stat().st_size for p in paths if p is not None and p.exists())
    if total > VERIFY_BYTES:
        log.info("tokenized cache: %.1f GB of shards, over the %.1f GB checked at every open: sizes checked, "
                 "checksums by `archscale tokenize --verify`", total / 1e9, VERIFY_BYTES / 1e9)
    return total <= VERIFY_BYTES


def _tokenize(todo: list[int], paths: list[Path | None], procs: int) -> dict:
    """Tokenize the shards `todo` (_JOB set): written to their paths, or returned {i: Table} in memory."""
    tables = {}
    work = [(i, None if paths[i] is None else str(paths[i])) for i in todo]
    if procs == 1:
        results = map(_work, work)
    else:
        pool = multiprocessing.get_context("forkserver").Pool(procs, initializer=_init_worker, initargs=(_JOB,))
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
    return tables


def _open(i: int, path: Path, what: str):
    """Shard i memory-mapped; one that does not read (a header broken in a cache too large for checksums
    at open) is named and re-tokenized here (_JOB set), then opened."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_file(str(path))
    except (OSError, ValueError, pa.ArrowException) as e:
        why = f"it does not read as Arrow: {' '.join(str(e).split())[:120]}"
    _need_source(_JOB[0], path, why, what)
    log.warning("%s: cached shard %s is corrupt (%s); re-tokenizing it from the source", what, path, why)
    with _writing(path.parent, [i], tag="-open"):
        _write_shard(i, path)
    return datasets.Dataset.from_file(str(path))


def run(ds, fn, features, fields, fp: str, cfg, what: str, shard_range: tuple[int, int] | None = None):
    """Tokenize ds (fn: batch, indices -> columns) in shards. Returns (the concatenated Dataset, or
    None when only `shard_range` (A, B) was asked for: a job-array task writes those shards and reads
    nothing; seconds spent tokenizing; shards tokenized now). Cached shards are checked first (the
    module docstring); a corrupt one is tokenized again like a missing one."""
    import datasets
    from datasets.table import InMemoryTable

    global _JOB
    ds = ds.select_columns(fields)
    n_docs, size = len(ds), cfg.shard_documents
    n = num_shards(n_docs, size)
    on_disk = bool(ds.cache_files)  # an in-memory dataset (tests) is tokenized in memory, not cached
    d = shard_dir(cfg, fp) if on_disk else None
    paths = shard_paths(d, n) if on_disk else [None] * n
    lo, hi = shard_range or (0, n)
    content = _check_contents(paths[lo:hi])
    suspect, stale = _crashed(d, lo, hi, VERIFY_BYTES is None)  # shards of a writer that ended uncleanly
    unrecorded, todo = [], []
    for i in range(lo, hi):
        why = "in memory" if paths[i] is None else _problem(paths[i], content or i in suspect, unrecorded)
        if why is None:
            continue
        todo.append(i)
        if paths[i] is not None:
            _need_source(ds, paths[i], why, what)
            if why != "missing":
                log.warning("%s: cached shard %s is corrupt (%s); re-tokenizing it from the source", what, paths[i],
                            why)
    if unrecorded:
        log.info("%s: %d cached shard(s) have no checksum record (written before records existed, e.g. %s): they "
                 "read, so they are trusted%s", what, len(unrecorded), unrecorded[0],
                 "; records written now" if content else "; `archscale tokenize --verify` records them")
    done = (hi - lo) - len(todo)
    procs = min(processes(cfg.num_proc), len(todo)) or 1
    if todo:
        log.info("%s: %d documents, shards %d:%d of %d (%d documents each): %d already done, tokenizing %d "
                 "with %d process(es)", what, n_docs, lo, hi, n, size, done, len(todo), procs)
    t0 = time.perf_counter()
    _JOB = (ds, fn, features, size, n_docs)
    try:
        with _writing(d, todo):
            tables = _tokenize(todo, paths, procs)
        dt = time.perf_counter() - t0
        if lo == 0 and hi == n:  # every shard a stale marker lists was checked (and rebuilt if bad)
            for mark in stale:
                mark.unlink(missing_ok=True)
        if shard_range is not None:
            return None, dt, len(todo)
        parts = [datasets.Dataset(InMemoryTable(tables[i])) if p is None else _open(i, p, what)
                 for i, p in enumerate(paths)]
    finally:
        _JOB = None
    out = parts[0] if n == 1 else datasets.concatenate_datasets(parts)
    out._fingerprint = fp  # the tokens' identity (the stream's fingerprint): as before the shards
    return out, dt, len(todo)
