"""The held-out batches: what the trainer's held-out loss and `archscale eval`'s score (this rank's
rows of the eval split's first global batches, as micro-batches). Below both, so the trainer
does not import evaluation.
"""
from __future__ import annotations


def heldout_batches(prepared, cfg, *, global_batch_size: int, micro_batch_size: int, max_batches: int,
                    rank: int = 0, world_size: int = 1, data=None) -> tuple[list[dict], int]:
    """What the held-out loss scores: this rank's rows of the eval split's first `max_batches`
    global batches of `global_batch_size` rows (packed as the trainer packs them, with the run's
    objective, architecture and data seed, which draws PLM splits / MLM noise), counts removed,
    in micro-batches of `micro_batch_size` rows; and the number of global batches. The trainer
    (train/trainer/callbacks.py, through its engine's `held_out_loss`) and train/eval/evaluate.py's
    `heldout_loss` both score these (`engine.runtime.eval_loss` for an unpipelined model)."""
    from ..data import build_stream
    from ..engine.runtime import split_micro
    from ..objectives import pop_counts

    data = data or cfg.data
    stream = build_stream(prepared, cfg.objective, cfg.model.arch, global_batch_size=global_batch_size,
                          rank=rank, world_size=world_size, seed=data.seed, split="eval", data=data)
    micro, n = [], 0
    for batch in stream:
        if n >= max_batches:
            break
        pop_counts(batch)
        micro.extend(split_micro(batch, micro_batch_size))
        n += 1
    return micro, n
