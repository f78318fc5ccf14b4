"""Runs of the real trainer in one multi-process launch, for resumes across layouts.

Run under `torchrun --standalone --nproc_per_node=N tests/workers/resume_worker.py SPEC.json`
(CPU, gloo; DS_ACCELERATOR=cpu). SPEC.json is a list of runs, done in order:

    [{"overrides": ["run_dir=...", ...],   # as `archscale train a.b=c ...`
      "copy_from": "/path",                # optional: first copy this run directory to run_dir
      "max_steps_now": 2,                  # optional: stop after 2 steps of this invocation
      "copy_to": "/path",                  # optional: afterwards copy run_dir there
      "expect_error": true},               # optional: the run must refuse; its message goes to RUN_DIR/error.txt
     ...]

tests/workers/trainer_worker.py is the same without the copies before a run and the refusals;
this one serves tests/test_pipeline_dp.py, tests/test_offload.py and tests/test_resume_matrix.py,
whose resumed runs start from a copy of a checkpointed run made earlier in the same launch (or
in an earlier launch with another number of processes). Rank 0 appends one line per run to
`SPEC.json.times` (run directory, seconds, the error if any).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from train.engine import runtime as eng  # noqa: E402
from train.config import load_config  # noqa: E402
from train.trainer.loop import train  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    dist = eng.setup_distributed()
    for run in spec:
        cfg = load_config(None, run["overrides"])
        if run.get("copy_from") and dist.is_rank0:
            if os.path.exists(cfg.run_dir):
                shutil.rmtree(cfg.run_dir)
            shutil.copytree(run["copy_from"], cfg.run_dir)
        eng.barrier()
        t = time.perf_counter()
        error = None
        try:
            train(cfg, max_steps_now=run.get("max_steps_now"))
        except Exception as e:  # noqa: BLE001 - a refusal is raised alike on every rank, before any collective
            if not run.get("expect_error"):
                raise
            error = f"{type(e).__name__}: {e}"
        if run.get("expect_error") and dist.is_rank0:
            with open(os.path.join(cfg.run_dir, "error.txt"), "w") as f:
                f.write(error if error is not None else "no error")
        if dist.is_rank0:
            with open(spec_path + ".times", "a") as f:
                f.write(json.dumps({"run_dir": str(cfg.run_dir), "seconds": round(time.perf_counter() - t, 2),
                                    "world_size": dist.world_size, "error": error}) + "\n")
        eng.barrier()
        if run.get("copy_to") and dist.is_rank0:
            if os.path.exists(run["copy_to"]):
                shutil.rmtree(run["copy_to"])
            shutil.copytree(cfg.run_dir, run["copy_to"])
        eng.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
