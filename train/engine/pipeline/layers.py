"""The pipeline layers: thin subclasses or holders of model_zoo modules with the same parameter
names, so that a model_zoo state dict maps onto the pipeline key for key (prefix + local key)."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from model_zoo.blocks import Block, RelativePositionBias, make_norm
from model_zoo.loss import resolve_impl

from .carry import _HIDDEN, Carry
from .context import ContextCache, StackKind, stack_context


class TokenEmbedding(nn.Embedding):
    """The token embedding (parameter `weight`). As a tied layer every occurrence is built with
    the same arguments (DeepSpeed builds the module from whichever occurrence a stage meets
    first); `forward` is the first occurrence, `EmbedFn` / `HeadFn` the others."""

    def __init__(self, vocab_size: int, d_model: int, carry_in: Carry, carry_out: Carry, ids_field: str):
        super().__init__(vocab_size, d_model)
        self.carry_in, self.carry_out, self.ids_field = carry_in, carry_out, ids_field

    def embed(self, inputs, carry_in: Carry, carry_out: Carry, ids_field: str):
        x = carry_in.unpack(inputs)
        x["hidden"] = super().forward(x[ids_field])  # (B, T, D)
        return carry_out.pack(x)

    def forward(self, inputs):
        return self.embed(inputs, self.carry_in, self.carry_out, self.ids_field)


class EmbedFn:
    """forward_fn of a later occurrence of the tied embedding: embed another id field (ED decoder)."""

    def __init__(self, carry_in: Carry, carry_out: Carry, ids_field: str):
        self.carry_in, self.carry_out, self.ids_field = carry_in, carry_out, ids_field

    def __call__(self, module: TokenEmbedding, inputs):
        return module.embed(inputs, self.carry_in, self.carry_out, self.ids_field)


def _head_output(module: nn.Module, hidden: Tensor, weight: Tensor, loss_impl: str):
    """The last layer's output: logits [B, T, V], or (hidden [B, T, D], weight [V, D]) for
    PipelineLoss to fuse head and loss (training with a fused loss_impl, as model_zoo's models)."""
    if module.training and resolve_impl(loss_impl, hidden.device, hidden.shape[0] * hidden.shape[1],
                                        hidden.shape[-1]) != "dense":
        return hidden, weight
    return F.linear(hidden, weight)  # (B, T, V)


class HeadFn:
    """forward_fn of the tied embedding as the LM head: logits = (hidden x scale) E^T."""

    def __init__(self, scale: Optional[float], loss_impl: str = "dense"):
        self.scale, self.loss_impl = scale, loss_impl

    def __call__(self, module: TokenEmbedding, inputs):
        hidden = _HIDDEN.unpack(inputs)["hidden"]
        if self.scale is not None:
            hidden = hidden * self.scale  # t5x: logits through the embedding are rescaled
        return _head_output(module, hidden, module.weight, self.loss_impl)


class LMHead(nn.Linear):
    """Untied LM head (parameter `weight`, model key lm_head.weight)."""

    def __init__(self, d_model: int, vocab_size: int, loss_impl: str = "dense"):
        super().__init__(d_model, vocab_size, bias=False)
        self.loss_impl = loss_impl

    def forward(self, inputs):
        return _head_output(self, _HIDDEN.unpack(inputs)["hidden"], self.weight, self.loss_impl)


class StackInput(nn.Module):
    """Start of a stack (after its token embedding): learned positions, dropout, and the T5
    bias table computed once from `rel_bias` (parameters named as in model_zoo's Stack)."""

    def __init__(self, config, kind: StackKind, carry_in: Carry, carry_out: Carry):
        super().__init__()
        self.position = config.position
        if config.position == "t5_bias":
            self.rel_bias = RelativePositionBias(config, bidirectional=kind.rel_bidirectional)
        if config.position == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.kind, self.carry_in, self.carry_out = kind, carry_in, carry_out

    def forward(self, inputs):
        x = self.carry_in.unpack(inputs)
        pos = x[self.kind.positions]
        hidden = x["hidden"]
        if self.position == "learned":
            hidden = hidden + self.embed_positions(pos)
        x["hidden"] = self.dropout(hidden)
        if self.position == "t5_bias":
            x["bias_table"] = self.rel_bias(pos, 0).table  # (2*max_distance+1, H)
        return self.carry_out.pack(x)


class BlockLayer(Block):
    """One model_zoo Block (same parameter names) with its absolute index in its stack, which
    decides its mask direction under bidirectional_mode="mixed_layers"."""

    def __init__(self, config, kind: StackKind, layer_idx: int, carry_in: Carry, carry_out: Carry,
                 cache: Optional[ContextCache]):
        super().__init__(config, cross=kind.cross)
        self.config, self.kind, self.layer_idx = config, kind, layer_idx
        self.carry_in, self.carry_out = carry_in, carry_out
        object.__setattr__(self, "cache", cache)  # shared by the stage's layers; not state

    def forward(self, inputs):
        x = self.carry_in.unpack(inputs)
        ctx = stack_context(self.config, self.kind, x, self.cache)
        x["hidden"] = super().forward(x["hidden"], ctx, self.layer_idx)  # (B, T, D)
        return self.carry_out.pack(x)


class FinalNorm(nn.Module):
    """A stack's final norm and dropout (parameter names norm.*); renames `hidden` to `out_field`."""

    def __init__(self, config, carry_in: Carry, carry_out: Carry, out_field: str = "hidden"):
        super().__init__()
        self.norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)
        self.carry_in, self.carry_out, self.out_field = carry_in, carry_out, out_field

    def forward(self, inputs):
        x = self.carry_in.unpack(inputs)
        x[self.out_field] = self.dropout(self.norm(x.pop("hidden")))
        return self.carry_out.pack(x)
