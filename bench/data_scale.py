"""The data pipeline at corpus scale (issue 18): tokenization speed, the epoch plan's memory per
process, and the time to resume deep in an epoch.

    python -m bench.data --scale            # 1M and 10M synthetic documents, a ~60 MB text corpus
    python -m bench.data --scale --smoke    # 20k / 100k documents, a tiny corpus: seconds

- Tokenization: a synthetic JSON-lines corpus of real words, tokenized through `train.data.prepare`
  (the built-in BPE, copied from the default cache so it is not retrained) with data.num_proc=1
  and 2; tokens/s over the whole tokenization (process start-up and shard writes included).
- Memory and resume: a synthetic tokenized store of N documents (lengths from a hash, 1..2*avg-1
  tokens) written as an Arrow stream file in shards of 10000 rows, memory-mapped by `datasets`
  (what a tokenization leaves), the held-out rule of eval_fraction=0.02. Each (order, N) runs in a
  fresh process: prepare the splits (api.split_documents) and build the CD:FLM stream as the
  trainer does, take 3 batches, then load a state at 90% of the epoch and take one batch (the
  resume time). It reports the process's memory then: RSS, RssAnon (private anonymous memory: the
  arrays), RssFile (pages of the mapped file: shared by the node's processes through the page
  cache) and USS (Private_Clean + Private_Dirty of /proc/self/smaps_rollup), and Python's
  tracemalloc peak (numpy's allocations while building the plan and streaming).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SHARD = 10000
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an had they you were their one all we can her has there been if more when will would who so no time "
         "people year world state water quickly river mountain history science music garden library").split()


def write_store(path: str, n_docs: int, avg_len: int = 8, seed: int = 0) -> int:
    """An Arrow stream file of n_docs tokenized documents (input_ids list<int32>, length int32),
    in record batches of SHARD rows; returns the number of tokens."""
    import numpy as np
    import pyarrow as pa

    from train.objectives import rng

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int32())])
    total = 0
    with pa.OSFile(path, "wb") as f, pa.ipc.new_stream(f, schema) as w:
        for lo in range(0, n_docs, SHARD):
            idx = np.arange(lo, min(lo + SHARD, n_docs))
            lengths = (1 + rng.mix(seed, idx) % np.uint64(2 * avg_len - 1)).astype(np.int32)
            offsets = np.zeros(len(idx) + 1, dtype=np.int32)
            np.cumsum(lengths, out=offsets[1:])
            values = ((np.arange(offsets[-1], dtype=np.int64) + lo) % 200 + 3).astype(np.int32)
            ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
            w.write_batch(pa.record_batch([ids, pa.array(lengths)], schema=schema))
            total += int(offsets[-1])
    return total


def memory() -> dict:
    """This process's memory in MiB: rss, rss_anon, rss_file (/proc/self/status), uss (smaps_rollup)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[{"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file"}[k]] = int(v.split()[0]) / 1024
    try:
        with open("/proc/self/smaps_rollup") as f:
            priv = sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean", "Private_Dirty")))
        out["uss"] = priv / 1024
    except OSError:
        pass
    return out


def worker(store_path: str, order: str, resume_at: float = 0.9, seq_length: int = 512, G: int = 64) -> dict:
    """One (order, corpus) measurement, in this process (run it in a fresh one)."""
    import tracemalloc

    import datasets

    from train.data import DataConfig, build_stream
    from train.data.api import PreparedData, split_documents
    from train.data.corpus import held_out_mask
    from train.data.plan import HeldOutRule
    from train.data.tokenizer import load_tokenizer
    from train.objectives import ObjectiveConfig

    before = memory()
    tracemalloc.start()
    t0 = time.perf_counter()
    data = DataConfig(tokenizer="builtin-bytes", epoch_order=order, prefetch=0)
    ds = datasets.Dataset.from_file(store_path)  # memory-mapped
    n = len(ds)
    held = HeldOutRule(n, data.eval_fraction) if order == "feistel" else held_out_mask(n, data.eval_fraction)
    train, ev = split_documents(ds, held, data)
    del held
    tok, tokens = load_tokenizer(data)
    prepared = PreparedData(tok, tokens, train, ev, False)
    ocfg = ObjectiveConfig(name="flm", seq_length=seq_length)
    stream = build_stream(prepared, ocfg, "cd", global_batch_size=G, seed=data.seed, data=data)
    for _ in range(3):
        next(stream)
    t_start = time.perf_counter() - t0
    state = stream.state_dict()
    n_pos = stream.plan.n_positions
    state.update(doc_pos=int(resume_at * n_pos), piece=0, waiting=[])
    fresh = build_stream(prepared, ocfg, "cd", global_batch_size=G, seed=data.seed, data=data)
    t1 = time.perf_counter()
    fresh.load_state_dict(state)
    b = next(fresh)
    t_resume = time.perf_counter() - t1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"order": order, "documents": n, "positions": n_pos, "start_s": t_start, "resume_s": t_resume,
            "resume_at": resume_at, "tracemalloc_peak_mib": peak / 2**20, "before": before, "after": memory(),
            "batch_tokens": int(b["num_tokens"])}


