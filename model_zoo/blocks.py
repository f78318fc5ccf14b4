"""The one block library: norms, MLPs, RoPE, T5 relative bias, attention, the residual block and
the stack of blocks that CD, ND, the ED encoder and the ED decoder are all made of.

Shapes: B batch, T / Tq / Tk sequence lengths, D d_model, H heads, hd head_dim.
Parameter names follow Llama's (`input_layernorm`, `self_attn.q_proj`, `mlp.gate_proj`, ...),
so a Llama-shaped CD checkpoint maps onto ours key for key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import MaskSpec, PositionBias, relative_position_bucket


# ------------------------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """x / rms(x) * weight, statistics in fp32 (T5 / Llama); no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


# -------------------------------------------------------------------------------------- MLPs
class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): GEGLU (tanh GELU, T5.1.1's gated-gelu) or SwiGLU (Llama)."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = F.silu if config.mlp == "swiglu" else (lambda x: F.gelu(x, approximate="tanh"))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # (B, T, D)


class MLP(nn.Module):
    """down(gelu(up(x))): the ungated GPT-2 MLP."""

    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def make_mlp(config) -> nn.Module:
    return MLP(config) if config.mlp == "gelu" else GatedMLP(config)


# ---------------------------------------------------------------------------------- positions
def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, T, hd] for rotary embeddings at `positions` [B, T] (Llama convention:
    frequencies theta^(-2i/hd), the two halves of each head rotated together)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (B, H, T, hd)


class RelativePositionBias(nn.Module):
    """T5 relative-position buckets -> one learned scalar per bucket and head, shared by all
    layers of a stack. Produces a `PositionBias` (a table over distances, not a [T, T] tensor)."""

    def __init__(self, config, bidirectional: bool):
        super().__init__()
        self.relative_attention_bias = nn.Embedding(config.rel_buckets, config.n_heads)
        self.bidirectional = bidirectional
        self.num_buckets = config.rel_buckets
        self.max_distance = config.rel_max_distance

    def forward(self, positions: Tensor, offset: int) -> PositionBias:
        # Distances at or beyond max_distance all share the last bucket, so a table over
        # [-max_distance, max_distance] with clamped distances is exact for any length, and its
        # size is fixed (no host sync to find the longest distance).
        span = self.max_distance
        rel = torch.arange(-span, span + 1, device=positions.device)
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        table = self.relative_attention_bias(buckets)  # (2*span+1, H)
        return PositionBias(table=table, positions=positions, offset=offset, span=span)


# ---------------------------------------------------------------------------------- attention
def resolve_impl(impl: str, device: torch.device, training: bool = True) -> str:
    """The kernel `impl` runs as. auto: compiled flex attention for training on CUDA (static
    shapes, block-sparse masks); SDPA otherwise: on CPU, and for inference (no gradients, or a KV
    cache), whose shapes change from batch to batch and step to step (generation, evaluation
    batches of any length), where a statically compiled kernel would recompile for each."""
    if impl == "auto":
        return "flex" if device.type == "cuda" and training else "sdpa"
    return impl


@dataclass
class ReadyMask:
    """A MaskSpec turned into what one kernel consumes (built once per forward pass)."""

    plain: Optional[str] = None  # "causal" | "full": flash SDPA, no mask tensor
    dense: Optional[Tensor] = None  # bool (B, H|1, Tq, Tk): reference / SDPA paths
    block: object = None  # flex BlockMask
    q_scale: Optional[Tensor] = None  # (B, H|1, Tq, 1): entropy_scale's log_512(n) per query, applied to q


def prepare_mask(spec: MaskSpec, impl: str, batch_size: int, device, has_bias: bool,
                 entropy_scale: bool = False, dtype=None) -> ReadyMask:
    """The mask `impl` consumes; entropy_scale: also each query's log_512(keys it attends to)
    (masks.MaskSpec.entropy_factor), which multiplies q and so every kernel's logits."""
    q_scale = spec.entropy_factor(batch_size, device, dtype) if entropy_scale else None
    plain = None if has_bias else spec.plain()
    if plain is not None and impl != "reference":
        return ReadyMask(plain=plain, q_scale=q_scale)
    if impl == "flex":
        return ReadyMask(block=spec.block_mask(batch_size, device), q_scale=q_scale)
    return ReadyMask(dense=spec.dense(batch_size, device), q_scale=q_scale)


