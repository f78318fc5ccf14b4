"""Data loader throughput: how fast one process produces packed training batches (issue 8, "the
data loader never starves the GPU").

    python -m bench.data            # the embedded corpus (builtin BPE) at the reference shapes
    python -m bench.data --smoke    # a tiny synthetic corpus, tiny shapes: seconds, keeps this working
    python -m bench.data --scale    # corpus scale (bench/data_scale.py): tokenization, plan memory, resume

Measures the stream as the trainer builds it (`train.data.prepare` + `build_stream`, prefetch
off, one rank holding the whole global batch of 64): plan, cut, corrupt, lay out, collate.
`tokens_per_s` counts row slots (encoder + decoder for ED, padding included: what the model
consumes, the unit of bench's model rows), so a loader at N tokens/s feeds a model step of up to
N tokens/s per process without prefetching; the note gives the share of padding. One batch is
taken first (the epoch permutation and first expansion), then the best of `repeats` rounds of
`batches` batches is reported (this is CPU work on a machine that may be shared).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

# ED:MLM at 1024/1024 is T5 span corruption at noise density 0.5 (random_spans_helper(1024, 0.5, 3)
# gives targets of exactly 1024, from pieces of 1534 tokens: up to 256 spans, so 256 sentinels).
CASES = [  # name, objective overrides, arch, data overrides
    ("CD:FLM", dict(name="flm", seq_length=2048), "cd", {}),
    ("ND:PLM", dict(name="plm", seq_length=2048), "nd", {}),
    ("ED:MLM", dict(name="mlm", inputs_length=512, targets_length=114), "ed", {}),
    ("ED:MLM", dict(name="mlm", inputs_length=1024, targets_length=1024, noise_density=0.5), "ed",
     dict(num_sentinels=256)),
]
SMOKE_CASES = [
    ("CD:FLM", dict(name="flm", seq_length=128), "cd", {}),
    ("ND:PLM", dict(name="plm", seq_length=128), "nd", {}),
    ("ED:MLM", dict(name="mlm", inputs_length=98, targets_length=22), "ed", {}),
    ("ED:MLM", dict(name="mlm", inputs_length=64, targets_length=64, noise_density=0.5), "ed", {}),
]


def _lengths(kw: dict, arch: str):
    from train.objectives import ObjectiveConfig
    from train.registry import get

    return get(arch).row_lengths(ObjectiveConfig(**kw))


def _shape(kw: dict, arch: str, G: int) -> str:
    return f"{_lengths(kw, arch).text()} x{G}"


def _smoke_corpus(root: str) -> dict:
    """A few hundred synthetic documents (byte tokenizer: no BPE training)."""
    import numpy as np

    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum old tunes".split()
    rs = np.random.default_rng(0)
    path = os.path.join(root, "docs.jsonl")
    with open(path, "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rs.choice(words, size=int(rs.integers(5, 400))))}) + "\n")
    return dict(source="files", train_files=[path], tokenizer="builtin-bytes", cache_dir=os.path.join(root, "cache"))


def bench_data(smoke: bool = False, batches: int | None = None, repeats: int = 3,
               global_batch_size: int | None = None) -> list[dict]:
    """Loader throughput per case: dicts of name, shape, tokens_per_s, batches_per_s, ms_per_batch, note."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from train.data import DataConfig, build_stream, prepare
    from train.objectives import ObjectiveConfig

    batches = (3 if smoke else 20) if batches is None else batches
    G = (8 if smoke else 64) if global_batch_size is None else global_batch_size
    for what, v in (("batches", batches), ("repeats", repeats), ("global_batch_size", G)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"bench_data: {what}={v!r} must be a positive integer")
    quiet = logging.getLogger("archscale.data")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="archscale-bench-data-") as tmp:
        base = _smoke_corpus(tmp) if smoke else {}
        prepared_by = {}
        try:
            for name, okw, arch, dkw in (SMOKE_CASES if smoke else CASES):
                data = DataConfig(**(base | dkw))
                ocfg = ObjectiveConfig(**okw)
                key = json.dumps(dkw, sort_keys=True)
                if key not in prepared_by:
                    prepared_by[key] = prepare(data, ocfg)
                stream = build_stream(prepared_by[key], ocfg, arch, global_batch_size=G, seed=data.seed, data=data)
                next(stream)  # epoch permutation, first expansion
                lengths = _lengths(okw, arch)
                row_slots = lengths.encoder + lengths.decoder  # token positions of one row (ED: both)
                best, slots, all_slots, all_real = float("inf"), 0, 0, 0
                for _ in range(repeats):
                    t0, s, r = time.perf_counter(), 0, 0
                    for _ in range(batches):
                        b = next(stream)
                        s += b["input_ids"].shape[0] * row_slots
                        r += int(b["num_tokens"])
                    dt = time.perf_counter() - t0
                    all_slots, all_real = all_slots + s, all_real + r
                    if dt < best:
                        best, slots = dt, s
                rows.append({"name": name, "shape": _shape(okw, arch, G), "tokens_per_s": slots / best,
                             "batches_per_s": batches / best, "ms_per_batch": best / batches * 1e3,
                             "note": f"padding {1 - all_real / all_slots:.1%}; best of {repeats} x {batches} batches"})
        finally:
            quiet.setLevel(level)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = ["name", "shape", "tokens/s", "batches/s", "ms/batch", "note"]
    body = [[r["name"], r["shape"], f"{r['tokens_per_s']:,.0f}", f"{r['batches_per_s']:.1f}",
             f"{r['ms_per_batch']:.1f}", r["note"]] for r in rows]
    w = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(x) for c, x in zip(cells, w))  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(b) for b in body])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny synthetic corpus and shapes (seconds)")
    p.add_argument("--scale", action="store_true",
                   help="corpus scale instead (bench/data_scale.py): tokenization with 1 and 2 processes, the "
                        "epoch plan's memory per process at 1M and 10M documents, resume deep in the epoch")
    p.add_argument("--batches", type=int, default=None, help="batches per round (default 20; smoke 3)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the best is reported")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    if a.scale:
        from .data_scale import bench_scale, format_scale

        out = bench_scale(a.smoke)
        print(format_scale(out))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({**out, "smoke": a.smoke, "cpus": os.cpu_count()}, f, indent=1)
        return 0
    rows = bench_data(a.smoke, batches=a.batches, repeats=a.repeats)
    print(format_rows(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "smoke": a.smoke, "cpus": os.cpu_count()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
