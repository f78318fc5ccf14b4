"""A model as a directory that plain `transformers` opens, with archscale not installed.

    form = save_for_transformers(model, out_dir, tokenizer)   # "llama" | "t5" | "remote-code"

* CD with RoPE, SwiGLU and RMSNorm -> `LlamaForCausalLM` (the parameter names are Llama's).
* ED with T5 relative buckets, GEGLU, RMSNorm and tied embeddings -> `T5ForConditionalGeneration`
  (the keys renamed by convert.t5_key, the inverse of convert.from_t5).
* Anything else (ND's prefix attention, other positions / MLPs / norms) -> our modeling code
  (config, models, blocks, masks, loss: torch and transformers only) copied into the directory,
  with `auto_map` in config.json: `AutoModelForCausalLM` / `AutoModelForSeq2SeqLM`
  `.from_pretrained(dir, trust_remote_code=True)`.

Where a scale sits elsewhere in the native class it is folded into a weight, which changes the
computation by float rounding only: the attention scale (`scale_attn`: Llama always scales by
head_dim**-0.5, T5 never) into q_proj, and Llama's missing tied-logit scale (`scale_tied_logits`)
into an untied lm_head. The tokenizer, when given, is saved beside the weights.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from .config import DecoderConfig, EncoderDecoderConfig, non_default_controls
from .convert import t5_key


def remote_modules() -> list[Path]:
    """Our files the remote code needs: models.py and every file it imports relatively, found as
    transformers finds them when it loads the directory (their other imports: torch, transformers)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    models = Path(__file__).with_name("models.py")
    return sorted({models, *map(Path, get_relative_import_files(str(models)))})


def native_form(config) -> tuple[Optional[str], str]:
    """("llama" | "t5", "") when the config maps onto a transformers class exactly, else (None, why)."""
    c = config
    basics = [("norm", c.norm, "rmsnorm")]
    controls = [f"{v} (a control transformers' class lacks)" for v in non_default_controls(c)]
    if isinstance(c, DecoderConfig):
        want = basics + [("position", c.position, "rope"), ("mlp", c.mlp, "swiglu")]
        why = [f"{k}={v!r} (Llama: {w!r})" for k, v, w in want if v != w]
        if c.prefix_attention:
            why.insert(0, "prefix attention (ND; Llama is causal)")
        if c.n_heads and c.d_model % c.n_heads:
            why.append(f"d_model={c.d_model} is not a multiple of n_heads={c.n_heads} (Llama requires it)")
        why += controls
        return ("llama", "") if not why else (None, "; ".join(why))
    if isinstance(c, EncoderDecoderConfig):
        want = basics + [("position", c.position, "t5_bias"), ("mlp", c.mlp, "geglu")]
        why = [f"{k}={v!r} (T5 v1.1: {w!r})" for k, v, w in want if v != w]
        if not c.tie_embeddings:
            why.append("untied embeddings (transformers' T5 always ties lm_head to the embedding)")
        why += controls
        return ("t5", "") if not why else (None, "; ".join(why))
    return None, f"{type(c).__name__} is not an archscale config"


def _attn_scale(config) -> float:
    return config.head_dim ** -0.5 if config.scale_attn else 1.0


def to_llama(model):
    """A transformers LlamaForCausalLM computing what the CD `model` computes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    scaled_head = c.tie_embeddings and c.scale_tied_logits  # ours: lm_head(h * d**-0.5)
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads, head_dim=c.head_dim, hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta)},
        tie_word_embeddings=bool(c.tie_embeddings and not scaled_head), attention_bias=False, mlp_bias=False,
        initializer_range=c.initializer_range, pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id,
        bos_token_id=None)
    ref = LlamaForCausalLM(cfg)
    ours = model.state_dict()
    q_fold = _attn_scale(c) / c.head_dim ** -0.5
    state = {}
    for k in ref.state_dict():
        v = ours[k].detach().float().clone()
        if k.endswith("self_attn.q_proj.weight"):
            v = v * q_fold
        if k == "lm_head.weight" and scaled_head:
            v = ours["model.embed_tokens.weight"].detach().float() * c.d_model ** -0.5
        state[k] = v
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def to_t5(model):
    """A transformers T5ForConditionalGeneration computing what the ED `model` computes."""
    from transformers import T5Config, T5ForConditionalGeneration

    c = model.config
    cfg = T5Config(
        vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.head_dim, d_ff=c.d_ff, num_layers=c.n_layers,
        num_decoder_layers=c.n_layers, num_heads=c.n_heads, relative_attention_num_buckets=c.rel_buckets,
        relative_attention_max_distance=c.rel_max_distance, dropout_rate=c.dropout, layer_norm_epsilon=c.norm_eps,
        initializer_factor=1.0, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
        # transformers' T5 reads `tie_word_embeddings=False` as "no output scaling" (v1.1) and ties always
        tie_word_embeddings=bool(c.scale_tied_logits), pad_token_id=c.pad_token_id,
        eos_token_id=c.eos_token_id, decoder_start_token_id=c.decoder_start_token_id)
    ref = T5ForConditionalGeneration(cfg)
    ours = model.state_dict()
    fold = _attn_scale(c)  # T5 attention is unscaled
    state = {}
    for k in ref.state_dict():
        name = t5_key(k) or "shared.weight"  # the stacks' embed_tokens are the shared matrix
        v = ours[name].detach().float().clone()
        if k.endswith("Attention.q.weight"):
            v = v * fold
        state[k] = v
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def write_remote_code(model, out: Path) -> None:
    """save_pretrained plus our modeling files and `auto_map`, for trust_remote_code=True."""
    c = model.config
    auto = "AutoModelForSeq2SeqLM" if isinstance(c, EncoderDecoderConfig) else "AutoModelForCausalLM"
    c.auto_map = {"AutoConfig": f"config.{type(c).__name__}", auto: f"models.{type(model).__name__}"}
    try:
        model.save_pretrained(out)
    finally:
        del c.auto_map
    for f in remote_modules():
        shutil.copy(f, out / f.name)


def save_for_transformers(model, out, tokenizer=None, dtype: Optional[torch.dtype] = None) -> str:
    """Write `model` (and `tokenizer`) to `out` in the most native form it maps onto; returns
    "llama", "t5" or "remote-code", also recorded in out/archscale_export.json with the reason.
    `dtype`: the weights' dtype on disk (config.json's `dtype` says it; from_pretrained loads
    it so); None = the model's. The cast comes last, after any scale is folded into a weight
    (in the model's precision), and `model` itself is left as it was."""
    import copy

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    form, why = native_form(model.config)

    def cast(m):
        return m if dtype is None else m.to(dtype)

    with torch.no_grad():
        if form == "llama":
            cast(to_llama(model)).save_pretrained(out)
        elif form == "t5":
            cast(to_t5(model)).save_pretrained(out)
        else:
            form = "remote-code"
            write_remote_code(model if dtype is None else cast(copy.deepcopy(model)), out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "archscale_export.json").write_text(json.dumps(
        {"form": form, "why_not_native": why, "arch": model.config.arch,
         "archscale_config": model.config.to_diff_dict()}, indent=1, default=str) + "\n")
    return form
