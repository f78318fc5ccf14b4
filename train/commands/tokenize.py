"""`archscale tokenize CONFIG [a.b=c ...]`: tokenize a run's data ahead of training, here or as a
Slurm job array over shard ranges (the shards: train/data/shards.py; docs/data.md).

    archscale tokenize CONFIG [a.b=c ...]                      every shard (train and eval), here
    archscale tokenize CONFIG [a.b=c ...] --shard-range A:B    shards A..B-1 of the training data
    archscale tokenize CONFIG [a.b=c ...] --submit [--shards-per-task K] [--dry-run] [slurm options]
    archscale tokenize CONFIG [a.b=c ...] --verify                   also every cached shard's checksum

`--submit` reads the corpus once here (its document count gives the number of shards; the datasets
Arrow cache is built here, once) and submits one array task per K shards; each task runs this
command with its `--shard-range`. Shards already written are skipped everywhere, so a killed run
or a resubmission only tokenizes what is missing, and the training run finds every shard cached.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from slurm.cli import _resource_args

    p = argparse.ArgumentParser(prog="archscale tokenize", description="Tokenize a run's data into cached shards, "
                                "here or as a Slurm job array over shard ranges.")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] a.b=c", help="the run's config and overrides (as for train)")
    p.add_argument("--shard-range", metavar="A:B", help="only shards A..B-1 of the training data (B is capped at the "
                   "number of shards); what each array task runs")
    p.add_argument("--submit", action="store_true", help="submit a Slurm job array, one task per --shards-per-task shards")
    p.add_argument("--shards-per-task", type=int, default=8, metavar="K", help="--submit: shards per array task (default 8)")
    p.add_argument("--concurrency", type=int, default=None, help="--submit: at most this many tasks at once")
    p.add_argument("--dry-run", action="store_true", help="--submit: print the array script, submit nothing")
    p.add_argument("--verify", action="store_true", help="check every cached shard's checksum, whatever the cache's "
                   "size (an open checks them up to shards.VERIFY_BYTES), and re-tokenize a bad one")
    _resource_args(p)
    return p


def _documents(data):
    """(dataset, tokenizer, tokenize function, what) of the training data, as prepare reads it."""
    from ..data.corpus import expand_files, load_corpus
    from ..data.multitask import load_multitask
    from ..data.tokenize import tokenize_dataset, tokenize_prompted
    from ..data.tokenizer import load_tokenizer

    tok, _ = load_tokenizer(data)
    if data.format == "multitask":
        return load_multitask(expand_files(data.train_files, "train_files"), data.resolved_cache_dir()), tok, \
            tokenize_prompted, "train_files"
    ds = load_corpus(data)[0]
    return ds, tok, tokenize_dataset, "embedded corpus" if data.source == "embedded" else "train data"


def main(argv: list[str]) -> int:
    p = _parser()
    a = p.parse_args(argv)
    from ..config import ConfigError, load_config, split_config_args

    def fail(msg) -> int:
        print(f"{p.prog}: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2

    if a.shard_range and a.submit:
        return fail("--shard-range and --submit do not go together: --submit gives each array task its own range")
    if a.shards_per_task < 1:
        return fail(f"--shards-per-task={a.shards_per_task} must be at least 1")
    path, overrides = split_config_args(a.args)
    try:
        data = load_config(path, overrides).data
    except (ConfigError, ValueError, FileNotFoundError) as e:
        return fail(e)
    from ..data import shards

    verify_bytes = shards.VERIFY_BYTES
    if a.verify:
        shards.VERIFY_BYTES = None  # every checksum (train/data/shards.py), for this command only
    t0 = time.perf_counter()
    try:
        if a.submit:
            return _submit(a, path, overrides, data, fail)
        if a.shard_range is None:
            from ..data import prepare

            prep = prepare(data)
            docs = prep.train.store.num_docs
            print(json.dumps({"documents": docs, "shards": shards.num_shards(docs, data.shard_documents),
                              "seconds": round(time.perf_counter() - t0, 2)}))
            return 0
        ds, tok, tokenize, what = _documents(data)
        n = shards.num_shards(len(ds), data.shard_documents)
        lo, hi = shards.parse_range(a.shard_range, n)
        tokenize(ds, tok, data, what, shard_range=(lo, hi))
    except (ValueError, FileNotFoundError) as e:
        return fail(e)
    finally:
        shards.VERIFY_BYTES = verify_bytes
    print(json.dumps({"shards": f"{lo}:{hi}", "of": n, "seconds": round(time.perf_counter() - t0, 2)}))
    return 0


def _submit(a, path, overrides, data, fail) -> int:
    from slurm import cluster
    from slurm.cli import _resources
    from slurm.cluster import SlurmError
    from slurm.render import render_tokenize

    from ..data import shards

    ds, _, _, _ = _documents(data)
    n = shards.num_shards(len(ds), data.shard_documents)
    tasks = -(-n // a.shards_per_task)
    config = [str(Path(path).absolute())] if path is not None else []
    command = [sys.executable, "-m", "train", "tokenize", *config, *overrides, *(["--verify"] if a.verify else [])]
    log_dir = Path(data.resolved_cache_dir()) / "tokenized" / "slurm"
    res = _resources(a)
    try:
        script = render_tokenize(command, tasks, a.shards_per_task, res, log_dir=log_dir,
                                 concurrency=a.concurrency)
        if a.dry_run:
            print(script, end="")
            print(f"# {len(ds)} documents, {n} shard(s) of {data.shard_documents}, {tasks} task(s)")
            return 0
        cluster.check_resources(res)
        log_dir.mkdir(parents=True, exist_ok=True)
        script_path = log_dir / f"tokenize-{time.strftime('%Y%m%d-%H%M%S')}.sh"
        script_path.write_text(script)
        job_id = cluster.sbatch(script_path)
    except (SlurmError, ValueError, OSError) as e:
        return fail(e)
    print(job_id)
    print(f"submitted array {job_id} ({tasks} task(s) over {n} shard(s)): {script_path}", file=sys.stderr)
    return 0
