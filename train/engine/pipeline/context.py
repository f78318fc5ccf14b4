"""Mask contexts of a pipeline stage: rebuilt from the carry's per-token tensors with model_zoo's
own `Stack.build_context`, once per stack, stage and micro-batch (`ContextCache`)."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable, Mapping, Optional, Sequence

from torch import Tensor

from model_zoo.blocks import Stack, StackContext
from model_zoo.masks import PositionBias

from ...registry.layers import DECODER, ED_DECODER, ENCODER, StackKind  # noqa: F401  (the stacks, re-exported)


class _StackView:
    """What model_zoo's `Stack.build_context` reads of its stack (config, causal, the number of
    layers, rel_bias), without the stack's layers: a stage holds only some of them. Its
    `rel_bias` returns a PositionBias without a table; the table arrives as an activation and is
    put in per layer (so its gradient flows to whichever tensor this stage received)."""

    layer_directions = Stack.layer_directions
    build_context = Stack.build_context

    def __init__(self, config, causal: bool, n_layers: int):
        self.config, self.causal, self.layers = config, causal, range(n_layers)

    def rel_bias(self, positions: Tensor, offset: int) -> PositionBias:
        return PositionBias(table=None, positions=positions, offset=offset, span=self.config.rel_max_distance)


def _storage_key(t: Optional[Tensor]):
    """Identity of a tensor's contents: its memory, layout and version (views and detached copies
    of the same tensor agree). Valid while the cache holds a reference, so the memory cannot be
    reused by another tensor."""
    if t is None:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
            t.device, t._version)


class ContextCache:
    """Mask contexts shared by the layers of one stage: built once per stack and micro-batch.

    Keyed on the incoming per-token tensors (segments, positions, bidirectional flags) and the
    shapes they are combined with; an entry holds strong references to its key tensors, so the
    key cannot be matched by a later tensor reusing their memory. The cached context holds no
    float activations (the T5 table and the encoder output are put in per layer by `context`),
    so it never ties one micro-batch's autograd graph to another's and recomputation under
    activation checkpointing sees the right tensors.
    """

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self.builds = 0  # contexts built (tests check one per stack and micro-batch)
        self._entries: OrderedDict = OrderedDict()

    def get(self, key_tensors: Sequence[Optional[Tensor]], extra: tuple, build: Callable[[], StackContext]):
        key = (extra, tuple(_storage_key(t) for t in key_tensors))
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit[1]
        ctx = build()
        self.builds += 1
        self._entries[key] = (tuple(key_tensors), ctx)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return ctx

    def clear(self) -> None:
        self._entries.clear()


def stack_context(config, kind: StackKind, x: Mapping[str, Tensor], cache: Optional[ContextCache]) -> StackContext:
    """The StackContext of `kind` for the carry `x`, built by model_zoo's `Stack.build_context`
    exactly as the unpipelined model builds it, with this carry's T5 table and encoder output."""
    hidden = x["hidden"]
    seg, pos = x[kind.segments], x[kind.positions]
    bidir = x.get("bidirectional")  # only an ND carry has it
    enc = x["encoder_hidden"] if kind.cross else None
    enc_seg = x["segment_ids"] if kind.cross else None

    def build() -> StackContext:
        view = _StackView(config, kind.causal, kind.depth(config))
        ctx = view.build_context(hidden, segments=seg.long(), positions=pos,
                                 bidirectional=bidir.bool() if bidir is not None else None, offset=0,
                                 encoder_hidden=enc, encoder_segments=enc_seg.long() if enc_seg is not None else None,
                                 cross_segments=seg.long() if kind.cross else None)
        return dataclasses.replace(ctx, encoder_hidden=None)  # no float activation in the cache

    extra = (kind.name, tuple(hidden.shape), hidden.dtype, hidden.device, tuple(enc.shape) if enc is not None else None)
    base = cache.get((seg, pos, bidir, enc_seg), extra, build) if cache is not None else build()
    bias = dataclasses.replace(base.bias, table=x["bias_table"]) if base.bias is not None else None
    return dataclasses.replace(base, bias=bias, encoder_hidden=enc)
