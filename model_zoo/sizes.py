"""Named sizes, `build`, the analytic parameter count and the FLOPs formula.

Sizes follow the T5 v1.1 ladder of shapes, whose largest, `xxl`, is exactly the reference
experiment's (Wang et al. 2022): 24 layers, d_model 4096, 64 heads of 64, d_ff 10240 GEGLU,
vocab 32128. The same shape is a 4.8B-parameter CD/ND model and an 11B ED model (24 encoder +
24 decoder layers), hence the aliases `4.8b` and `11b`. A size fixes the shape; every other
option keeps the reference defaults (config.COMMON_DEFAULTS) unless overridden.
"""
from __future__ import annotations

from types import MappingProxyType

from .models import DecoderLM, EncoderDecoderLM

SIZES: dict[str, dict] = {
    # tiny, for tests and CPU debugging: seconds per step on a laptop
    "debug": dict(d_model=64, n_layers=2, n_heads=4, head_dim=16, d_ff=128, vocab_size=512),
    "tiny": dict(d_model=256, n_layers=4, n_heads=4, head_dim=64, d_ff=640),
    "small": dict(d_model=512, n_layers=8, n_heads=6, head_dim=64, d_ff=1024),  # T5.1.1-small
    "base": dict(d_model=768, n_layers=12, n_heads=12, head_dim=64, d_ff=2048),  # T5.1.1-base
    "large": dict(d_model=1024, n_layers=24, n_heads=16, head_dim=64, d_ff=2816),  # T5.1.1-large
    "xl": dict(d_model=2048, n_layers=24, n_heads=32, head_dim=64, d_ff=5120),  # T5.1.1-xl
    "xxl": dict(d_model=4096, n_layers=24, n_heads=64, head_dim=64, d_ff=10240),  # the reference shape
}
ALIASES = {"4.8b": "xxl", "11b": "xxl"}  # the reference CD/ND and ED models
MODEL_CLASSES = (DecoderLM, EncoderDecoderLM)  # every model class; each names its config_class

# The notebook names (`build("nd", "debug")`): the one table from a name to a model class and the
# settings that make it that architecture. Nothing in model_zoo reads a name again: behaviour
# follows the config's class and fields. train/registry builds through the classes, not this table.
ARCHS = MappingProxyType({
    "cd": (DecoderLM, MappingProxyType({})),
    "nd": (DecoderLM, MappingProxyType({"prefix_attention": True})),
    "ed": (EncoderDecoderLM, MappingProxyType({})),
})


def size_names() -> list[str]:
    return list(SIZES) + list(ALIASES)


def _arch(arch: str):
    """(model class, fixed settings) of a notebook name; one line naming the valid ones if unknown."""
    key = arch.lower() if isinstance(arch, str) else arch
    if key not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[key]


def option_names(arch=None) -> list[str]:
    """The model options a user may set (`build(arch, ..., **overrides)`): of a notebook name or a
    config class (None: those of every architecture)."""
    if arch is None:
        return sorted(set().union(*(m.config_class.option_names() for m in MODEL_CLASSES)))
    config_class = _arch(arch)[0].config_class if isinstance(arch, str) else arch
    return sorted(config_class.option_names())


def sized_config(config_class, size: str = "debug", fixed=None, **options):
    """`config_class` at a named `size`, with the user's `options` (validated against
    config_class.option_names()) over the `fixed` settings that make an architecture what it is
    (ND: prefix_attention=True). Pitfall: an option may not contradict a fixed setting (that
    would silently be another architecture); it fails naming both."""
    key = ALIASES.get(size, size)
    if key not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(size_names())}")
    valid = config_class.option_names()
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(valid))}")
    fixed = dict(fixed or {})
    clash = [f"{k}={options[k]!r}" for k in fixed if k in options and options[k] != fixed[k]]
    if clash:
        what = ", ".join(f"{k}={v!r}" for k, v in fixed.items())
        raise ValueError(f"model option {', '.join(clash)} contradicts this architecture's {what}; "
                         f"drop the option or choose the other architecture")
    return config_class(**{**SIZES[key], **options, **fixed})


def instantiate(model_class, config, *, device=None, dtype=None):
    """A freshly initialised `model_class(config)`; device="meta" builds the structure without
    memory (parameter counting, planning)."""
    import torch

    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            model = model_class(config)
    else:
        model = model_class(config)
        if device is not None:
            model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model


def model_class(config):
    """The model class that runs `config` (by its config class)."""
    for cls in MODEL_CLASSES:
        if isinstance(config, cls.config_class):
            return cls
    raise ValueError(f"{type(config).__name__} is not an archscale config; "
                     f"use one of {', '.join(m.config_class.__name__ for m in MODEL_CLASSES)}")


def make_config(arch: str, size: str = "debug", **overrides):
    """The HF config of a notebook name (`ARCHS`: "cd" | "nd" | "ed") at a named `size`."""
    cls, fixed = _arch(arch)
    return sized_config(cls.config_class, size, fixed, **overrides)


def build(arch: str, size: str = "debug", *, device=None, dtype=None, **overrides):
    """A freshly initialised model: `build("cd", "debug")`, `build("ed", "11b", device="meta")`."""
    cls, fixed = _arch(arch)
    return instantiate(cls, sized_config(cls.config_class, size, fixed, **overrides), device=device, dtype=dtype)


