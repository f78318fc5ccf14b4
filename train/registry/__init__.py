"""What the trainer asks of an architecture: one registry entry per architecture.

The trainer never branches on the architecture's name or family; it looks up
`ARCHITECTURES[arch]` once and hands the entry on. An entry is a family class (decoder.py,
encoder_decoder.py: each names its model_zoo model class and overrides spec.ArchSpec's family
methods) with its settings, among them `model_options`, the config settings that make it what it
is. A variant is one line here (docs/design.md, "Adding an architecture": eds); a new family one
subclass and its model in model_zoo/.
"""
from __future__ import annotations

from .decoder import DecoderSpec
from .encoder_decoder import EncoderDecoderSpec
from .spec import ArchSpec, Lengths

__all__ = ["ARCHITECTURES", "ArchSpec", "DecoderSpec", "EncoderDecoderSpec", "Lengths", "entry_of", "get", "padded_vocab"]

ARCHITECTURES: dict[str, ArchSpec] = {
    "cd": DecoderSpec("cd", "causal decoder", reference_size="4.8b"),
    "nd": DecoderSpec("nd", "prefix (non-causal) decoder", reference_size="4.8b",
                      model_options={"prefix_attention": True}),
    "ed": EncoderDecoderSpec("ed", "encoder-decoder", reference_size="11b"),
    # ED whose decoder block i runs encoder block i's self-attention and MLP (a decoder-only model's
    # parameters plus cross-attention); not in the reference experiment, so no reference_size
    "eds": EncoderDecoderSpec("eds", "encoder-decoder with shared encoder/decoder weights",
                              model_options={"share_encoder_decoder": True}),
}


def get(arch: str) -> ArchSpec:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def entry_of(config) -> ArchSpec:
    """The entry a model_zoo config is an instance of, by its class and fields (never its label):
    of the entries whose config_class it is and whose every model_option it holds, the one that
    fixes the most (a shared-weights ED config is eds, a plain one ed; prefix_attention makes nd).
    For code handed a config alone (the pipeline's layer plan, the planner's shapes); a caller
    that knows the run's entry passes that instead."""
    fits = [s for s in ARCHITECTURES.values() if isinstance(config, s.config_class)
            and all(getattr(config, k, None) == v for k, v in s.model_options.items())]
    if not fits:
        raise ValueError(f"{type(config).__name__} matches no registry entry; "
                         f"the entries: {', '.join(ARCHITECTURES)}")
    return max(fits, key=lambda s: len(s.model_options))


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n tokens, rounded up (aligned matmuls on GPUs)."""
    return -(-n // multiple) * multiple
