"""Pipeline parallelism: CD, ND and ED as a DeepSpeed `PipelineModule`, built from model_zoo.

The model code stays single-device (model_zoo); this file cuts it into a sequence of pipeline
layers, each a thin subclass or holder of a model_zoo module with the same parameter names, so
that a model_zoo state dict maps onto the pipeline key for key (prefix + local key) and back.

Layers (index: what it holds; the model_zoo key prefix of its parameters)
Decoder (CD / ND, `DecoderLM`), L = n_layers:
    0          TokenEmbedding     model.embed_tokens.  (tied key "embed" when tie_embeddings)
    1          StackInput         model.   (rel_bias.* / embed_positions.*, dropout, T5 table)
    2 .. L+1   BlockLayer i       model.layers.i.
    L+2        FinalNorm          model.   (norm.*)
    L+3        LM head            the tied "embed" (x d_model^-0.5 when scale_tied_logits), else lm_head.
ED (`EncoderDecoderLM`):
    0          TokenEmbedding     shared.  (tied key "embed": also the decoder input and, tied, the head)
    1          StackInput         encoder.
    2 .. L+1   BlockLayer         encoder.layers.i.
    L+2        FinalNorm          encoder.  -> encoder_hidden
    L+3        the tied "embed" on decoder_input_ids
    L+4        StackInput         decoder.
    L+5..2L+4  BlockLayer         decoder.layers.i. (with cross-attention)
    2L+5       FinalNorm          decoder.
    2L+6       LM head

The activation tuple between layers (and so between stages) is named, field by field, by a
`Carry` on each side of every layer (see `_decoder_plan` / `_ed_plan`); its fields:
    hidden            float [B, T, D]  the residual stream of the current stack
    bias_table        float [2*max_distance+1, H]  T5 relative-bias table of the current stack,
                      computed once in its StackInput from `rel_bias`; carried as an activation,
                      so DeepSpeed's pipeline backward returns its gradient to that stage
    encoder_hidden    float [B, Ti, D]  ED: the encoder output, carried to every decoder layer
    segment_ids, position_ids, bidirectional (ND, uint8)      int [B, T] / [B, Ti]
    decoder_input_ids, decoder_segment_ids, decoder_position_ids (ED)   int [B, To]
A layer passes on only what later layers need (the last block of a stack drops the table and
the per-token tensors), because DeepSpeed expects a gradient for every float tensor a stage
receives: each one is therefore used or passed on by every stage that receives it. Integer
tensors get no gradient. Masks are never sent: every stage rebuilds them from the per-token
tensors with model_zoo's own `Stack.build_context`, once per stack, stage and micro-batch
(`ContextCache`).

Loss on the last stage: model_zoo.loss (cross-entropy + z-loss); decoders shift it (logits[:, :-1]
vs labels[:, 1:]), ED does not (T5). In training with a fused `loss_impl` (chunked / liger, see
docs/model_zoo.md) the head layer hands the loss `(hidden, head weight)` instead of the logits,
and the loss runs model_zoo's linear_cross_entropy on them, as the unpipelined model does.

Public API (see docs/pipeline.md): `check_pipeline`, `pipeline_layers`, `build_pipeline_module`,
`initialize_pipeline_engine`, `batch_to_pipeline`, `pipeline_batches`, `ArchscalePipeline`
(`load_model_state_dict`, `model_state_dict`, `named_model_parameters`),
`model_state_dict_from_layer_files`, `pipeline_to_model_state_dict`, `LocalPipeline`.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import Tensor, nn

from model_zoo.blocks import Block, RelativePositionBias, Stack, StackContext, make_norm, positions_from_segments
from model_zoo.masks import PositionBias
from model_zoo.loss import linear_cross_entropy, lm_loss, resolve_impl, shift_labels

TIED_KEY = "embed"  # the TiedLayerSpec key of the token embedding (shared with the LM head / ED decoder)
COUNT_KEYS = ("num_tokens", "num_target_tokens", "num_documents")  # batch accounting, not model inputs
CHECKPOINTABLE_LAYERS = ["BlockLayer"]  # activation checkpointing recomputes blocks only


class PipelineConfigError(ValueError):
    """A pipeline setting that cannot work, found before any process group or model is built."""


# ============================================================================ the named tuple
class Carry:
    """The names, in order, of the tensors one pipeline layer hands the next.

    DeepSpeed moves plain tuples of tensors (a single tensor when there is one); `pack` and
    `unpack` turn them into a dict by name so that no layer relies on a positional convention.
    """

    def __init__(self, *names: str):
        self.names = tuple(names)

    def unpack(self, inputs) -> dict[str, Tensor]:
        if torch.is_tensor(inputs):
            inputs = (inputs,)
        if len(inputs) != len(self.names):
            raise ValueError(f"pipeline layer expected {len(self.names)} tensors ({', '.join(self.names)}), "
                             f"got {len(inputs)}")
        return dict(zip(self.names, inputs))

    def pack(self, values: Mapping[str, Tensor]):
        out = tuple(values[n] for n in self.names)
        return out[0] if len(out) == 1 else out

    def __repr__(self) -> str:
        return f"Carry{self.names}"


_HIDDEN = Carry("hidden")  # the carry after a stack's last block: the residual stream alone


# ====================================================================== stacks and contexts
@dataclass(frozen=True)
class StackKind:
    """Which model_zoo Stack a layer belongs to, and where its per-token tensors are in the carry."""

    name: str  # "decoder" (CD/ND), "encoder", "ed_decoder"
    causal: bool
    rel_bidirectional: bool  # T5 buckets (decoder-only and encoder: bidirectional; ED decoder: not)
    cross: bool
    segments: str  # carry field of this stack's segment ids
    positions: str  # carry field of its position ids


DECODER = StackKind("decoder", True, True, False, "segment_ids", "position_ids")
ENCODER = StackKind("encoder", False, True, False, "segment_ids", "position_ids")
ED_DECODER = StackKind("ed_decoder", True, False, True, "decoder_segment_ids", "decoder_position_ids")


class _StackView:
    """What model_zoo's `Stack.build_context` reads of its stack (config, causal, the number of
    layers, rel_bias), without the stack's layers: a stage holds only some of them. Its
    `rel_bias` returns a PositionBias without a table; the table arrives as an activation and is
    put in per layer (so its gradient flows to whichever tensor this stage received)."""

    layer_directions = Stack.layer_directions
    build_context = Stack.build_context

    def __init__(self, config, causal: bool):
        self.config, self.causal, self.layers = config, causal, range(config.n_layers)

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
        view = _StackView(config, kind.causal)
        ctx = view.build_context(hidden, segments=seg.long(), positions=pos,
                                 bidirectional=bidir.bool() if bidir is not None else None, offset=0,
                                 encoder_hidden=enc, encoder_segments=enc_seg.long() if enc_seg is not None else None,
                                 cross_segments=seg.long() if kind.cross else None)
        return dataclasses.replace(ctx, encoder_hidden=None)  # no float activation in the cache

    extra = (kind.name, tuple(hidden.shape), hidden.dtype, hidden.device, tuple(enc.shape) if enc is not None else None)
    base = cache.get((seg, pos, bidir, enc_seg), extra, build) if cache is not None else build()
    bias = dataclasses.replace(base.bias, table=x["bias_table"]) if base.bias is not None else None
    return dataclasses.replace(base, bias=bias, encoder_hidden=enc)


# ======================================================================= the pipeline layers
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


class PipelineLoss:
    """The last stage's loss: model_zoo's lm_loss (cross-entropy + z-loss) of the logits, or its
    fused linear_cross_entropy of (hidden, head weight); shifted for decoders."""

    def __init__(self, z_loss: float, shift: bool, loss_impl: str = "dense", chunk_size: int = 1024):
        self.z_loss, self.shift, self.loss_impl, self.chunk_size = z_loss, shift, loss_impl, chunk_size
        self.__name__ = "lm_loss_shifted" if shift else "lm_loss"

    def __call__(self, outputs, labels: Tensor) -> Tensor:
        if isinstance(outputs, tuple):  # fused: (hidden [B, T, D], weight [V, D]) from the head layer
            hidden, weight = outputs
            if self.shift:
                labels = shift_labels(labels)  # [B, T]: the last position predicts nothing
            return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                        self.z_loss, resolve_impl(self.loss_impl, hidden.device,
                                                                  hidden.shape[0] * hidden.shape[1], hidden.shape[-1]),
                                        self.chunk_size)[0]
        logits = outputs
        if self.shift:
            logits, labels = logits[:, :-1], labels[:, 1:]  # predict the next token
        return lm_loss(logits, labels, self.z_loss)[0]


def pipeline_loss(config) -> PipelineLoss:
    return PipelineLoss(config.z_loss, shift=config.arch != "ed", loss_impl=config.loss_impl,
                        chunk_size=config.loss_chunk_size)


# ================================================================================== the plan
@dataclass
class Plan:
    """The layer specs of one architecture and where their parameters live in model_zoo."""

    specs: list  # LayerSpec / TiedLayerSpec, in pipeline order
    prefixes: list  # per layer: model_zoo key prefixes of its parameters (several for the tied embedding)
    input_fields: tuple  # the first layer's carry: what batch_to_pipeline produces
    cache: Optional[ContextCache] = None  # shared by the BlockLayers a process builds


def _decoder_plan(config, cache: Optional[ContextCache]) -> Plan:
    L, tied = config.n_layers, config.tie_embeddings
    ints = ("segment_ids", "position_ids") + (("bidirectional",) if config.prefix_attention else ())
    table = ("bias_table",) if config.position == "t5_bias" else ()
    c_in = Carry("input_ids", *ints)
    c_embedded = Carry("hidden", *ints)
    c_inner = Carry("hidden", *table, *ints)
    c_last = Carry("hidden")
    embed_args = (config.vocab_size, config.d_model, c_in, c_embedded, "input_ids")
    embed_prefixes = ("model.embed_tokens.", "lm_head.") if tied else ("model.embed_tokens.",)

    specs = [TiedLayerSpec(TIED_KEY, TokenEmbedding, *embed_args) if tied else LayerSpec(TokenEmbedding, *embed_args),
             LayerSpec(StackInput, config, DECODER, c_embedded, c_inner)]
    prefixes = [embed_prefixes, ("model.",)]
    for i in range(L):
        specs.append(LayerSpec(BlockLayer, config, DECODER, i, c_inner, c_last if i == L - 1 else c_inner, cache))
        prefixes.append((f"model.layers.{i}.",))
    specs.append(LayerSpec(FinalNorm, config, c_last, c_last))
    prefixes.append(("model.",))
    _append_head(config, specs, prefixes, embed_args, embed_prefixes)
    return Plan(specs, prefixes, c_in.names, cache)


def _append_head(config, specs: list, prefixes: list, embed_args: tuple, embed_prefixes: tuple) -> None:
    """The LM head: the tied embedding's transpose (scaled as the model scales tied logits) or its
    own matrix."""
    if config.tie_embeddings:
        scale = config.d_model ** -0.5 if config.scale_tied_logits else None
        specs.append(TiedLayerSpec(TIED_KEY, TokenEmbedding, *embed_args, forward_fn=HeadFn(scale, config.loss_impl)))
        prefixes.append(embed_prefixes)
    else:
        specs.append(LayerSpec(LMHead, config.d_model, config.vocab_size, config.loss_impl))
        prefixes.append(("lm_head.",))


def _ed_plan(config, cache: Optional[ContextCache]) -> Plan:
    L, tied = config.n_layers, config.tie_embeddings
    table = ("bias_table",) if config.position == "t5_bias" else ()
    dec_ints = ("decoder_segment_ids", "decoder_position_ids")
    c_in = Carry("input_ids", "segment_ids", "position_ids", "decoder_input_ids", *dec_ints)
    c_enc0 = Carry("hidden", "segment_ids", "position_ids", "decoder_input_ids", *dec_ints)
    c_enc = Carry("hidden", *table, "segment_ids", "position_ids", "decoder_input_ids", *dec_ints)
    c_enc_last = Carry("hidden", "segment_ids", "decoder_input_ids", *dec_ints)
    c_enc_out = Carry("encoder_hidden", "segment_ids", "decoder_input_ids", *dec_ints)
    c_dec0 = Carry("hidden", "encoder_hidden", "segment_ids", *dec_ints)
    c_dec = Carry("hidden", *table, "encoder_hidden", "segment_ids", *dec_ints)
    c_last = Carry("hidden")
    embed_args = (config.vocab_size, config.d_model, c_in, c_enc0, "input_ids")
    embed_prefixes = ("shared.", "lm_head.") if tied else ("shared.",)

    specs = [TiedLayerSpec(TIED_KEY, TokenEmbedding, *embed_args),
             LayerSpec(StackInput, config, ENCODER, c_enc0, c_enc)]
    prefixes = [embed_prefixes, ("encoder.",)]
    for i in range(L):
        specs.append(LayerSpec(BlockLayer, config, ENCODER, i, c_enc, c_enc_last if i == L - 1 else c_enc, cache))
        prefixes.append((f"encoder.layers.{i}.",))
    specs += [LayerSpec(FinalNorm, config, c_enc_last, c_enc_out, "encoder_hidden"),
              TiedLayerSpec(TIED_KEY, TokenEmbedding, *embed_args,
                            forward_fn=EmbedFn(c_enc_out, c_dec0, "decoder_input_ids")),
              LayerSpec(StackInput, config, ED_DECODER, c_dec0, c_dec)]
    prefixes += [("encoder.",), embed_prefixes, ("decoder.",)]
    for i in range(L):
        specs.append(LayerSpec(BlockLayer, config, ED_DECODER, i, c_dec, c_last if i == L - 1 else c_dec, cache))
        prefixes.append((f"decoder.layers.{i}.",))
    specs.append(LayerSpec(FinalNorm, config, c_last, c_last))
    prefixes.append(("decoder.",))
    _append_head(config, specs, prefixes, embed_args, embed_prefixes)
    return Plan(specs, prefixes, c_in.names, cache)


def make_plan(config, cache: Optional[ContextCache] = None) -> Plan:
    return _ed_plan(config, cache) if config.arch == "ed" else _decoder_plan(config, cache)


def pipeline_layers(config, cache: Optional[ContextCache] = None) -> list:
    """The LayerSpec / TiedLayerSpec list of a model_zoo config or model (CD, ND or ED), for
    `deepspeed.pipe.PipelineModule(layers=...)`; `pipeline_loss(config)` is its loss_fn.
    (ArchscalePipeline adds the weight mapping and checkpointable layers to this.)"""
    config = getattr(config, "config", config)
    return make_plan(config, cache if cache is not None else ContextCache()).specs


def layer_names(config) -> list[str]:
    """Class names of the pipeline layers in order (what `type:REGEX` partitioning matches)."""
    def name(spec) -> str:
        fn = getattr(spec, "forward_fn", None)
        suffix = "(head)" if isinstance(fn, HeadFn) else "(decoder input)" if isinstance(fn, EmbedFn) else ""
        stack = getattr(spec.module_args[1], "name", "") if spec.typename in (StackInput, BlockLayer) else ""
        index = f" {spec.module_args[2]}" if spec.typename is BlockLayer else ""
        return f"{spec.typename.__name__}{suffix}" + (f"[{stack}{index}]" if stack else "")

    return [name(spec) for spec in make_plan(config).specs]


def num_blocks(config) -> int:
    """Transformer blocks the pipeline splits (ED: encoder + decoder)."""
    return 2 * config.n_layers if config.arch == "ed" else config.n_layers


# ================================================================================== checks
def check_pipeline(config, num_stages: int, zero_stage: int = 0, partition_method: str | Sequence[int] = "parameters",
                   activation_checkpoint_interval: int = 0) -> None:
    """Fail early, with a message that says what to change, on settings DeepSpeed's pipeline
    engine cannot run (it would fail later, after process groups and models exist): ZeRO 2/3,
    more stages than transformer blocks, an unknown partition method, bad explicit boundaries.

    partition_method: "parameters" (balance parameter counts), "uniform" (layer counts),
    "type:REGEX" (balance the layers whose class name matches, e.g. type:BlockLayer), or the
    stage boundaries as num_stages + 1 layer indices [0, ..., len(layers)] (see `layer_names`).
    """
    if not isinstance(num_stages, int) or num_stages < 1:
        raise PipelineConfigError(f"pipeline stages must be a positive integer, got {num_stages!r}")
    if zero_stage not in (0, 1):
        raise PipelineConfigError(
            f"ZeRO stage {zero_stage} cannot be combined with pipeline parallelism: DeepSpeed's pipeline engine "
            f"accepts ZeRO 0 or 1 only (it asserts 'ZeRO-2 and ZeRO-3 are incompatible with pipeline "
            f"parallelism'); use ZeRO stage 1 with the pipeline, or no pipeline with ZeRO {zero_stage}")
    blocks = num_blocks(config)
    if num_stages > blocks:
        what = f"{config.n_layers} encoder + {config.n_layers} decoder layers" if config.arch == "ed" \
            else f"{blocks} layers"
        raise PipelineConfigError(f"{num_stages} pipeline stages for a model of {what}: use at most {blocks} stages")
    if isinstance(partition_method, (list, tuple)):
        n = len(make_plan(config).specs)
        b = list(partition_method)
        if len(b) != num_stages + 1 or b[0] != 0 or b[-1] != n or any(x >= y for x, y in zip(b, b[1:])):
            raise PipelineConfigError(f"explicit stage boundaries {b} must be {num_stages + 1} increasing layer "
                                      f"indices from 0 to {n} (the {config.arch} pipeline has {n} layers: "
                                      f"{', '.join(layer_names(config))})")
    elif not (isinstance(partition_method, str) and (partition_method.lower() in ("parameters", "uniform")
                                                     or partition_method.lower().startswith("type:"))):
        raise PipelineConfigError(f"partition method {partition_method!r} is not valid; choose parameters, uniform, "
                                  f"type:REGEX (a layer class name, e.g. type:BlockLayer) or a list of stage "
                                  f"boundaries")
    if activation_checkpoint_interval < 0:
        raise PipelineConfigError(f"activation checkpoint interval must be >= 0, got {activation_checkpoint_interval}")


# =============================================================================== data interface
def input_fields(config) -> tuple:
    """The order of the input tuple of the first stage (what `batch_to_pipeline` returns)."""
    return make_plan(config).input_fields


def batch_to_pipeline(batch: Mapping[str, Tensor], config) -> tuple[tuple[Tensor, ...], Tensor]:
    """A Batch (the batch contract) -> DeepSpeed's `((inputs...), labels)` for one micro-batch.

    inputs follow `input_fields(config)`: decoder (input_ids, segment_ids, position_ids[,
    bidirectional (ND, uint8)]), ED (input_ids, segment_ids, position_ids, decoder_input_ids,
    decoder_segment_ids, decoder_position_ids); integers as int64. The count entries
    (num_tokens, num_target_tokens, num_documents) are ignored. Missing segment ids mean one
    segment per row, missing positions restart in every segment (as in the model); ND may give
    `prefix_lengths` [B] instead of `bidirectional`. Any other key is an error.
    """
    b = {k: v for k, v in batch.items() if k not in COUNT_KEYS}
    ed = config.arch == "ed"
    known = {"input_ids", "labels", "segment_ids", "position_ids"} | (
        {"decoder_input_ids", "decoder_segment_ids", "decoder_position_ids"} if ed else {"bidirectional", "prefix_lengths"})
    unknown = sorted(set(b) - known)
    if unknown:
        raise KeyError(f"batch keys {unknown} are not pipeline inputs of arch {config.arch!r}; expected {sorted(known)}")
    required = ("input_ids", "labels") + (("decoder_input_ids",) if ed else ())
    missing = [k for k in required if k not in b]
    if missing:
        raise KeyError(f"the batch lacks {missing} (arch {config.arch!r})")

    def ints(ids: Tensor, seg_key: str, pos_key: str) -> tuple[Tensor, Tensor]:
        seg = b.get(seg_key)
        seg = torch.ones_like(ids) if seg is None else seg
        pos = b.get(pos_key)
        pos = positions_from_segments(seg.long()) if pos is None else pos
        return seg.long(), pos.long()

    ids = b["input_ids"].long()
    seg, pos = ints(ids, "segment_ids", "position_ids")
    if ed:
        dec = b["decoder_input_ids"].long()
        dseg, dpos = ints(dec, "decoder_segment_ids", "decoder_position_ids")
        inputs = (ids, seg, pos, dec, dseg, dpos)
    elif config.prefix_attention:
        bidir = b.get("bidirectional")
        if bidir is None and b.get("prefix_lengths") is not None:
            bidir = torch.arange(ids.shape[1])[None, :] < b["prefix_lengths"].reshape(-1, 1)
        if bidir is None:
            bidir = torch.zeros_like(ids, dtype=torch.bool)
        inputs = (ids, seg, pos, bidir.to(torch.uint8))  # uint8: torch.distributed does not send bool
    else:
        inputs = (ids, seg, pos)
    return inputs, b["labels"].long()


def pipeline_batches(batches: Iterable[Mapping[str, Tensor]], config) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
    """Micro-batches for `engine.train_batch(data_iter=...)` / `eval_batch`: each Batch (one
    micro-batch, fixed shape) as `batch_to_pipeline` makes it. Give the same iterator to every
    rank of a pipeline: the first stage reads the inputs, the last the labels."""
    for batch in batches:
        yield batch_to_pipeline(batch, config)


# =========================================================================== weights mapping
def _local_layers(module: nn.Module, start: int) -> list[tuple[int, nn.Module]]:
    """(absolute layer index, module) of each layer held here that owns parameters it saves:
    plain layers and the first occurrence of a tied one (later ones are forward_fn partials)."""
    out = []
    for local_idx, fn in enumerate(module.forward_funcs):
        if isinstance(fn, nn.Module):
            out.append((start + local_idx, fn))
    return out


def _tied_modules(module: nn.Module, plan: Plan) -> list[tuple[tuple, nn.Module]]:
    """(model prefixes, module) of each tied module held here (whichever occurrence built it)."""
    out = []
    for key, mod in getattr(module, "tied_modules", {}).items():
        idx = next(i for i, s in enumerate(plan.specs) if isinstance(s, TiedLayerSpec) and s.key == key)
        out.append((plan.prefixes[idx], mod))
    return out


def _load_into(targets: list[tuple[tuple, nn.Module]], state: Mapping[str, Tensor]) -> None:
    for prefixes, mod in targets:
        local = {}
        for k in mod.state_dict():
            model_key = prefixes[0] + k
            if model_key not in state:
                raise KeyError(f"model state dict lacks {model_key!r} (pipeline layer {type(mod).__name__})")
            local[k] = state[model_key]
        mod.load_state_dict(local, strict=True)


def _export(targets: list[tuple[tuple, nn.Module]]) -> dict[str, Tensor]:
    out = {}
    for prefixes, mod in targets:
        for k, v in mod.state_dict().items():
            for p in prefixes:
                out[p + k] = v
    return out


class _PipelineWeights:
    """Weight mapping shared by ArchscalePipeline (DeepSpeed) and LocalPipeline (one process)."""

    plan: Plan

    def _targets(self) -> list[tuple[tuple, nn.Module]]:
        targets = [(self.plan.prefixes[i], m) for i, m in _local_layers(self, self._local_start)
                   if not isinstance(self.plan.specs[i], TiedLayerSpec)]
        return targets + _tied_modules(self, self.plan)

    def load_model_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy this stage's parameters from a model_zoo state dict (model.state_dict())."""
        _load_into(self._targets(), state)

    def model_state_dict(self) -> dict[str, Tensor]:
        """This stage's parameters under model_zoo keys (absolute layer indices, no prefixes of
        any wrapper); the tied embedding appears under each of its model keys. The union over all
        stages is a full model_zoo state dict."""
        return _export(self._targets())

    def named_model_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(model_zoo name, parameter) of this stage's parameters, each once (for optimizer
        parameter groups written against model_zoo names, e.g. no weight decay on norms)."""
        seen = set()
        for prefixes, mod in self._targets():
            for k, p in mod.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield prefixes[0] + k, p


class ArchscalePipeline(_PipelineWeights, PipelineModule):
    """deepspeed.pipe.PipelineModule of a model_zoo config, with the model_zoo weight mapping.

    Use `build_pipeline_module` (which also copies a model's weights) or construct it from a
    config and load weights with `load_model_state_dict`.
    """

    def __init__(self, config, num_stages: Optional[int] = None, *, topology=None,
                 partition_method: str | Sequence[int] = "parameters", activation_checkpoint_interval: int = 0,
                 dynamic_shape: bool = False, **kwargs):
        if num_stages is None and topology is None:
            raise PipelineConfigError("give num_stages or a DeepSpeed topology")
        check_pipeline(config, num_stages if num_stages is not None else topology.get_dim("pipe"), 0,
                       partition_method, activation_checkpoint_interval)
        plan = make_plan(config, ContextCache())
        explicit = isinstance(partition_method, (list, tuple))
        object.__setattr__(self, "_explicit_parts", [int(b) for b in partition_method] if explicit else None)
        super().__init__(layers=plan.specs, num_stages=num_stages, topology=topology, loss_fn=pipeline_loss(config),
                         partition_method="uniform" if explicit else partition_method,
                         activation_checkpoint_interval=activation_checkpoint_interval,
                         checkpointable_layers=list(CHECKPOINTABLE_LAYERS), dynamic_shape=dynamic_shape, **kwargs)
        self.plan = plan
        self.model_config = config

    def _partition_layers(self, method="uniform"):
        """DeepSpeed's partitioning, plus explicit stage boundaries (a list of layer indices)."""
        if self._explicit_parts is None:
            return super()._partition_layers(method=method)
        self.parts = list(self._explicit_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


class LocalPipeline(_PipelineWeights, nn.Module):
    """All pipeline layers in one process, run in order as PipelineModule runs them, without
    DeepSpeed's engine or process groups: for tests and debugging of the layer chain.

    `forward(inputs)` runs every layer; `layers[i]` is layer i's callable (tied occurrences call
    the one shared module).
    """

    def __init__(self, config):
        super().__init__()
        self.plan = make_plan(config, ContextCache())
        self.cache = self.plan.cache
        self.model_config = config
        self._local_start = 0
        self.tied_modules = nn.ModuleDict()
        self.forward_funcs = []
        for idx, spec in enumerate(self.plan.specs):
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                mod = self.tied_modules[spec.key]
                self.forward_funcs.append(mod if spec.forward_fn is None else _Bound(spec.forward_fn, mod))
            else:
                mod = spec.build()
                self.add_module(str(idx), mod)
                self.forward_funcs.append(mod)

    def forward(self, inputs, start: int = 0, stop: Optional[int] = None):
        for fn in self.forward_funcs[start:stop]:
            inputs = fn(inputs)
        return inputs


class _Bound:
    """forward_fn bound to its tied module (a partial that is not an nn.Module, like DeepSpeed's)."""

    def __init__(self, fn, module):
        self.fn, self.module = fn, module

    def __call__(self, inputs):
        return self.fn(self.module, inputs)


def pipeline_to_model_state_dict(config, layer_states: Mapping[int, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per-layer states {pipeline layer index: that layer's state dict} (DeepSpeed's
    layer_XX-model_states.pt files) -> a model_zoo state dict (tied embedding under each name)."""
    plan = make_plan(config)
    out = {}
    for idx, state in layer_states.items():
        if not 0 <= idx < len(plan.specs):
            raise KeyError(f"layer index {idx} is outside the {len(plan.specs)} layers of this {config.arch} pipeline")
        for k, v in state.items():
            for p in plan.prefixes[idx]:
                out[p + k] = v
    return out


def model_to_pipeline_state_dicts(config, state: Mapping[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """A model_zoo state dict -> {pipeline layer index: layer state dict}, laid out as DeepSpeed
    saves them (a tied module under the index of its first occurrence only)."""
    plan = make_plan(config, ContextCache())
    out, seen_tied = {}, set()
    for idx, spec in enumerate(plan.specs):
        if isinstance(spec, TiedLayerSpec):
            if spec.key in seen_tied:
                continue
            seen_tied.add(spec.key)
        names = spec.build().state_dict().keys()
        out[idx] = {k: state[plan.prefixes[idx][0] + k] for k in names}
    return out


_LAYER_FILE = re.compile(r"layer_(\d+)-(?:.*-)?model_states\.pt$")


def model_state_dict_from_layer_files(config, directory: str) -> dict[str, Tensor]:
    """The model_zoo state dict from a DeepSpeed pipeline checkpoint directory (the
    `layer_XX-model_states.pt` files in CHECKPOINT/TAG/), e.g. for `archscale export`."""
    layer_states = {}
    for path in sorted(glob.glob(os.path.join(directory, "layer_*-model_states.pt"))):
        m = _LAYER_FILE.search(os.path.basename(path))
        if m:
            layer_states[int(m.group(1))] = torch.load(path, map_location="cpu", weights_only=True)
    if not layer_states:
        raise FileNotFoundError(f"no layer_XX-model_states.pt files in {directory}: not a pipeline checkpoint")
    return pipeline_to_model_state_dict(config, layer_states)


# ========================================================================= building the engine
def build_pipeline_module(model: nn.Module, num_stages: Optional[int] = None, *, topology=None,
                          partition_method: str | Sequence[int] = "parameters", activation_checkpoint_interval: int = 0,
                          dynamic_shape: bool = False, **kwargs) -> ArchscalePipeline:
    """The PipelineModule of a model_zoo model (DecoderLM or EncoderDecoderLM) with its weights.

    Needs torch.distributed initialised (deepspeed.init_distributed) and LOCAL_RANK set (any
    launcher sets it). Every rank must pass the same weights (e.g. the same seed): each builds
    only its stage's layers and copies them from `model`. `partition_method`: parameters
    (default), uniform or type:REGEX. `activation_checkpoint_interval`: recompute every N layers
    (blocks only; a DeepSpeed config's pipeline.activation_checkpoint_interval > 0 overrides it).
    """
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model is on the meta device: build it with weights, or construct ArchscalePipeline "
                         "from its config and load a state dict with load_model_state_dict")
    module = ArchscalePipeline(model.config, num_stages, topology=topology, partition_method=partition_method,
                               activation_checkpoint_interval=activation_checkpoint_interval,
                               dynamic_shape=dynamic_shape, **kwargs)
    module.load_model_state_dict(model.state_dict())
    return module


def initialize_pipeline_engine(model: nn.Module, ds_config: dict, *, num_stages: int,
                               optimizer: Callable[[ArchscalePipeline], torch.optim.Optimizer],
                               lr_scheduler: Optional[Callable] = None, partition_method: str | Sequence[int] = "parameters",
                               activation_checkpoint_interval: int = 0, dynamic_shape: bool = False):
    """check_pipeline, build_pipeline_module, then deepspeed.initialize with a client optimizer.

    optimizer(module) -> torch optimizer over this stage's parameters (module.parameters(), or
    groups from module.named_model_parameters()); lr_scheduler(optimizer) -> scheduler or None.
    With ZeRO-1 and a client optimizer the DeepSpeed config needs
    "zero_allow_untested_optimizer": true. Returns DeepSpeed's PipelineEngine: train with
    `engine.train_batch(data_iter=pipeline_batches(batches, model.config))`.
    """
    import deepspeed

    zero = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    interval = ds_config.get("pipeline", {}).get("activation_checkpoint_interval") or activation_checkpoint_interval
    check_pipeline(model.config, num_stages, zero, partition_method, interval)
    module = build_pipeline_module(model, num_stages, partition_method=partition_method,
                                   activation_checkpoint_interval=activation_checkpoint_interval,
                                   dynamic_shape=dynamic_shape)
    opt = optimizer(module)
    sched = lr_scheduler(opt) if lr_scheduler is not None else None
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine
