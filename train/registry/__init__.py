"""What the trainer asks of an architecture: one registry entry per architecture.

The trainer never branches on the architecture's name or family; it looks up
`ARCHITECTURES[arch]` and calls what the entry gives: build a model (also on the meta device),
the tokens a batch row carries, the exact training FLOPs of a batch and the analytic FLOPs of a
row, parameter counts, and the pipeline layers. An entry is a family class (decoder.py,
encoder_decoder.py: each overrides spec.ArchSpec's family methods) with its settings; a fourth
architecture is one entry here (and its model in model_zoo/), a new family one subclass.
"""
from __future__ import annotations

from ..objectives.config import OBJECTIVES
from .decoder import DecoderSpec
from .encoder_decoder import EncoderDecoderSpec
from .spec import ArchSpec, Lengths

__all__ = ["ARCHITECTURES", "ArchSpec", "DecoderSpec", "EncoderDecoderSpec", "Lengths", "get", "padded_vocab"]

ARCHITECTURES: dict[str, ArchSpec] = {
    "cd": DecoderSpec("cd", "causal decoder", OBJECTIVES, reference_size="4.8b"),
    "nd": DecoderSpec("nd", "prefix (non-causal) decoder", OBJECTIVES, reference_size="4.8b",
                      bidirectional_prefix=True),
    # flm has no encoder input
    "ed": EncoderDecoderSpec("ed", "encoder-decoder", tuple(o for o in OBJECTIVES if o != "flm"),
                             reference_size="11b"),
}


def get(arch: str) -> ArchSpec:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n tokens, rounded up (aligned matmuls on GPUs)."""
    return -(-n // multiple) * multiple