_compiled_flex = None
COMPILED_FLEX_DEVICES = ("cuda",)  # device types whose eager flex calls go through one compiled wrapper


def allow_compiled_variants(n: int = 32) -> None:
    """Let torch.compile keep `n` compiled variants per function (default 8): compiled flex and
    compiled blocks get one per stack kind x mask direction x train/eval mode, which an ED model
    with mixed-direction layers, or a model and its evaluation, exceed; past the limit torch
    silently runs the function eagerly."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, n)


def _flex(q, k, v, **kw):
    """flex attention, compiled on CUDA (the eager version materialises the scores).

    Pitfalls: inside a compiled block (model.compile) flex is traced as part of the block, whose
    compilation covers it; calling the compiled wrapper there would make the block's graph guard
    on `_compiled_flex is None`, and every stack recompile once when the first trace sets it.
    Torch 2.13 on CPU: inductor's CPU flex template reads the storage of q and k as 4-D, so a
    compiled block whose q / k are views of a projection's 2-D output (no RoPE between) fails
    to compile ("not enough values to unpack (expected 4, got 2)"): on CPU they are made
    contiguous first (a copy; flex on CPU is a test path, `auto` picks SDPA there)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if q.device.type == "cpu":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if q.device.type not in COMPILED_FLEX_DEVICES or torch.compiler.is_compiling():
        return flex_attention(q, k, v, **kw)
    if _compiled_flex is None:
        allow_compiled_variants()
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, **kw)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: ReadyMask, bias: Optional[PositionBias], scale: float,
           impl: str, record: Optional[list] = None) -> Tensor:
    """softmax(q k^T * scale + bias, masked) v for q (B, H, Tq, hd), k / v (B, H, Tk, hd)."""
    if record is not None or impl == "reference":
        scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, Tq, Tk)
        if bias is not None:
            scores = scores + bias.dense().float()
        if mask.dense is not None:
            scores = scores.masked_fill(~mask.dense, float("-inf"))
        elif mask.plain == "causal":
            tq, tk = scores.shape[-2:]
            scores = scores.masked_fill(torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        probs = scores.softmax(-1).nan_to_num(0.0)  # a row with no allowed key attends to nothing
        if record is not None:
            record.append(probs.detach())
        return probs.to(v.dtype) @ v  # (B, H, Tq, hd)
    if mask.plain is not None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask.plain == "causal", scale=scale)
    if mask.block is not None:
        return _flex(q, k, v, score_mod=bias.score_mod() if bias is not None else None, block_mask=mask.block,
                     scale=scale)
    attn_mask = mask.dense
    if bias is not None:
        attn_mask = bias.dense().to(q.dtype).masked_fill(~mask.dense, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


class Attention(nn.Module):
    """Multi-head self- or cross-attention; no biases (`qk_bias`: q_proj and k_proj have one).
    RoPE (self-attention only) and the T5 bias come in from the stack; the kernel is chosen by
    `attend`. With `entropy_scale` the mask carries each query's log_512(n) factor, applied to q
    after RoPE, so the logits are q.k x log_512(n) x scale on every kernel."""

    def __init__(self, config):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        inner = config.n_heads * config.head_dim
        self.q_proj = nn.Linear(config.d_model, inner, bias=config.qk_bias)
        self.k_proj = nn.Linear(config.d_model, inner, bias=config.qk_bias)
        self.v_proj = nn.Linear(config.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.d_model, bias=False)
        self.scale = config.head_dim ** -0.5 if config.scale_attn else 1.0
        self.record: Optional[list] = None  # set to a list to collect attention probabilities

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def forward(self, x: Tensor, mask: ReadyMask, impl: str, *, kv_input: Optional[Tensor] = None,
                bias: Optional[PositionBias] = None, rope: Optional[tuple] = None, cache=None,
                layer_idx: int = 0) -> Tensor:
        """cache: self-attention, the KV cache the new keys join; cross-attention (kv_input given),
        the cache that holds kv_input's keys and values once computed: the first decode step of a
        generation fills it, every later step reads it (the encoder output does not change)."""
        b, t, _ = x.shape
        q = self._heads(self.q_proj(x))
        if kv_input is not None:
            k, v = self._cross_kv(kv_input, cache, layer_idx)
        else:
            k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
            if rope is not None:
                cos, sin = rope
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache is not None:
                k, v = cache.update(k, v, layer_idx)  # (B, H, Tk, hd): cached keys + these
        if mask.q_scale is not None:
            q = q * mask.q_scale  # entropy_scale: log_512(keys this query attends to)
        out = attend(q, k, v, mask, bias, self.scale, impl, self.record)  # (B, H, Tq, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _cross_kv(self, kv_input: Tensor, cache, layer_idx: int) -> tuple[Tensor, Tensor]:
        """Keys and values of the encoder output, (B, H, Ti, hd): from `cache` (a transformers
        DynamicCache) when this layer's are there, else computed (and stored when a cache is given)."""
        if cache is not None and cache.get_seq_length(layer_idx) > 0:
            layer = cache.layers[layer_idx]
            return layer.keys, layer.values
        k, v = self._heads(self.k_proj(kv_input)), self._heads(self.v_proj(kv_input))
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        return k, v


class Block(nn.Module):
    """Pre-norm residual block: self-attention, [cross-attention], MLP.

    `forward(x, ctx, layer_idx)` picks this layer's mask from the stack's context and runs
    `body`, which takes only what one layer needs (no layer index), so that a compiled body
    serves every layer of a stack with one graph. `runner`, when set from outside (training:
    train.engine.runtime.prepare_blocks), is `body` wrapped in activation checkpointing and/or
    torch.compile; generation with a KV cache and attention recording always run `body` eagerly.
    """

    runner = None  # Optional[Callable]: body, checkpointed and/or compiled (set from outside)
    SHARED = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")  # what share_with reuses

    def __init__(self, config, cross: bool, share_with: Optional["Block"] = None):
        """share_with: another stack's block whose self-attention, MLP and their norms this block
        runs (ED's share_encoder_decoder). They stay that block's submodules only (held here
        without registering them), so the weights are stored, counted and updated once."""
        super().__init__()
        if share_with is not None:
            for name in self.SHARED:
                object.__setattr__(self, name, getattr(share_with, name))  # not a submodule here
        else:  # (the order of creation is the order of initialisation: kept as it always was)
            self.input_layernorm = make_norm(config)
            self.self_attn = Attention(config)
        if cross:
            self.cross_attn_layernorm = make_norm(config)
            self.cross_attn = Attention(config)
        if share_with is None:
            self.post_attention_layernorm = make_norm(config)
            self.mlp = make_mlp(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, ctx: "StackContext", layer_idx: int) -> Tensor:
        mask = ctx.self_mask(layer_idx)
        if self.runner is None or ctx.cache is not None or self.self_attn.record is not None:
            return self.body(x, mask, ctx.impl, ctx.bias, ctx.rope, ctx.encoder_hidden, ctx.cross_mask, ctx.cache,
                             layer_idx, ctx.cross_cache)
        return self.runner(x, mask, ctx.impl, ctx.bias, ctx.rope, ctx.encoder_hidden, ctx.cross_mask)

    def body(self, x: Tensor, mask: "ReadyMask", impl: str, bias: Optional[PositionBias], rope: Optional[tuple],
             encoder_hidden: Optional[Tensor], cross_mask: Optional["ReadyMask"], cache=None,
             layer_idx: int = 0, cross_cache=None) -> Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), mask, impl, bias=bias, rope=rope, cache=cache,
                                            layer_idx=layer_idx))
        if encoder_hidden is not None:
            x = x + self.dropout(self.cross_attn(self.cross_attn_layernorm(x), cross_mask, impl,
                                                 kv_input=encoder_hidden, cache=cross_cache, layer_idx=layer_idx))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))  # (B, T, D)