def _text_corpus(path: str, docs: int, seed: int = 0) -> None:
    import numpy as np

    rs = np.random.default_rng(seed)
    words = np.array(WORDS)
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(words[rs.integers(0, len(words), int(rs.integers(50, 400)))])})
                    + "\n")


def bench_tokenize(root: str, docs: int, procs=(1, 2), tokenizer: str = "builtin-bpe") -> list[dict]:
    """tokens/s of train.data.prepare's tokenization of a synthetic text corpus, per data.num_proc."""
    import numpy as np

    from train.data import DataConfig, prepare
    from train.data.tokenizer import builtin_bpe_path

    src = os.path.join(root, "text.jsonl")
    _text_corpus(src, docs)
    rows = []
    for p in procs:
        cache = os.path.join(root, f"cache-{p}")
        if tokenizer == "builtin-bpe":  # the BPE of the default cache (trained there once), not retrained
            bpe = os.path.dirname(builtin_bpe_path(DataConfig()))
            shutil.copytree(bpe, os.path.join(cache, "tokenizers", os.path.basename(bpe)))
        cfg = DataConfig(source="files", train_files=[src], tokenizer=tokenizer, cache_dir=cache, num_proc=p,
                         shard_documents=max(1000, docs // 16))
        from train.data.corpus import load_corpus

        load_corpus(cfg)  # the datasets cache of the source file, outside the timing
        t0 = time.perf_counter()
        prep = prepare(cfg)
        dt = time.perf_counter() - t0
        n = int(np.maximum(np.asarray(prep.train.store.lengths), 0).sum())
        rows.append({"num_proc": p, "documents": prep.train.store.num_docs, "tokens": n, "seconds": dt,
                     "tokens_per_s": n / dt})
    return rows


def bench_scale(smoke: bool = False, sizes=None, text_docs: int | None = None) -> dict:
    """{'tokenize': rows per num_proc, 'plan': rows per (order, documents)}."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sizes = sizes or ((20_000, 100_000) if smoke else (1_000_000, 10_000_000))
    text_docs = text_docs or (400 if smoke else 60_000)
    out = {"tokenize": [], "plan": []}
    with tempfile.TemporaryDirectory(prefix="archscale-bench-scale-") as tmp:
        out["tokenize"] = bench_tokenize(tmp, text_docs, tokenizer="builtin-bytes" if smoke else "builtin-bpe")
        for n in sizes:
            path = os.path.join(tmp, f"store-{n}.arrow")
            write_store(path, n)
            for order in ("permutation", "feistel"):
                res = subprocess.run([sys.executable, "-m", "bench.data_scale", "--worker", path, order],
                                     capture_output=True, text=True, check=False,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                if res.returncode:
                    raise RuntimeError(f"bench.data_scale worker ({order}, {n}) failed: {res.stderr[-2000:]}")
                out["plan"].append(json.loads(res.stdout.strip().splitlines()[-1]))
            os.remove(path)
    return out


def format_scale(out: dict) -> str:
    lines = ["tokenization (train.data.prepare, synthetic text jsonl):",
             "  num_proc  documents  tokens       seconds  tokens/s"]
    for r in out["tokenize"]:
        lines.append(f"  {r['num_proc']:<8}  {r['documents']:<9}  {r['tokens']:<11,}  {r['seconds']:<7.2f}  "
                     f"{r['tokens_per_s']:,.0f}")
    lines += ["epoch plan (CD:FLM 512 x64; memory of the process after 3 batches and a resume, MiB):",
              "  order        documents   RSS     RssAnon  RssFile  USS     tracemalloc  start s  resume@90% s"]
    for r in out["plan"]:
        m = r["after"]
        lines.append(f"  {r['order']:<11}  {r['documents']:<10,}  {m['rss']:<6.0f}  {m['rss_anon']:<7.0f}  "
                     f"{m['rss_file']:<7.0f}  {m.get('uss', float('nan')):<6.0f}  {r['tracemalloc_peak_mib']:<11.1f}  "
                     f"{r['start_s']:<7.2f}  {r['resume_s']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) >= 4 and sys.argv[1] == "--worker":
    print(json.dumps(worker(sys.argv[2], sys.argv[3])))
