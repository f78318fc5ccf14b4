"""The common yardstick at the trainer's eval steps (train/eval/yardstick.py holds the measure).

Before the first step, rank 0 writes RUN_DIR/heldout.json: how the held-out split was chosen,
its documents, and the yardstick's windows (their fingerprint: cells with the same one were
scored on the same tokens). At each evaluation every rank scores the same windows with its own
copy of the model (ZeRO-3 gathers parameters in the forward, so every rank must run it), and the
eval line of metrics.jsonl carries the headline numbers (RUN_DIR/yardstick.json the latest
evaluation in full, per-window scores included) (`yardstick_nats`, `yardstick_bpb`,
`zero_shot_acc`, `zero_shot_se`, and `tasks_acc` / `tasks_se` with eval.task_files).
Where a rank holds one pipeline stage, not the whole model (the engine's `whole_model` is None),
the yardstick is `archscale eval` on the run's checkpoints.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

log = logging.getLogger("archscale.train")
HELDOUT_FILE = "heldout.json"
YARDSTICK_FILE = "yardstick.json"  # the latest evaluation's full result


def heldout_record(prepared, data_cfg, ys=None, skipped: str = "") -> dict:
    """What RUN_DIR/heldout.json holds: the split, its documents, the yardstick's windows."""
    from ..eval.yardstick import split_description

    ev = prepared.eval
    doc_ids = [] if ev is None else ev.doc_ids.tolist()
    rec = {"split": split_description(data_cfg) if ev is not None else "none (no eval split)",
           "eval_documents": len(doc_ids), "train_documents": int(len(prepared.train.doc_ids)),
           "eval_doc_ids": doc_ids if len(doc_ids) <= 100_000 else f"{len(doc_ids)} ids (not listed)",
           "same_store": ev is not None and ev.store is prepared.train.store}
    rec["yardstick"] = ys.describe() if ys is not None else {"skipped": skipped}
    return rec


def prepare_yardstick(t) -> Optional[tuple]:
    """(Yardstick, task records) of this run, or None (off, no document split, no whole model here);
    writes RUN_DIR/heldout.json on rank 0. A bad task file stops the run here, before step one."""
    from ..atomic import atomic_write_text
    from ..eval.tasks import read_task_file
    from ..eval.yardstick import build_yardstick

    cfg = t.cfg
    ys, skipped = None, ""
    if not cfg.eval.yardstick:
        skipped = "eval.yardstick=false"
    elif t.engine.whole_model is None:
        skipped = "a pipeline run: score its checkpoints with `archscale eval`"
    elif t.prepared.eval is None or t.prepared.prompted:
        skipped = "no held-out split of documents (set data.eval_fraction > 0 or data.eval_files)"
    else:
        try:
            ys = build_yardstick(t.prepared, cfg.eval, cfg.data)
        except ValueError as e:
            skipped = str(e)
    records = [r for f in cfg.eval.task_files for r in read_task_file(f)]
    if skipped and cfg.eval.yardstick:
        log.warning("no yardstick in this run: %s", skipped)
    if t.dist.is_rank0:
        atomic_write_text(t.layout.root / HELDOUT_FILE,
                          json.dumps(heldout_record(t.prepared, cfg.data, ys, skipped), indent=1) + "\n")
    return None if ys is None else (ys, records)


def score_now(t, prepared: Optional[tuple]) -> tuple[Optional[dict], dict]:
    """(the yardstick's result, its flat metrics) of the model now; (None, {}) without one."""
    from ..eval.yardstick import evaluate_model, flat_metrics

    if prepared is None:
        return None, {}
    ys, records = prepared
    res = evaluate_model(t.engine.whole_model, t.arch, ys, t.cfg.objective, t.prepared.tokenizer, t.prepared.tokens,
                         batch_size=t.cfg.eval.score_batch_size, task_records=records)
    if t.dist.is_rank0:  # the latest evaluation in full (per-window scores: the intervals of a comparison)
        from ..atomic import atomic_write_text

        atomic_write_text(t.layout.root / YARDSTICK_FILE, json.dumps({"step": t.step, "tokens_seen": t.tokens_seen,
                                                                      "flops": t.flops, **res}) + "\n")
    return res, flat_metrics(res)
