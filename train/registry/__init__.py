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

__all__ = ["ARCHITECTURES", "ArchSpec", "DecoderSpec", "EncoderDecoderSpec", "Lengths", "get", "padded_vocab"]

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


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n tokens, rounded up (aligned matmuls on GPUs)."""
    return -(-n // multiple) * multiple
