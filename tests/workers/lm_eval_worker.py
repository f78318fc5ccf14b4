"""The lm-eval adapter on a local model and local tasks, for tests/test_eval_parallel.py.

    python tests/workers/lm_eval_worker.py MODEL_DIR TASKS_DIR OUT.json            # one process
    accelerate launch --multi_gpu --num_processes 2 tests/workers/lm_eval_worker.py ...   # two (gloo on CPU)

Runs `lm_eval.simple_evaluate` on every task in TASKS_DIR (no download) with log_samples; the
process that gets the results (one per launch) writes the metrics and every sample's doc id and
responses to OUT.json, and each process writes OUT.json.rank-R with whether it got results
and its share (index, count) of the scoring batches.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import train.eval.lm_eval_adapter  # noqa: E402


def main(model_dir: str, tasks_dir: str, out: str) -> None:
    manager = TaskManager(include_path=tasks_dir, include_defaults=False)
    names = sorted(p.stem for p in Path(tasks_dir).glob("*.yaml"))
    lm = train.eval.lm_eval_adapter.ArchscaleLM(pretrained=model_dir, batch_size=3, device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0, log_samples=True)
    rank = os.environ.get("RANK", "0")
    shard = lm.shard
    Path(f"{out}.rank-{rank}").write_text(json.dumps({"results": res is not None,
                                                      "shard": shard and [shard.index, shard.count]}))
    if res is None:
        return
    samples = {t: [{"doc_id": s["doc_id"], "resps": s["resps"], "filtered_resps": s["filtered_resps"]} for s in ss]
               for t, ss in res["samples"].items()}
    Path(out).write_text(json.dumps({"results": res["results"], "samples": samples}, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(*sys.argv[1:4])
