"""The three architectures as Hugging Face models, all made of `blocks.Stack`.

* `DecoderLM`: CD and ND. One class, one set of parameters; `config.prefix_attention` decides
  whether the tokens marked bidirectional (`prefix_lengths` or `bidirectional`) see each other in
  both directions. Labels follow the Hugging Face convention (aligned with input_ids, shifted
  here).
* `EncoderDecoderLM`: ED. Encoder bidirectional over `input_ids`; decoder causal over
  `decoder_input_ids` with cross-attention; labels aligned with the decoder outputs (T5).

Packed rows: `segment_ids` (padding is its own segment) keep examples apart in every attention,
cross-attention included, and positions restart in every example unless `position_ids` are
given. Without segment ids, `attention_mask` (1 = token, 0 = padding) plays their role.

Loss (model_zoo/loss.py): with labels, the output carries loss = ce_loss + z_loss * z_loss-term.
In training mode (`model.train()`) with a fused `config.loss_impl` (chunked / liger; `auto` on
CUDA) the LM head and the loss run fused and the output's `logits` is None: the [B, T, V] logits
are never built. In eval mode, or without labels, or with loss_impl="dense" (and "auto" on CPU),
the logits are computed and returned as always.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .blocks import Stack, positions_from_segments
from .config import DecoderConfig, EncoderDecoderConfig
from .loss import LMHead, align_labels, lm_loss, resolve_impl, shift_labels  # noqa: F401 (public here too)

# Keyword arguments that Hugging Face utilities pass and that these models accept and ignore.
_IGNORED_KWARGS = {"output_attentions", "output_hidden_states", "return_dict", "cache_position",
                   "token_type_ids", "decoder_attention_mask", "head_mask", "decoder_head_mask",
                   "cross_attn_head_mask", "num_items_in_batch"}


def _check_kwargs(kwargs: dict, model: str) -> None:
    unknown = sorted(set(kwargs) - _IGNORED_KWARGS)
    if unknown:
        raise TypeError(f"{model}.forward got unexpected argument(s) {unknown}; see its docstring for the inputs")


# transformers renamed `past_key_values` to `cache` (5.2x); generate reads whichever it knows.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_OUTPUT_FIELDS = {"loss": Optional[Tensor], "logits": Optional[Tensor], "ce_loss": Optional[Tensor],
                  "z_loss": Optional[Tensor], "encoder_last_hidden_state": Optional[Tensor],
                  _CACHE_FIELD: Optional[object]}
LMOutput = dataclass(type("LMOutput", (ModelOutput,), {
    "__annotations__": _OUTPUT_FIELDS, **dict.fromkeys(_OUTPUT_FIELDS), "__module__": __name__,
    "__doc__": "loss (cross-entropy + z-loss), its parts `ce_loss` and `z_loss`, logits [B, T, V], the "
               "encoder output (ED) and the KV cache (field `cache`, or `past_key_values` on older transformers)."}))


def _output(cache, **fields) -> LMOutput:
    return LMOutput(**fields, **{_CACHE_FIELD: cache})


def _key_tensors(segment_ids, attention_mask, position_ids, past: int, t: int, b: int, device,
                name: str) -> tuple[Optional[Tensor], Tensor]:
    """Segment ids and positions over all keys (cached + new), [B, past + t].

    Segments: `segment_ids`, else the 0/1 attention mask, else None (one segment per row).
    Positions: `position_ids` (over all keys, or over the new tokens only), else restarting at 0
    in every segment.
    """
    seg = segment_ids if segment_ids is not None else attention_mask
    if seg is not None:
        if seg.shape[1] != past + t:
            raise ValueError(f"{name} has length {seg.shape[1]} but the cache holds {past} tokens and {t} are new: "
                             f"pass it over the whole sequence ({past + t} tokens)")
        seg = seg.long()
        pos = positions_from_segments(seg)
    else:
        pos = torch.arange(past + t, device=device).expand(b, -1)
    if position_ids is not None:
        if position_ids.shape[1] == past + t:
            pos = position_ids
        elif position_ids.shape[1] == t:
            pos = pos.clone()
            pos[:, past:] = position_ids
        else:
            raise ValueError(f"position ids have length {position_ids.shape[1]}; expected {t} (new tokens) "
                             f"or {past + t} (cached + new)")
    return seg, pos


class _PreTrained(PreTrainedModel):
    _supports_sdpa = True
    _supports_flex_attn = True
    _no_split_modules = ["Block"]

    def _head_input(self, hidden: Tensor) -> Tensor:
        if self.config.tie_embeddings and self.config.scale_tied_logits:
            hidden = hidden * self.config.d_model ** -0.5  # t5x: logits through the embedding are rescaled
        return hidden

    def _lm_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self._head_input(hidden))  # (B, T, V)

    @staticmethod
    def _keep(hidden: Tensor, labels: Optional[Tensor], logits_to_keep) -> Tensor:
        """Without labels, only the last `logits_to_keep` positions (an int > 0; a 1-D tensor of
        positions) need logits: generate asks for 1, so the prompt's [B, T, V] logits are never built."""
        if labels is not None or logits_to_keep is None:
            return hidden
        if isinstance(logits_to_keep, int):
            return hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        return hidden[:, logits_to_keep]

    shifts_labels: bool  # the loss shifts the labels (loss.align_labels); each model class says which

    def _head_and_loss(self, hidden: Tensor, labels: Optional[Tensor]):
        """(logits, loss, ce, z) of the final hidden states [B, T, D], the labels aligned by
        loss.align_labels with this class's `shifts_labels`. In training mode with labels and a
        fused loss_impl (model_zoo/loss.py), the loss comes from the hidden states and the logits
        are None; otherwise the logits [B, T, V] are computed and the loss (if labels) is lm_loss of them."""
        impl = resolve_impl(self.config.loss_impl, hidden.device, hidden.shape[0] * hidden.shape[1], hidden.shape[-1])
        if labels is None or not self.training or impl == "dense":
            logits = self._lm_logits(hidden)
            if labels is None:
                return logits, None, None, None
            return (logits, *lm_loss(*align_labels(labels, self.shifts_labels, logits), self.config.z_loss))
        _, labels = align_labels(labels, self.shifts_labels)  # (B, T)
        h = self._head_input(hidden)
        loss, ce, z = self.lm_head(h.reshape(-1, h.shape[-1]), labels.reshape(-1), z_loss=self.config.z_loss,
                                   impl=impl, chunk_size=self.config.loss_chunk_size)
        return None, loss, ce, z