# ------------------------------------------------------------------------------- parameters
def _block_params(c, cross: bool, shared: bool = False) -> int:
    """One block's own parameters; `shared`: an ED decoder block of share_encoder_decoder (its
    self-attention, MLP and their norms are the encoder block's, so only its cross-attention counts)."""
    d, inner = c.d_model, c.n_heads * c.head_dim
    norm = d if c.norm == "rmsnorm" else 2 * d  # LayerNorm has a bias
    attn = 4 * d * inner + (2 * inner if c.qk_bias else 0)  # q, k, v, o (+ the q and k biases)
    mlp = (3 if c.mlp in ("geglu", "swiglu") else 2) * d * c.d_ff
    own = 0 if shared else attn + mlp + 2 * norm
    return own + ((attn + norm) if cross else 0)


def _stack_params(c, n_layers: int, cross: bool, shared: bool = False) -> int:
    norm = c.d_model if c.norm == "rmsnorm" else 2 * c.d_model
    pos = {"t5_bias": c.rel_buckets * c.n_heads, "learned": c.max_position_embeddings * c.d_model}.get(c.position, 0)
    return n_layers * _block_params(c, cross, shared) + norm + pos


def embedding_params(config) -> int:
    """Parameters of the token embedding and of an untied LM head (vocab x d_model each): the part
    of `num_params` that scaling ladders leave out (OLMo-core and Chinchilla count non-embedding N)."""
    c = config
    return c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)


def num_params(config, embeddings: bool = True) -> int:
    """Parameters of the model `config` describes, counting tied (and shared) matrices once;
    embeddings=False leaves out `embedding_params` (the non-embedding count)."""
    c = config
    if not embeddings:
        return num_params(c) - embedding_params(c)
    embed = c.vocab_size * c.d_model
    head = 0 if c.tie_embeddings else embed
    if c.is_encoder_decoder:
        return (embed + head + _stack_params(c, c.encoder_depth, cross=False)
                + _stack_params(c, c.decoder_depth, cross=True, shared=c.share_encoder_decoder))
    return embed + head + _stack_params(c, c.n_layers, cross=False)


# ------------------------------------------------------------------------------------ FLOPs
def attended_pairs(seq_len: int, prefix_len: int = 0, causal: bool = True) -> float:
    """Number of (query, key) pairs a mask allows in one example of `seq_len` tokens.

    causal: T(T+1)/2. Prefix of p tokens (ND): p^2 + sum_{i=p}^{T-1} (i+1). Bidirectional
    (encoder): T^2. Mixed-direction heads count as their union (the kernel computes whole blocks).
    """
    t, p = seq_len, min(prefix_len, seq_len)
    if not causal:
        return float(t * t)
    return p * p + (t * (t + 1) - p * (p + 1)) / 2


def train_flops(config, seq_len: int, prefix_len: int = 0, target_len: int = 0) -> float:
    """Training FLOPs (forward + backward = 3 x forward) of one example. Documented formula:

    forward = 2 * (matmul parameters a token passes through) * tokens
            + 4 * n_layers * (n_heads * head_dim) * attended (query, key) pairs
    (2 FLOPs per multiply-add; the attention term is QK^T and AV). The embedding lookup costs
    nothing; the LM head (V x D) counts for every token that produces logits (decoder tokens).

    Decoder (CD / ND): `seq_len` tokens, the first `prefix_len` bidirectional (ND; 0 for CD).
    ED: `seq_len` encoder tokens through `n_encoder_layers` and `target_len` decoder tokens through
    `n_decoder_layers`; the decoder's cross-attention K/V projections run on the encoder tokens
    once per decoder layer. Shared encoder / decoder weights (share_encoder_decoder) cost the
    same FLOPs: each token still passes through them. The bidirectional block counts all its pairs
    whatever `bidirectional_mode` (a causal or mixed-direction block is computed as whole blocks).
    The same formula serves every architecture, so MFU and compute-matched comparisons agree.
    """
    c = config
    d, inner, L = c.d_model, c.n_heads * c.head_dim, c.n_layers
    attn_proj = 4 * d * inner
    mlp = (3 if c.mlp in ("geglu", "swiglu") else 2) * d * c.d_ff
    head = c.vocab_size * d
    if not c.is_encoder_decoder:
        fwd = 2 * (L * (attn_proj + mlp) + head) * seq_len
        fwd += 4 * L * inner * attended_pairs(seq_len, prefix_len if c.prefix_attention else 0, causal=True)
        return 3.0 * fwd
    ti, to, le, ld = seq_len, target_len, c.encoder_depth, c.decoder_depth
    enc = 2 * le * (attn_proj + mlp) * ti + 4 * le * inner * attended_pairs(ti, causal=False)
    cross_kv = 2 * ld * (2 * d * inner) * ti  # k, v projections of the encoder output
    dec = 2 * (ld * (attn_proj + 2 * d * inner + mlp) + head) * to  # self-attn, cross q/o, MLP, head
    dec += 4 * ld * inner * (attended_pairs(to, causal=True) + to * ti)  # self + cross attention
    return 3.0 * (enc + cross_kv + dec)
