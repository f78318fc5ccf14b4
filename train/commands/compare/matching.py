"""Matching a model's size across architectures by width and depth (`compare --match`; a future
`archscale ladder` matches its rungs across cells with the same search).

Two quantities are matched, each within `TOLERANCE` (5%) of the reference cell's:
    params   non-embedding parameters, N = num_params - vocab x d_model (x 2 with an untied head):
             the N of scaling laws (Kaplan et al. 2020; OLMo-core's ladder checks each rung's
             non-embedding count against its target within 5%);
    flops    training FLOPs per token: the registry's row_flops / tokens_per_row (forward +
             backward, attention and LM head included, padding computed).

The search (`search_shape`) chooses d_model, n_heads, d_ff and n_layers together. Candidates:
  - head_dim is the reference's (u); d_model = k x u for k = 1 .. 2 x ref.d_model / u;
  - n_heads = round(d_model x ref.n_heads / ref.d_model), at least 1: the reference's
    attention width per unit of d_model (1 for every named size but `small`);
  - n_layers (per stack for an encoder-decoder, which keeps n_encoder_layers = n_decoder_layers)
    from 1 to `max_layers`; at each width only the two depths whose count, at the reference's
    d_ff / d_model ratio, brackets the target (both quantities grow with depth);
  - d_ff, a multiple of u: both quantities are affine in d_ff, so d_ff is solved for the exact
    target at each (width, depth) from two probes, and its two neighbouring multiples of u are
    candidates (each then counted exactly: the gap printed is measured, not predicted).
Choice: among the candidates within 5%, the one nearest the reference's proportions,
    score = |ln(d_model / ref.d_model)| + |ln((d_ff / d_model) / (ref.d_ff / ref.d_model))|,
ties broken by the smaller gap, then the shallower model. Depth is left out of the score on
purpose: an encoder-decoder's depth is two stacks, and which depth compares (the blocks the model
stores, for parameters; the blocks one token passes, for FLOPs) depends on the quantity. So the
search keeps the width and the MLP ratio, and lets depth and d_ff absorb the difference: matched
on parameters, an encoder-decoder against a decoder of L layers lands near L/2 + L/2 layers with a
smaller d_ff paying for its cross-attention; matched on FLOPs per token, near L + L (each token
passes one stack). Widths are visited nearest the reference first and the visit stops once a
width's own deviation exceeds the best score found.

Pitfalls: at tiny sizes a step of one head of width u moves the count by tens of percent, so the
5% may be reachable only through d_ff; where nothing lands within 5% the search refuses
(`MatchError`, one line with the nearest shape and the fix) rather than run an unmatched cell.
An override the user gave a cell (model.overrides.*) wins over the search: `measure` must build
the cell with the user's values on top, so the count checked is the count the run will have.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

TOLERANCE = 0.05
KINDS = ("params", "flops")
QUANTITY = {"params": "non-embedding parameters", "flops": "training FLOPs per token"}


class MatchError(ValueError):
    """No shape lands within the tolerance (one line: what, why, the fix)."""


@dataclass(frozen=True)
class Shape:
    """The dimensions the search sets (model.overrides.*; n_layers is per stack for ED)."""

    d_model: int
    n_heads: int
    head_dim: int
    d_ff: int
    n_layers: int

    @classmethod
    def of(cls, config) -> "Shape":
        """The shape of a model_zoo config."""
        return cls(config.d_model, config.n_heads, config.head_dim, config.d_ff, config.n_layers)

    def overrides(self) -> dict[str, int]:
        return {"d_model": self.d_model, "n_heads": self.n_heads, "head_dim": self.head_dim, "d_ff": self.d_ff,
                "n_layers": self.n_layers}

    def text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.overrides().items())


@dataclass(frozen=True)
class Match:
    """The chosen shape, its measured quantity and the reference's."""

    kind: str
    shape: Shape
    value: float
    target: float
    searched: bool = False  # True: the search chose the shape; False: the cell's own shape, measured

    @property
    def gap(self) -> float:
        """value / target - 1 (+0.03 = 3% above the reference)."""
        return self.value / self.target - 1


def quantity(kind: str, arch, config, objective) -> float:
    """The matched quantity of a model_zoo `config` of registry entry `arch` under `objective`."""
    if kind == "params":
        return float(arch.num_params(config, embeddings=False))
    return arch.row_flops(config, objective) / arch.tokens_per_row(objective)


