"""Weights from transformers' reference models into ours (and the configs that make them equal).

* Llama (`LlamaForCausalLM`) -> CD/ND with RoPE, SwiGLU, RMSNorm: the parameter names are the
  same, so the state dict copies key for key.
* T5 v1.1 (`T5ForConditionalGeneration`, gated-gelu) -> ED with T5 relative buckets, GEGLU,
  RMSNorm, unscaled attention: a renaming of keys.

The equivalence tests use these to show that our models compute what the references compute;
users can use them to start from a Llama- or T5-shaped checkpoint they have on disk.
"""
from __future__ import annotations

import re

from .config import DecoderConfig, EncoderDecoderConfig
from .models import DecoderLM, EncoderDecoderLM


def config_from_llama(llama_config, prefix_attention: bool = False) -> DecoderConfig:
    c = llama_config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    if kv_heads != c.num_attention_heads:
        raise ValueError(f"grouped-query attention ({kv_heads} KV heads for {c.num_attention_heads} query heads) "
                         "is not supported; use a Llama config with num_key_value_heads == num_attention_heads")
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope.get('rope_type')!r} is not supported; only the default RoPE")
    return DecoderConfig(
        prefix_attention=prefix_attention, vocab_size=c.vocab_size, d_model=c.hidden_size,
        n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        d_ff=c.intermediate_size, mlp="swiglu", norm="rmsnorm", norm_eps=c.rms_norm_eps, position="rope",
        rope_theta=theta, tie_embeddings=bool(c.tie_word_embeddings), scale_tied_logits=False, scale_attn=True,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else 0,
        eos_token_id=c.eos_token_id if isinstance(c.eos_token_id, int) else 1)


def from_llama(llama_model, prefix_attention: bool = False) -> DecoderLM:
    """A CD (or ND) model holding the weights of a transformers LlamaForCausalLM."""
    model = DecoderLM(config_from_llama(llama_model.config, prefix_attention))
    state = {k: v for k, v in llama_model.state_dict().items() if "rotary_emb" not in k}
    model.load_state_dict(state, strict=not model.config.tie_embeddings)
    return model


def config_from_t5(t5_config, tied: bool | None = None) -> EncoderDecoderConfig:
    """`tied`: whether lm_head shares the embedding (read from the model when converting one:
    transformers >= 5.2x always ties T5's embeddings and keeps the v1.1 "no output scaling" in
    `scale_decoder_outputs`)."""
    c = t5_config
    tied = bool(c.tie_word_embeddings) if tied is None else tied
    scale = getattr(c, "scale_decoder_outputs", bool(c.tie_word_embeddings))
    if not c.is_gated_act or c.dense_act_fn not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"only T5 v1.1 (feed_forward_proj='gated-gelu') converts; got {c.feed_forward_proj!r}")
    # a decoder of another depth than the encoder's: n_decoder_layers (None, the default, when equal)
    n_dec = c.num_decoder_layers if c.num_decoder_layers != c.num_layers else None
    return EncoderDecoderConfig(
        vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.num_layers, n_decoder_layers=n_dec,
        n_heads=c.num_heads, head_dim=c.d_kv,
        d_ff=c.d_ff, mlp="geglu", norm="rmsnorm", norm_eps=c.layer_norm_epsilon, position="t5_bias",
        rel_buckets=c.relative_attention_num_buckets, rel_max_distance=c.relative_attention_max_distance,
        tie_embeddings=tied, scale_tied_logits=scale, scale_attn=False,
        dropout=0.0, pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id,
        decoder_start_token_id=getattr(c, "decoder_start_token_id", None))


# T5 key -> our key, for one block (`stack` is encoder or decoder)
_T5_BLOCK = [
    (r"layer\.0\.SelfAttention\.([qkvo])\.weight", r"self_attn.\1_proj.weight"),
    (r"layer\.0\.layer_norm\.weight", "input_layernorm.weight"),
    (r"layer\.1\.EncDecAttention\.([qkvo])\.weight", r"cross_attn.\1_proj.weight"),
    (r"layer\.1\.layer_norm\.weight", "{cross_or_mlp}"),
    (r"layer\.(1|2)\.DenseReluDense\.wi_0\.weight", "mlp.gate_proj.weight"),
    (r"layer\.(1|2)\.DenseReluDense\.wi_1\.weight", "mlp.up_proj.weight"),
    (r"layer\.(1|2)\.DenseReluDense\.wo\.weight", "mlp.down_proj.weight"),
    (r"layer\.2\.layer_norm\.weight", "post_attention_layernorm.weight"),
]


def t5_key(key: str) -> str | None:
    """Our name for a T5ForConditionalGeneration state-dict key (None: not a parameter of ours)."""
    if key in ("shared.weight", "lm_head.weight"):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(.*)", key)
    if m is None:
        return None
    stack, rest = m.groups()
    if rest == "embed_tokens.weight":
        return None  # the same matrix as shared.weight
    if rest == "final_layer_norm.weight":
        return f"{stack}.norm.weight"
    if rest == "block.0.layer.0.SelfAttention.relative_attention_bias.weight":
        return f"{stack}.rel_bias.relative_attention_bias.weight"
    m = re.fullmatch(r"block\.(\d+)\.(.*)", rest)
    if m is None:
        raise KeyError(f"unexpected T5 key {key}")
    i, sub = m.groups()
    for pattern, target in _T5_BLOCK:
        if re.fullmatch(pattern, sub):
            if target == "{cross_or_mlp}":  # encoder layer.1 is the MLP's norm, decoder's the cross-attention's
                target = "cross_attn_layernorm.weight" if stack == "decoder" else "post_attention_layernorm.weight"
            return f"{stack}.layers.{i}." + re.sub(pattern, target, sub)
    raise KeyError(f"unexpected T5 key {key}")


def from_t5(t5_model) -> EncoderDecoderLM:
    """An ED model holding the weights of a transformers T5ForConditionalGeneration (v1.1)."""
    tied = t5_model.lm_head.weight.data_ptr() == t5_model.shared.weight.data_ptr()
    model = EncoderDecoderLM(config_from_t5(t5_model.config, tied=tied))
    state = {}
    for k, v in t5_model.state_dict().items():
        ours = t5_key(k)
        if ours is not None:
            state[ours] = v
    model.load_state_dict(state, strict=not model.config.tie_embeddings)
    return model
