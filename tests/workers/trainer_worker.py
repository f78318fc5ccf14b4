"""Several runs of the real trainer (`train.trainer.loop.train`) in one multi-process launch.

Run under `torchrun --standalone --nproc_per_node=N tests/workers/trainer_worker.py SPEC.json`
(CPU, gloo; DS_ACCELERATOR=cpu). SPEC.json is a list of runs, done in order:

    [{"overrides": ["run_dir=...", "parallel.zero_stage=1", ...],   # as `archscale train a.b=c ...`
      "max_steps_now": 3,                                           # optional: stop after 3 steps
      "result": true,                                               # optional: write RUN_DIR/result.json
      "copy_to": "/path"},                                          # optional: then copy run_dir there
     ...]

A launch costs ~10 s of imports and rendezvous, a run of a few debug-size steps well under that,
so tests/test_trainer.py puts all its multi-process runs into one launch. Each run writes its own
run directory (metrics.jsonl, checkpoints); the test asserts on those. Every rank also writes
`RUN_DIR/rows-rank{r}.json`: a digest of the rows of each global batch its data stream yields,
built exactly as train() builds it, so the test can check that the ranks split each global batch.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from train.engine import runtime as eng  # noqa: E402
from train.config import load_config  # noqa: E402
from train.trainer.loop import train  # noqa: E402


def row_digests(cfg, dist, n_batches: int) -> list[list[str]]:
    """sha1 of each row's input_ids, per batch, of this rank's stream (as train() builds it)."""
    from train.data import build_stream, prepare
    from train.objectives import pop_counts

    prepared = prepare(cfg.data, cfg.objective)
    glob = cfg.parallel.micro_batch_size * (cfg.parallel.gradient_accumulation_steps or 1) * dist.world_size
    stream = build_stream(prepared, cfg.objective, cfg.model.arch, global_batch_size=glob, rank=dist.rank,
                          world_size=dist.world_size, seed=cfg.data.seed, data=cfg.data)
    out = []
    for _ in range(n_batches):
        b = next(stream)
        pop_counts(b)
        out.append([hashlib.sha1(r.numpy().tobytes()).hexdigest()[:16] for r in b["input_ids"]])
    return out


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    dist = eng.setup_distributed()
    for run in spec:
        t = time.perf_counter()
        cfg = load_config(None, run["overrides"])
        result = train(cfg, max_steps_now=run.get("max_steps_now"))
        if run.get("result") and dist.is_rank0:  # what `archscale compare` keeps of a run
            with open(os.path.join(cfg.run_dir, "result.json"), "w") as f:
                json.dump(vars(result), f)
        if dist.is_rank0:
            print(f"trainer_worker: {cfg.run_dir} zero {cfg.parallel.zero_stage}: {time.perf_counter() - t:.1f}s",
                  flush=True)
        eng.barrier()
        if run.get("rows"):
            rows = row_digests(cfg, dist, run["rows"])
            with open(os.path.join(cfg.run_dir, f"rows-rank{dist.rank}.json"), "w") as f:
                json.dump(rows, f)
        if run.get("copy_to") and dist.is_rank0:
            shutil.copytree(cfg.run_dir, run["copy_to"])
        eng.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
