"""Pretraining objectives as pure transforms (no deepspeed, no torch.distributed).

    from train.objectives import ObjectiveConfig, build_objective, collate
    obj = build_objective(ObjectiveConfig(name="mlm"), arch="nd", tokens=token_info)
    ex = obj.make(piece_tokens, variant=0, word=w)        # Example(inputs, targets)
    batch = collate([[ex, ...], ...], obj.shape, token_info)

`train.data` drives these for a whole corpus (cutting, packing, sharding, resuming).
"""
from .collate import COUNT_KEYS, IGNORE, collate, collate_decoder, collate_encoder_decoder, pop_counts
from .config import ARCHS, OBJECTIVES, DenoiserConfig, ObjectiveConfig, default_ul2_denoisers
from .core import (MIN_PIECE, Example, Objective, RowShape, TokenInfo, build_objective, make_prompted,
                   prompted_lengths, row_shape)
from .span_corruption import (merge_by_sentinels, noise_span_to_unique_sentinel, nonnoise_span_to_unique_sentinel,
                              random_spans_helper, random_spans_noise_mask, span_corrupt, span_corruption_lengths)

__all__ = [
    "ARCHS", "COUNT_KEYS", "IGNORE", "MIN_PIECE", "OBJECTIVES", "DenoiserConfig", "Example", "Objective",
    "ObjectiveConfig", "RowShape", "TokenInfo", "build_objective", "collate", "collate_decoder",
    "collate_encoder_decoder", "default_ul2_denoisers", "make_prompted", "merge_by_sentinels",
    "noise_span_to_unique_sentinel", "nonnoise_span_to_unique_sentinel", "pop_counts", "prompted_lengths",
    "random_spans_helper", "random_spans_noise_mask", "row_shape", "span_corrupt", "span_corruption_lengths",
]