# ============================================================================ decoder: CD / ND
class DecoderModel(Stack):
    """Token embedding + the decoder stack (the trunk of CD and ND)."""

    def __init__(self, config: DecoderConfig):
        # bidirectional buckets for both CD and ND, so that they share parameters exactly
        super().__init__(config, causal=True, cross=False, rel_bidirectional=True)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)


class DecoderLM(_PreTrained, GenerationMixin):
    """CD / ND decoder-only language model.

    forward(input_ids [B, T], labels=None [B, T], prefix_lengths=None [B], segment_ids=None [B, T],
    position_ids=None [B, T], bidirectional=None [B, T] bool, attention_mask=None [B, T], cache=None,
    logits_to_keep=None: without labels, logits of the last n positions only, as transformers passes it)
    * prefix_lengths: the first n tokens of each row are its bidirectional prefix (ND; CD ignores
      it). `bidirectional` is the general per-token form (several packed examples per row).
    * With a KV cache, segment_ids / attention_mask / bidirectional cover the whole sequence
      (cached + new tokens), as transformers' generate passes them.
    """

    config_class = DecoderConfig
    base_model_prefix = "model"
    shifts_labels = True  # Hugging Face convention: labels aligned with input_ids, position t predicts t + 1
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.model = DecoderModel(config)
        self.lm_head = LMHead(config.d_model, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def _bidirectional(self, prefix_lengths, bidirectional, total: int, device) -> Optional[Tensor]:
        if not self.config.prefix_attention:
            return None  # CD: the same batch, every token causal
        if bidirectional is not None:
            if bidirectional.shape[1] != total:
                raise ValueError(f"bidirectional has length {bidirectional.shape[1]}, expected {total}")
            return bidirectional.bool()
        if prefix_lengths is not None:
            return torch.arange(total, device=device)[None, :] < prefix_lengths.to(device)[:, None]
        return None

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, prefix_lengths: Optional[Tensor] = None,
                segment_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                bidirectional: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, cache=None,
                past_key_values=None, use_cache: Optional[bool] = None, logits_to_keep=None, **kwargs) -> LMOutput:
        _check_kwargs(kwargs, "DecoderLM")
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache and use_cache is not None:
            cache = None
        b, t = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        seg, pos = _key_tensors(segment_ids, attention_mask, position_ids, past, t, b, input_ids.device,
                                "segment_ids" if segment_ids is not None else "attention_mask")
        bidir = self._bidirectional(prefix_lengths, bidirectional, past + t, input_ids.device)

        stack = self.model
        hidden = stack.embed_tokens(input_ids)  # (B, T, D)
        ctx = stack.build_context(hidden, segments=seg, positions=pos, bidirectional=bidir, offset=past, cache=cache)
        hidden = stack.run(hidden, ctx, pos[:, past:])
        logits, loss, ce, z = self._head_and_loss(self._keep(hidden, labels, logits_to_keep), labels)
        return _output(cache, loss=loss, logits=logits, ce_loss=ce, z_loss=z)

    def generate(self, input_ids: Optional[Tensor] = None, **kwargs):
        """transformers' generate. ND: the prompt is the bidirectional prefix unless
        `prefix_lengths` says otherwise; the prefix stays fixed while tokens are generated."""
        if self.config.prefix_attention and input_ids is not None and kwargs.get("prefix_lengths") is None \
                and kwargs.get("bidirectional") is None:
            kwargs["prefix_lengths"] = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
        return super().generate(input_ids, **kwargs)


