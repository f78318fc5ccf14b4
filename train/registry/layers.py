"""The pipeline layer layout of each family, written once.

Pure data (no torch, no deepspeed): train/engine/pipeline builds its LayerSpecs from it and
train/commands/plan counts parameters and activations over it without building a model. A family's
spec returns its layout (`ArchSpec.pipeline_layers_layout(config)`, `config` a model_zoo config).

Layers (index: kind; the model_zoo key prefix of its parameters), L = n_layers (ED: E encoder
layers, n_encoder_layers, and D decoder layers, n_decoder_layers; each n_layers by default):
Decoder (CD / ND, `DecoderLM`):
    0          embed      model.embed_tokens.  (tied with the head when tie_embeddings)
    1          input      model.   (rel_bias.* / embed_positions.*, dropout, T5 table)
    2 .. L+1   block i    model.layers.i.
    L+2        head_norm  model.   (norm.*)
    L+3        head       the tied embedding (x d_model^-0.5 when scale_tied_logits), else lm_head.
ED (`EncoderDecoderLM`):
    0          embed      shared.  (tied: also the decoder input and, tied, the head)
    1          input      encoder.
    2 .. E+1   block i    encoder.layers.i.
    E+2        norm       encoder.  -> encoder_hidden
    E+3        embed      the tied embedding on decoder_input_ids
    E+4        input      decoder.
    E+5..E+D+4 block i    decoder.layers.i. (with cross-attention)
    E+D+5      head_norm  decoder.
    E+D+6      head

Each layer names the carry (the activation fields, in order) it receives and hands on; a layer
passes on only what later layers need (the last block of a stack drops the T5 table and the
per-token tensors): DeepSpeed expects a gradient for every float tensor a stage receives.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StackKind:
    """A model_zoo Stack, and where its per-token tensors are in the carry."""

    name: str  # "decoder" (CD/ND), "encoder", "ed_decoder"
    causal: bool
    rel_bidirectional: bool  # T5 buckets (decoder-only and encoder: bidirectional; ED decoder: not)
    cross: bool  # its blocks cross-attend to the encoder output
    segments: str  # carry field of this stack's segment ids
    positions: str  # carry field of its position ids
    depth_field: str  # the model_zoo config property that gives its number of blocks

    def depth(self, config) -> int:
        """The stack's number of blocks in the model `config` describes."""
        return getattr(config, self.depth_field)


DECODER = StackKind("decoder", True, True, False, "segment_ids", "position_ids", "decoder_depth")
ENCODER = StackKind("encoder", False, True, False, "segment_ids", "position_ids", "encoder_depth")
ED_DECODER = StackKind("ed_decoder", True, False, True, "decoder_segment_ids", "decoder_position_ids",
                       "decoder_depth")


@dataclass(frozen=True)
class PipelineLayer:
    """One pipeline layer."""

    kind: str  # embed, input (a stack's start), block, norm (a stack's final norm), head_norm, head
    side: str  # the row its tokens come from: "decoder" or "encoder" (a registry.Lengths field)
    stack: StackKind  # the stack it belongs to (embed: the stack it feeds)
    carry_in: tuple[str, ...]  # the fields it receives, in order
    carry_out: tuple[str, ...]  # the fields it hands on
    prefixes: tuple[str, ...]  # model_zoo key prefixes of its parameters (several for the tied embedding)
    index: int = 0  # block: its index in its stack
    tied: bool = False  # an occurrence of the shared token embedding (a TiedLayerSpec)
    field: str = ""  # embed: the ids it embeds; norm / head_norm: the field it writes


@dataclass(frozen=True)
class PipelineLayout:
    """The layers of one architecture in pipeline order, and what its last stage's loss does."""

    layers: tuple[PipelineLayer, ...]
    shift_labels: bool  # the loss predicts the next token (logits[:, :-1] vs labels[:, 1:]): decoders; ED not (T5)
    batch_keys: frozenset  # the batch keys the pipeline accepts (besides the counts)
    required_keys: tuple[str, ...]  # those a batch must have, in the order a message lists them

    @property
    def input_fields(self) -> tuple[str, ...]:
        """The first layer's carry: the order of the input tuple of the first stage."""
        return self.layers[0].carry_in

    @property
    def embeddings(self) -> tuple[PipelineLayer, ...]:
        """The embed layers: each names its ids field and (through its stack) their segment and
        position fields."""
        return tuple(layer for layer in self.layers if layer.kind == "embed")