def _score(shape: Shape, ref: Shape) -> float:
    """Distance from the reference's proportions (width and MLP ratio, in log space)."""
    width = abs(math.log(shape.d_model / ref.d_model))
    return width + abs(math.log((shape.d_ff / shape.d_model) / (ref.d_ff / ref.d_model)))


def search_shape(kind: str, measure: Callable[[Shape], Optional[float]], ref: Shape, target: float,
                 max_layers: int, tolerance: float = TOLERANCE, what: str = "the cell") -> Match:
    """The shape nearest `ref`'s proportions whose `measure` is within `tolerance` of `target`
    (the module docstring gives the candidates and the choice). `measure(shape)` is the quantity
    of the cell built with that shape, None where the shape is not a valid model (e.g. an odd
    n_heads under mixed-direction heads). Raises MatchError when no candidate lands within."""
    if kind not in KINDS:
        raise MatchError(f"--match {kind!r} is not one of {', '.join(KINDS)}")
    cache: dict[Shape, Optional[float]] = {}

    def m(s: Shape) -> Optional[float]:
        if s not in cache:
            cache[s] = measure(s)
        return cache[s]

    u = ref.head_dim
    widths = sorted(range(u, 2 * ref.d_model + 1, u), key=lambda d: (abs(math.log(d / ref.d_model)), d))
    best: Optional[tuple] = None  # (score, |gap|, n_layers, Match)
    nearest: Optional[Match] = None  # the smallest gap seen, for the refusal
    for d in widths:
        if best is not None and abs(math.log(d / ref.d_model)) > best[0]:
            break
        heads = max(1, round(d * ref.n_heads / ref.d_model))
        ff0 = max(u, round(d * ref.d_ff / ref.d_model / u) * u)
        for shape in _candidates(m, Shape(d, heads, u, ff0, 1), target, max_layers):
            v = m(shape)
            if v is None:
                continue
            match = Match(kind, shape, v, target, searched=True)
            if nearest is None or abs(match.gap) < abs(nearest.gap):
                nearest = match
            key = (_score(shape, ref), abs(match.gap), shape.n_layers)
            if abs(match.gap) <= tolerance and (best is None or key < best[:3]):
                best = (*key, match)
    if best is None:
        near = (f"the nearest searched, {nearest.shape.text()}, is {nearest.gap:+.1%} off" if nearest
                else "no candidate is a valid model")
        raise MatchError(f"--match {kind}: no shape of {what} (d_model a multiple of {u} up to {2 * ref.d_model}, "
                         f"1 to {max_layers} layers, d_ff a multiple of {u}) has {QUANTITY[kind]} within "
                         f"{tolerance:.0%} of {target:,.4g}; {near}. Give the cell its own shape "
                         f"(model.overrides.d_model, d_ff, n_layers) and leave out --match, or use a larger --size")
    return best[3]


def _candidates(m, base: Shape, target: float, max_layers: int) -> list[Shape]:
    """At width base.d_model: the two depths bracketing the target at d_ff = base.d_ff, each with
    the two multiples of head_dim around the d_ff that hits the target exactly."""
    def at(n: int, ff: int | None = None) -> Shape:
        return Shape(base.d_model, base.n_heads, base.head_dim, base.d_ff if ff is None else ff, n)

    lo, hi = 1, max_layers  # the first depth whose count reaches the target (binary search)
    if m(at(1)) is None:
        return []
    while lo < hi:
        mid = (lo + hi) // 2
        v = m(at(mid))
        if v is not None and v >= target:
            hi = mid
        else:
            lo = mid + 1
    out = []
    for n in sorted({max(1, lo - 1), lo}):
        v0, v1 = m(at(n)), m(at(n, base.d_ff + base.head_dim))
        if v0 is None or v1 is None:
            continue
        slope = (v1 - v0) / base.head_dim
        if slope <= 0:  # d_ff does not move the count (the user fixed it): the one candidate
            out.append(at(n))
            continue
        exact = base.d_ff + (target - v0) / slope
        for k in {math.floor(exact / base.head_dim), math.ceil(exact / base.head_dim)}:
            out.append(at(n, max(1, k) * base.head_dim))
    return out