# ================================================================================ ED
class Encoder(Stack):
    """The ED encoder: bidirectional over each segment (direction per config.bidirectional_mode).
    It reads the shared embedding of its parent model (held without registering it twice)."""

    main_input_name = "input_ids"  # read by transformers' generate

    def __init__(self, config: EncoderDecoderConfig, embed: nn.Embedding):
        super().__init__(config, causal=False, cross=False, rel_bidirectional=True, n_layers=config.encoder_depth)
        object.__setattr__(self, "_embed", embed)  # not a submodule: the parent owns `shared`

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                segment_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                **kwargs) -> BaseModelOutput:
        _check_kwargs(kwargs, "Encoder")
        b, t = input_ids.shape
        seg, pos = _key_tensors(segment_ids, attention_mask, position_ids, 0, t, b, input_ids.device, "segment_ids")
        hidden = self._embed(input_ids)  # (B, Ti, D)
        ctx = self.build_context(hidden, segments=seg, positions=pos, bidirectional=None, offset=0)
        return BaseModelOutput(last_hidden_state=self.run(hidden, ctx, pos))


class EncoderDecoderLM(_PreTrained, GenerationMixin):
    """ED encoder-decoder language model (T5 layout).

    forward(input_ids [B, Ti], decoder_input_ids [B, To] (or derived from labels by T5's shift
    right), labels=None [B, To], attention_mask / segment_ids [B, Ti], position_ids [B, Ti],
    decoder_segment_ids / decoder_position_ids [B, To], encoder_outputs=None, cache=None).
    Cross-attention joins equal segment ids only. Without segment ids, every decoder token sees
    the encoder tokens whose attention_mask is 1.
    """

    config_class = EncoderDecoderConfig
    base_model_prefix = "model"
    shifts_labels = False  # T5: labels aligned with the decoder outputs
    _tied_weights_keys = {"lm_head.weight": "shared.weight"}

    def __init__(self, config: EncoderDecoderConfig):
        super().__init__(config)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Encoder(config, self.shared)
        # share_encoder_decoder: decoder block i runs encoder block i's self-attention and MLP
        self.decoder = Stack(config, causal=True, cross=True, rel_bidirectional=False, n_layers=config.decoder_depth,
                             share_with=self.encoder if config.share_encoder_decoder else None)
        self.lm_head = LMHead(config.d_model, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, value):
        self.shared = value
        object.__setattr__(self.encoder, "_embed", value)

    def get_output_embeddings(self):
        return self.lm_head

    def get_encoder(self, modality=None):
        return self.encoder

    def shift_right(self, labels: Tensor, segment_ids: Optional[Tensor] = None) -> Tensor:
        """T5's decoder inputs: decoder_start_token_id then the labels minus the last, with -100
        read as padding; with segment ids, every packed example starts anew."""
        start = self.config.decoder_start_token_id
        shifted = labels.new_full(labels.shape, start)
        shifted[:, 1:] = labels[:, :-1]
        if segment_ids is not None:
            first = torch.ones_like(segment_ids, dtype=torch.bool)
            first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
            shifted = torch.where(first, torch.full_like(shifted, start), shifted)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(self, input_ids: Optional[Tensor] = None, decoder_input_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                segment_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                decoder_segment_ids: Optional[Tensor] = None, decoder_position_ids: Optional[Tensor] = None,
                encoder_outputs=None, cache=None, past_key_values=None, use_cache: Optional[bool] = None,
                logits_to_keep=None, **kwargs) -> LMOutput:
        _check_kwargs(kwargs, "EncoderDecoderLM")
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("EncoderDecoderLM needs input_ids or encoder_outputs")
            encoder_outputs = self.encoder(input_ids, attention_mask=attention_mask, segment_ids=segment_ids,
                                           position_ids=position_ids)
        enc = encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else encoder_outputs.last_hidden_state
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("EncoderDecoderLM needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels, decoder_segment_ids)

        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        if not use_cache and use_cache is not None:
            cache = None
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        # the encoder output's keys and values, computed at the first decode step and reused after
        cross_cache = cache.cross_attention_cache if isinstance(cache, EncoderDecoderCache) else None
        b, t = decoder_input_ids.shape
        past = self_cache.get_seq_length() if self_cache is not None else 0

        enc_seg = segment_ids if segment_ids is not None else attention_mask
        enc_seg = enc_seg.long() if enc_seg is not None else None
        seg, pos = _key_tensors(decoder_segment_ids, None, decoder_position_ids, past, t, b, enc.device,
                                "decoder_segment_ids")
        # cross-attention: decoder segment s sees encoder segment s; without decoder segments
        # every decoder token belongs to the encoder's (attention_mask) segment 1
        cross_seg = seg[:, past:] if seg is not None else None
        if cross_seg is None and enc_seg is not None:
            cross_seg = torch.ones(b, t, dtype=torch.long, device=enc.device)

        hidden = self.shared(decoder_input_ids)  # (B, To, D)
        ctx = self.decoder.build_context(hidden, segments=seg, positions=pos, bidirectional=None, offset=past,
                                         cache=self_cache, encoder_hidden=enc, encoder_segments=enc_seg,
                                         cross_segments=cross_seg, cross_cache=cross_cache)
        hidden = self.decoder.run(hidden, ctx, pos[:, past:])
        logits, loss, ce, z = self._head_and_loss(self._keep(hidden, labels, logits_to_keep), labels)
        return _output(cache, loss=loss, logits=logits, ce_loss=ce, z_loss=z, encoder_last_hidden_state=enc)