def _stack(stack: StackKind, side: str, n_layers: int, c_in: tuple, c_inner: tuple, c_last: tuple,
           prefix: str) -> list[PipelineLayer]:
    """A stack's start and its blocks: the last block hands on `c_last`."""
    layers = [PipelineLayer("input", side, stack, c_in, c_inner, (prefix,))]
    for i in range(n_layers):
        c_out = c_last if i == n_layers - 1 else c_inner
        layers.append(PipelineLayer("block", side, stack, c_inner, c_out, (f"{prefix}layers.{i}.",), index=i))
    return layers


def _head(config, side: str, stack: StackKind, embed_prefixes: tuple) -> PipelineLayer:
    """The LM head: the tied embedding's transpose, or its own matrix (lm_head.)."""
    tied = config.tie_embeddings
    return PipelineLayer("head", side, stack, ("hidden",), ("hidden",), embed_prefixes if tied else ("lm_head.",),
                         tied=tied)


def decoder_layout(config, bidirectional_prefix: bool) -> PipelineLayout:
    """CD / ND (`DecoderLM`): ND carries its prefix flags (`bidirectional`, uint8)."""
    tied = config.tie_embeddings
    ints = ("segment_ids", "position_ids") + (("bidirectional",) if bidirectional_prefix else ())
    table = ("bias_table",) if config.position == "t5_bias" else ()
    c_in, c_embedded, c_inner, c_last = ("input_ids", *ints), ("hidden", *ints), ("hidden", *table, *ints), ("hidden",)
    embed = ("model.embed_tokens.", "lm_head.") if tied else ("model.embed_tokens.",)
    layers = [PipelineLayer("embed", "decoder", DECODER, c_in, c_embedded, embed, tied=tied, field="input_ids")]
    layers += _stack(DECODER, "decoder", DECODER.depth(config), c_embedded, c_inner, c_last, "model.")
    layers += [PipelineLayer("head_norm", "decoder", DECODER, c_last, c_last, ("model.",), field="hidden"),
               _head(config, "decoder", DECODER, embed)]
    keys = frozenset({"input_ids", "labels", "segment_ids", "position_ids", "bidirectional", "prefix_lengths"})
    return PipelineLayout(tuple(layers), shift_labels=True, batch_keys=keys, required_keys=("input_ids", "labels"))


def encoder_decoder_layout(config) -> PipelineLayout:
    """ED (`EncoderDecoderLM`): the encoder stack, its output carried as `encoder_hidden` to every
    decoder block; the token embedding is shared by the encoder, the decoder input and (tied) the head.
    With share_encoder_decoder a decoder block's prefix holds only its cross-attention (the planner
    counts right); a pipeline is refused (EncoderDecoderSpec.pipeline_refusal)."""
    table = ("bias_table",) if config.position == "t5_bias" else ()
    dec = ("decoder_input_ids", "decoder_segment_ids", "decoder_position_ids")
    dec_ints = dec[1:]
    c_in = ("input_ids", "segment_ids", "position_ids", *dec)
    c_enc0 = ("hidden", "segment_ids", "position_ids", *dec)
    c_enc = ("hidden", *table, "segment_ids", "position_ids", *dec)
    c_enc_last = ("hidden", "segment_ids", *dec)  # the encoder segments stay: cross-attention reads them
    c_enc_out = ("encoder_hidden", "segment_ids", *dec)
    c_dec0 = ("hidden", "encoder_hidden", "segment_ids", *dec_ints)
    c_dec = ("hidden", *table, "encoder_hidden", "segment_ids", *dec_ints)
    c_last = ("hidden",)
    embed = ("shared.", "lm_head.") if config.tie_embeddings else ("shared.",)
    layers = [PipelineLayer("embed", "encoder", ENCODER, c_in, c_enc0, embed, tied=True, field="input_ids")]
    layers += _stack(ENCODER, "encoder", ENCODER.depth(config), c_enc0, c_enc, c_enc_last, "encoder.")
    layers += [PipelineLayer("norm", "encoder", ENCODER, c_enc_last, c_enc_out, ("encoder.",), field="encoder_hidden"),
               PipelineLayer("embed", "decoder", ED_DECODER, c_enc_out, c_dec0, embed, tied=True,
                             field="decoder_input_ids")]
    layers += _stack(ED_DECODER, "decoder", ED_DECODER.depth(config), c_dec0, c_dec, c_last, "decoder.")
    layers += [PipelineLayer("head_norm", "decoder", ED_DECODER, c_last, c_last, ("decoder.",), field="hidden"),
               _head(config, "decoder", ED_DECODER, embed)]
    keys = frozenset({"input_ids", "labels", "segment_ids", "position_ids", *dec})
    return PipelineLayout(tuple(layers), shift_labels=False, batch_keys=keys,
                          required_keys=("input_ids", "labels", "decoder_input_ids"))
