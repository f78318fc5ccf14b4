"""Verdicts at a target scale, from a `bootstrap.LadderFit`.

- Each cell's predicted loss at its target (N, D) with its prediction interval (a new run).
- Every pairwise difference of predicted losses, L_a - L_b at each cell's own target, with the
  paired bootstrap's 95% interval (refit j of both cells comes from the same resample; the
  interval is the curves' difference, without run-to-run scatter: the question is which
  expected loss is lower). Resolved: the interval excludes 0.
- Where two cells' compute-optimal frontiers L_a(C), L_b(C) cross within a stated range of C:
  the difference is scanned on a log grid and the first sign change is solved with
  scipy.optimize.brentq (on log10 C); the interval is the percentiles of the crossings of the
  refits that cross in range, and `fraction` says how many do. No sign change in the point fit:
  "no crossing in range".
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy.optimize import brentq

from .bootstrap import LEVEL, CellBootstrap, LadderFit, Prediction, percentile_interval
from .fits import frontier
from .points import LadderError

REFERENCE_N, REFERENCE_D = 4.8e9, 1.68e11  # shared/SCIENCE.md: CD/ND 4.8B parameters, 168B tokens
SCAN_POINTS = 400  # log-spaced C of the sign-change scan


@dataclass(frozen=True)
class Target:
    """Where to judge: N non-embedding parameters and D tokens, with per-cell N overrides
    (`cell_N`, e.g. ED at its own parameter count)."""
    N: float = REFERENCE_N
    D: float = REFERENCE_D
    cell_N: tuple[tuple[str, float], ...] = ()

    def for_cell(self, cell: str) -> tuple[float, float]:
        return dict(self.cell_N).get(cell, self.N), self.D

    @classmethod
    def parse(cls, text: str) -> "Target":
        """From "N=4.8e9,D=1.68e11,N[ED:MLM]=1.1e10" (any part may be left out)."""
        N, D, per = REFERENCE_N, REFERENCE_D, []
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = re.fullmatch(r"(N|D)(?:\[([^\]]+)\])?=([0-9.eE+-]+)", part)
            value = _positive(m.group(3)) if m else None
            if m is None or value is None or (m.group(2) and m.group(1) == "D"):
                raise LadderError(f"--target {text!r}: cannot read {part!r}; write N=4.8e9,D=1.68e11 and "
                                  f"N[CELL]=... for a cell's own size")
            if m.group(2):
                per.append((m.group(2), value))
            elif m.group(1) == "N":
                N = value
            else:
                D = value
        return cls(N, D, tuple(per))


def _positive(text: str) -> Optional[float]:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) and v > 0 else None


@dataclass
class CellPrediction:
    cell: str
    N: float
    D: float
    C: float  # k N D with the cell's own k
    prediction: Prediction


@dataclass
class Difference:
    a: str
    b: str
    diff: float  # L_a - L_b (point fits)
    ci: tuple[float, float]
    resolved: bool
    paired: int  # resamples where both refits succeeded
    bounded: tuple[str, ...] = ()  # "CELL: E, alpha": parameters either cell's point fit ended on the bound of.
    # Such a fit's bootstrap is cut at the bound, so its interval is too narrow on that side: a
    # "resolved" difference then says what the bounded law extrapolates, not what the data pin down.


@dataclass
class Crossing:
    a: str
    b: str
    C: Optional[float]  # None: no crossing in range
    ci: Optional[tuple[float, float]]
    fraction: float  # of the paired refits that cross in range


@dataclass
class Verdicts:
    target: Target
    c_range: tuple[float, float]
    predictions: list[CellPrediction]
    differences: list[Difference]
    crossings: list[Crossing]
    level: float = LEVEL
    notes: list[str] = field(default_factory=list)


def default_c_range(ladder: LadderFit) -> tuple[float, float]:
    """From the decade below the smallest observed C to 1e25 FLOPs (above any target here)."""
    c_min = min(p.C for b in ladder.cells.values() for p in b.points)
    return 10.0 ** math.floor(math.log10(c_min)), 1e25


def first_crossing(theta_a, k_a: float, theta_b, k_b: float, c_range) -> Optional[float]:
    """The smallest C in c_range where L_a(C) = L_b(C) on the frontiers, or None."""
    lo, hi = math.log10(c_range[0]), math.log10(c_range[1])

    def d(logc):
        c = np.atleast_1d(10.0 ** np.asarray(logc))
        return frontier(theta_a, c, k_a)[2] - frontier(theta_b, c, k_b)[2]

    xs = np.linspace(lo, hi, SCAN_POINTS)
    ys = d(xs)
    if ys[0] == 0:
        return float(10 ** xs[0])
    change = np.nonzero(np.sign(ys[:-1]) * np.sign(ys[1:]) < 0)[0]
    if not change.size:
        return None
    i = int(change[0])
    return float(10 ** brentq(lambda x: float(d(x)[0]), xs[i], xs[i + 1], xtol=1e-10))


def predict_targets(ladder: LadderFit, target: Target) -> list[CellPrediction]:
    out = []
    for cell, b in ladder.cells.items():
        N, D = target.for_cell(cell)
        out.append(CellPrediction(cell, N, D, b.fit.k * N * D, b.predict(N, D)))
    return out


def difference(a: CellBootstrap, b: CellBootstrap, target: Target, level: float = LEVEL) -> Difference:
    (Na, Da), (Nb, Db) = target.for_cell(a.fit.cell), target.for_cell(b.fit.cell)
    d = a.curve_samples(Na, Da)[:, 0] - b.curve_samples(Nb, Db)[:, 0]
    paired = int(np.isfinite(d).sum())
    lo, hi = percentile_interval(d, level)
    point = float(a.fit.params.loss(Na, Da) - b.fit.params.loss(Nb, Db))
    bounded = tuple(f"{c.fit.cell}: {', '.join(c.fit.at_bounds)}" for c in (a, b) if c.fit.at_bounds)
    return Difference(a.fit.cell, b.fit.cell, point, (float(lo), float(hi)), bool(lo > 0 or hi < 0), paired, bounded)


def crossing(a: CellBootstrap, b: CellBootstrap, c_range, level: float = LEVEL) -> Crossing:
    point = first_crossing(a.fit.params.as_array(), a.fit.k, b.fit.params.as_array(), b.fit.k, c_range)
    both = np.nonzero(a.ok & b.ok)[0]
    cs = [first_crossing(a.samples[j], a.fit.k, b.samples[j], b.fit.k, c_range) for j in both]
    found = np.array([c for c in cs if c is not None])
    fraction = found.size / max(both.size, 1)
    if point is None or not found.size:
        return Crossing(a.fit.cell, b.fit.cell, point, None, fraction)
    lo, hi = percentile_interval(np.log10(found), level)
    return Crossing(a.fit.cell, b.fit.cell, point, (float(10 ** lo), float(10 ** hi)), fraction)


def judge(ladder: LadderFit, target: Target = Target(), c_range: Optional[tuple[float, float]] = None,
          level: float = LEVEL) -> Verdicts:
    """Predictions, pairwise differences and frontier crossings at `target` (default: the reference
    experiment) over `c_range` FLOPs (default: `default_c_range`)."""
    c_range = c_range or default_c_range(ladder)
    if not 0 < c_range[0] < c_range[1]:
        raise LadderError(f"compute range {c_range}: write it as (low, high) FLOPs with 0 < low < high")
    unknown = sorted(set(dict(target.cell_N)) - set(ladder.cells))
    if unknown:
        raise LadderError(f"target names cell(s) {', '.join(unknown)} that the ladder lacks; it has "
                          f"{', '.join(ladder.cells)}")
    pairs = list(itertools.combinations(ladder.cells.values(), 2))
    return Verdicts(target, c_range, predict_targets(ladder, target),
                    [difference(a, b, target, level) for a, b in pairs],
                    [crossing(a, b, c_range, level) for a, b in pairs], level, list(ladder.notes))