# -------------------------------------------------------------------------------------- stack
@dataclass
class StackContext:
    """Everything the layers of one stack share in one forward pass, built once."""

    impl: str
    masks: dict  # direction name -> ReadyMask
    layer_directions: list  # direction name of each layer
    bias: Optional[PositionBias] = None
    rope: Optional[tuple] = None
    cache: object = None  # self-attention KV cache
    cross_cache: object = None  # cross-attention KV cache (the encoder output's keys and values)
    encoder_hidden: Optional[Tensor] = None
    cross_mask: Optional[ReadyMask] = None

    def self_mask(self, layer_idx: int) -> ReadyMask:
        return self.masks[self.layer_directions[layer_idx]]


def positions_from_segments(segment_ids: Tensor) -> Tensor:
    """Position of each token within its (contiguous) segment: restarts at 0 at every change."""
    b, t = segment_ids.shape
    idx = torch.arange(t, device=segment_ids.device).expand(b, t)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values  # index of segment start
    return idx - first


class Stack(nn.Module):
    """`n_layers` blocks (config.n_layers unless given) and a final norm, with the stack's own
    position encoding.

    causal: decoder self-attention (CD / ND / ED decoder) or not (encoder).
    cross: blocks carry cross-attention (ED decoder).
    share_with: a stack of as many blocks whose self-attention and MLP weights these blocks run.
    The bidirectional part of the mask comes from `bidirectional` flags (ND) or, for the
    encoder, is everything; its direction per layer / head is `config.bidirectional_mode`.
    """

    def __init__(self, config, causal: bool, cross: bool, rel_bidirectional: bool, n_layers: Optional[int] = None,
                 share_with: Optional["Stack"] = None):
        super().__init__()
        self.config = config
        self.causal = causal
        n = config.n_layers if n_layers is None else n_layers
        shared = [None] * n if share_with is None else list(share_with.layers)
        self.layers = nn.ModuleList(Block(config, cross, shared[i]) for i in range(n))
        self.norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)
        if config.position == "t5_bias":
            self.rel_bias = RelativePositionBias(config, bidirectional=rel_bidirectional)
        if config.position == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.d_model)

    def layer_directions(self, has_bidirectional: bool) -> list[str]:
        mode = self.config.bidirectional_mode
        if not has_bidirectional or mode == "full":
            return ["full"] * len(self.layers)
        if mode in ("mixed_heads", "forward"):
            return [mode] * len(self.layers)
        return ["forward" if i % 2 == 0 else "backward" for i in range(len(self.layers))]

    def build_context(self, hidden: Tensor, *, segments: Optional[Tensor], positions: Tensor,
                      bidirectional: Optional[Tensor], offset: int, cache=None,
                      encoder_hidden: Optional[Tensor] = None, encoder_segments: Optional[Tensor] = None,
                      cross_segments: Optional[Tensor] = None, cross_cache=None) -> StackContext:
        """Masks, position bias and RoPE for all layers of one forward pass.

        segments, positions, bidirectional: [B, Tk] over all keys (cached + new); the queries are
        the last Tq = hidden.shape[1] of them (offset = Tk - Tq). cross_segments [B, Tq]: the
        queries' segments for cross-attention against encoder_segments [B, Ti].
        """
        cfg = self.config
        b, tq, _ = hidden.shape
        tk = positions.shape[1]
        impl = resolve_impl(cfg.attn_impl, hidden.device, training=torch.is_grad_enabled() and cache is None)
        bias = self.rel_bias(positions, offset) if cfg.position == "t5_bias" else None
        rope = rope_cos_sin(positions[:, offset:], cfg.head_dim, cfg.rope_theta, hidden.dtype) \
            if cfg.position == "rope" else None
        has_bidir = (not self.causal) or bidirectional is not None
        directions = self.layer_directions(has_bidir)
        masks = {}
        for d in dict.fromkeys(directions):
            spec = MaskSpec(segments=segments, q_len=tq, kv_len=tk, causal=self.causal, bidir=bidirectional,
                            offset=offset, direction=d, n_heads=cfg.n_heads)
            masks[d] = prepare_mask(spec, impl, b, hidden.device, has_bias=bias is not None,
                                    entropy_scale=cfg.entropy_scale, dtype=hidden.dtype)
        cross_mask = None
        if encoder_hidden is not None:
            spec = MaskSpec(segments=encoder_segments, q_len=tq, kv_len=encoder_hidden.shape[1], causal=False,
                            cross=True, cross_q_segments=cross_segments, n_heads=cfg.n_heads)
            cross_mask = prepare_mask(spec, impl, b, hidden.device, has_bias=False, entropy_scale=cfg.entropy_scale,
                                      dtype=hidden.dtype)
        return StackContext(impl=impl, masks=masks, layer_directions=directions, bias=bias, rope=rope, cache=cache,
                            cross_cache=cross_cache, encoder_hidden=encoder_hidden, cross_mask=cross_mask)

    def run(self, hidden: Tensor, ctx: StackContext, positions: Tensor) -> Tensor:
        """positions [B, Tq]: of the new tokens (learned absolute positions)."""
        if self.config.position == "learned":
            hidden = hidden + self.embed_positions(positions)
        hidden = self.dropout(hidden)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, ctx, i)
        return self.dropout(self.norm(hidden))  # (B, T, D)
