"""Pretraining objectives as pure transforms (no deepspeed, no torch.distributed).

    from train.objectives import ObjectiveConfig, build_objective, collate
    obj = build_objective(ObjectiveConfig(name="mlm"), arch=registry.get("nd"), tokens=token_info)
    ex = obj.make(piece_tokens, variant=0, word=w)        # Example(inputs, targets)
    batch = collate([[ex, ...], ...], obj.shape, token_info)

`train.data` drives these for a whole corpus (cutting, packing, sharding, resuming).
"""
# Names resolve lazily (PEP 562): `train.objectives.config` is read by the run config, which
# `archscale submit` loads on a login node without torch.
from importlib import import_module

_WHERE = {"COUNT_KEYS": "batch", "DecoderLayout": "rows", "DecoderRows": "rows", "DenoiserConfig": "config", "EncoderDecoderLayout": "rows", "EncoderDecoderRows": "rows", "Example": "core", "IGNORE": "batch", "MIN_PIECE": "rows", "OBJECTIVES": "config", "Objective": "core", "ObjectiveConfig": "config", "RowShape": "rows", "TokenInfo": "core", "build_objective": "core", "check_objective_config": "core", "collate": "batch", "collate_decoder": "batch", "collate_encoder_decoder": "batch", "ContinuationRequest": "scoring", "continuation_request": "scoring", "scoring_way": "scoring", "default_ul2_denoisers": "config", "make_prompted": "core", "merge_by_sentinels": "span_corruption", "noise_span_to_unique_sentinel": "span_corruption", "nonnoise_span_to_unique_sentinel": "span_corruption", "pop_counts": "batch", "prompted_lengths": "core", "random_spans_helper": "span_corruption", "random_spans_noise_mask": "span_corruption", "span_corrupt": "span_corruption", "span_corruption_lengths": "span_corruption"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
