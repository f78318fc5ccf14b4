"""Every attention mask of the project, written once.

For a query token q and a key token k of one row (decoder self-attention):

    allowed(q, k) = same_segment(q, k) and (
                      direction(h, layer)(q, k)   if bidir[q] and bidir[k]   # both in a bidirectional prefix
                      else k <= q )                                         # causal everywhere else

`direction` is `full` (always true), `forward` (k <= q: lower-triangular) or `backward`
(k >= q: upper-triangular). bidirectional_mode="forward" gives every layer the forward direction
(a causal encoder; an ND prefix read causally, i.e. CD's mask). Mixed-direction attention gives half of the heads (`mixed_heads`) or
every other layer (`mixed_layers`) the backward direction, so each head's matrix over the prefix
is triangular (full rank) while the block as a whole stays bidirectional. (This refines the
formula in shared/DESIGN.md, `k <= q or (bidir and direction)`, under which a backward head would
see the whole prefix again: see docs/design.md.)

* CD: no bidirectional tokens, so `same_segment and k <= q`.
* ND: `bidir` marks each example's prefix.
* Encoder: every token is bidirectional and nothing is causal: `same_segment and direction`.
* Cross-attention: `same_segment` alone (decoder segment s sees encoder segment s).

Padding is its own segment, so every query sees at least itself and no softmax row is empty.

A mask is described by compact per-token tensors (`MaskSpec`: segment ids, bidirectional flags,
the query offset of a KV cache) and turned, once per forward pass, into what the kernel needs:
nothing for plain causal / full attention (flash SDPA), a flex-attention `BlockMask` (GPU path),
or a dense boolean `[B, H|1, Tq, Tk]` tensor (reference path, CPU). Pipeline stages carry the
per-token tensors, never a dense mask. The T5 relative-position bias is a score modification
(`PositionBias`) kept next to the masks, never a dense `[B, H, T, T]` tensor on the GPU path.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Callable, Optional

import torch
from torch import Tensor

DIRECTIONS = ("full", "forward", "backward", "mixed_heads")

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (b, h, q_idx, kv_idx) -> bool


# --------------------------------------------------------------------------------------------
# Predicates. Each works on broadcastable index tensors (dense masks) and on the scalar index
# tensors flex attention traces them with.
# --------------------------------------------------------------------------------------------
def same_segment(q_seg: Tensor, kv_seg: Tensor, offset: int = 0) -> MaskMod:
    return lambda b, h, q, k: q_seg[b, q + offset] == kv_seg[b, k]


def causal(offset: int = 0) -> MaskMod:
    """k <= q, where query i sits at key index offset + i (KV cache)."""
    return lambda b, h, q, k: k <= q + offset


def anticausal(offset: int = 0) -> MaskMod:
    return lambda b, h, q, k: k >= q + offset


def direction(name: str, n_heads: int, offset: int = 0) -> Optional[MaskMod]:
    """The predicate of a bidirectional block: None for `full` (no constraint)."""
    if name == "full":
        return None
    if name == "forward":
        return causal(offset)
    if name == "backward":
        return anticausal(offset)
    if name == "mixed_heads":  # heads [0, H/2) forward, [H/2, H) backward
        half = n_heads // 2
        return lambda b, h, q, k: torch.where(h < half, k <= q + offset, k >= q + offset)
    raise ValueError(f"direction={name!r} is not valid; choose one of {', '.join(DIRECTIONS)}")


def both_bidirectional(bidir: Tensor, offset: int = 0) -> MaskMod:
    return lambda b, h, q, k: bidir[b, q + offset] & bidir[b, k]


def and_(*mods: Optional[MaskMod]) -> MaskMod:
    mods = [m for m in mods if m is not None]

    def mod(b, h, q, k):
        out = mods[0](b, h, q, k)
        for m in mods[1:]:
            out = out & m(b, h, q, k)
        return out

    return mod


def where(cond: MaskMod, if_true: Optional[MaskMod], if_false: MaskMod) -> MaskMod:
    """cond ? if_true : if_false (if_true None means always allowed)."""
    if if_true is None:
        return lambda b, h, q, k: cond(b, h, q, k) | if_false(b, h, q, k)
    return lambda b, h, q, k: torch.where(cond(b, h, q, k), if_true(b, h, q, k), if_false(b, h, q, k))


# --------------------------------------------------------------------------------------------
# The compact description of one attention call's mask.
# --------------------------------------------------------------------------------------------
@dataclass
class MaskSpec:
    """Per-token description of a mask; see the module docstring for the formula.

    Self-attention tensors are given once, over the keys, and query i reads them at key index
    offset + i (offset = the number of cached tokens; 0 without a KV cache). This keeps one
    tensor per quantity, which flex attention's compiled kernels need (no aliased inputs).
    segments [B, Tk]: segment ids (None = one segment per row).
    bidir [B, Tk]: bidirectional-prefix flags (None = none: CD).
    causal: decoder self-attention (False: encoder self-attention or cross-attention).
    direction: full | forward | backward | mixed_heads, for the bidirectional block.
    cross: cross-attention: only `same_segment` applies, between cross_q_segments [B, Tq] (the
    decoder's) and `segments` (the encoder's); no segments at all: every key is visible.
    """

    segments: Optional[Tensor]
    q_len: int
    kv_len: int
    causal: bool
    bidir: Optional[Tensor] = None
    offset: int = 0
    direction: str = "full"
    cross: bool = False
    cross_q_segments: Optional[Tensor] = None
    n_heads: int = 1

    @property
    def per_head(self) -> bool:
        return self.direction == "mixed_heads" and not self.cross and (self.bidir is not None or not self.causal)

    def plain(self) -> Optional[str]:
        """'causal' or 'full' when flash SDPA alone computes this mask, else None.

        Decided from which tensors are present, never from their values (no host sync).
        """
        if self.segments is not None or self.cross_q_segments is not None:
            return None
        if self.cross:
            return "full"
        if not self.causal:  # encoder self-attention: full, or forward (a causal encoder)
            return {"full": "full", "forward": "causal" if self.offset == 0 else None}.get(self.direction)
        if self.bidir is not None:
            return None
        # causal with a cache offset: SDPA's is_causal is top-left aligned, so only Tq == 1
        # (sees everything) or no offset are plain.
        if self.q_len == 1:
            return "full"
        return "causal" if self.offset == 0 else None

    def mask_mod(self) -> MaskMod:
        off = self.offset
        if self.cross and self.segments is None and self.cross_q_segments is None:
            return lambda b, h, q, k: torch.ones_like(q + k, dtype=torch.bool)
        if self.cross:
            if self.segments is None or self.cross_q_segments is None:
                raise ValueError("cross-attention needs segment ids on both sides (decoder and encoder) or on neither")
            return same_segment(self.cross_q_segments, self.segments)
        seg = same_segment(self.segments, self.segments, off) if self.segments is not None else None
        if not self.causal:
            allowed = direction(self.direction, self.n_heads, off)
        elif self.bidir is None:
            allowed = causal(off)
        else:
            allowed = where(both_bidirectional(self.bidir, off), direction(self.direction, self.n_heads, off),
                            causal(off))
        mods = [m for m in (seg, allowed) if m is not None]
        if not mods:
            return lambda b, h, q, k: torch.ones_like(q + k, dtype=torch.bool)
        return and_(*mods)

    def dense(self, batch_size: int, device) -> Tensor:
        """Boolean [B, H|1, Tq, Tk] mask (reference path)."""
        n_h = self.n_heads if self.per_head else 1
        b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)
        h = torch.arange(n_h, device=device).view(1, -1, 1, 1)
        q = torch.arange(self.q_len, device=device).view(1, 1, -1, 1)
        k = torch.arange(self.kv_len, device=device).view(1, 1, 1, -1)
        m = self.mask_mod()(b, h, q, k)
        return m.expand(batch_size, n_h, self.q_len, self.kv_len)

    def keys_per_query(self, batch_size: int, device) -> Tensor:
        """(B, H|1, Tq) float: how many keys each query attends to (its mask row's count):
        from the shape for plain causal / full attention, else counted on the dense mask."""
        plain = self.plain()
        if plain == "full":
            return torch.full((batch_size, 1, self.q_len), float(self.kv_len), device=device)
        if plain == "causal":  # no offset (plain() says so): query i sees keys 0..i
            return torch.arange(1, self.q_len + 1, device=device, dtype=torch.float).expand(batch_size, 1, -1)
        return self.dense(batch_size, device).sum(-1).float()

    def entropy_factor(self, batch_size: int, device, dtype=None) -> Tensor:
        """(B, H|1, Tq, 1): log_512(n) of each query's n = keys_per_query (the entropy-invariant
        attention scale, Su 2021: logits x log_512(n) / sqrt(d); 1 at n = 512, 0 at n = 1)."""
        n = self.keys_per_query(batch_size, device)
        return (n.clamp(min=1).log() / math.log(512.0)).unsqueeze(-1).to(dtype or torch.float)

    def block_mask(self, batch_size: int, device):
        """flex-attention BlockMask (built once per forward pass and shared by the layers)."""
        from torch.nn.attention.flex_attention import create_block_mask

        n_h = self.n_heads if self.per_head else None
        # on GPUs the mask is built by a compiled kernel (the eager build evaluates mask_mod on
        # every (b, h, q, k) at once: B x H x Tq x Tk booleans); shapes are static, tensor values
        # are inputs, so another batch of the same shapes reuses the compiled build
        with torch.no_grad():  # a mask needs no gradient (and grad mode would double the compiled builds)
            return create_block_mask(self.mask_mod(), batch_size, n_h, self.q_len, self.kv_len, device=device,
                                     _compile=torch.device(device).type == "cuda")


# --------------------------------------------------------------------------------------------
# T5 relative position bias as a score modification.
# --------------------------------------------------------------------------------------------
def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """T5's bucketing of (key position - query position).

    Half of the buckets (all of them when unidirectional) hold exact small distances; the rest
    grow logarithmically up to `max_distance`, beyond which distances share the last bucket.
    Unidirectional: keys after the query all map to bucket 0 (they are masked anyway).
    """
    ret = torch.zeros_like(relative_position)
    n = num_buckets
    if bidirectional:
        n //= 2
        ret = ret + (relative_position > 0).long() * n
        dist = relative_position.abs()
    else:
        dist = (-relative_position).clamp(min=0)
    max_exact = n // 2
    is_small = dist < max_exact
    # log-spaced buckets for max_exact <= dist < max_distance; fp32 math exactly as in T5, so
    # that bucket boundaries match its checkpoints
    large = max_exact + (
        torch.log(dist.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
        * (n - max_exact)
    ).long()
    large = large.clamp(max=n - 1)
    return ret + torch.where(is_small, dist, large)


@dataclass
class PositionBias:
    """Additive score bias table[clamp(pos[k] - pos[q]) + span, h] (T5 relative positions).

    table [2*span+1, H]: the bias for every relative distance in [-span, span] (distances are
    clamped to that range: beyond it all share T5's last bucket), computed once per forward from
    the learned bucket embedding. positions [B, Tk]: per-token positions of the keys (they restart
    at 0 in every packed example, so distances are measured within an example); query i is key
    offset + i.
    """

    table: Tensor
    positions: Tensor
    offset: int
    span: int

    def dense(self) -> Tensor:
        pos = self.positions
        rel = pos[:, None, :] - pos[:, self.offset:, None]  # (B, Tq, Tk)
        return self.table[rel.clamp(-self.span, self.span) + self.span].permute(0, 3, 1, 2)  # (B, H, Tq, Tk)

    def score_mod(self):
        table, pos, off, span = self.table, self.positions, self.offset, self.span

        def mod(score, b, h, q, k):
            return score + table[torch.clamp(pos[b, k] - pos[b, q + off], -span, span) + span, h].to(score.dtype)

        return mod
