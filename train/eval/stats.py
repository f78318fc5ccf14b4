"""The statistics of a comparison: mean ± std over seeds, the paired difference of two cells with
its 95% interval, and the binomial standard error of an accuracy. Pure Python, no SciPy.

**Paired by seed.** Seed i of every cell shares its data order (data.seed) and its init seed, so
the difference of two cells is taken seed by seed, d_i = a_i - b_i, and its interval is the
paired t interval mean(d) ± t(0.975, n-1) · sd(d) / sqrt(n) (Student's t with n-1 degrees of
freedom; n = the seeds both cells have), widened by the windows' sampling error where the
per-window scores are known (both cells scored on the same windows): a metric measured on 64
windows of a few documents is itself uncertain, which the seeds alone do not show (two seeds can
agree by chance on a discrete accuracy). The windows' error is clustered by document. Two cells whose runs are identical give 0 ± 0. With one seed there is
no interval (None): a single run cannot tell a difference from noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

# t(0.975, df) for df = 1..30 (the textbook table, e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (a two-sided 95% interval):
    the table for df <= 30, beyond it the Cornish-Fisher expansion around the normal quantile
    (error below 1e-4 for df > 30)."""
    if df < 1:
        raise ValueError(f"Student's t needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for one value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std of no values")
    m = math.fsum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(math.fsum((v - m) ** 2 for v in vals) / (len(vals) - 1))


@dataclass(frozen=True)
class Difference:
    """a - b over paired seeds: mean, the 95% interval's half width (None with one seed), n."""

    mean: float
    half_width: Optional[float]
    n: int

    @property
    def low(self) -> Optional[float]:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> Optional[float]:
        return None if self.half_width is None else self.mean + self.half_width

    @property
    def resolved(self) -> bool:
        """The 95% interval excludes zero (never with one seed)."""
        return self.half_width is not None and (self.low > 0 or self.high < 0)

    def text(self, fmt: str = ".4f") -> str:
        if self.half_width is None:
            return f"{self.mean:+{fmt}} (1 seed: no interval)"
        return f"{self.mean:+{fmt}} ± {self.half_width:{fmt}}  [{self.low:{fmt}}, {self.high:{fmt}}]"


def paired_difference(a: Sequence[float], b: Sequence[float],
                      window: Optional[Sequence[tuple[float, int]]] = None) -> Difference:
    """a_i - b_i over paired seeds (equal length), with the paired t 95% interval.

    `window`: per seed, (se, df) of that seed's difference from the finite set of evaluation
    windows (`window_difference_se`). Its mean square joins the seeds' variance, so the interval
    covers both the training noise (seeds) and the choice of windows, with Welch-Satterthwaite's
    degrees of freedom for the sum of the two variance components:
        v_s = sd(d)² / n,  v_w = mean(se²) / n,  half width = t(0.975, df) · sqrt(v_s + v_w),
        df = (v_s + v_w)² / (v_s² / (n - 1) + v_w² / df_w)   (floored; df = n - 1 without windows).
    Identical runs give 0 ± 0."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples need the same, non-zero number of seeds; got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    m, sd = mean_std(d)
    n = len(d)
    if n == 1:
        return Difference(m, None, 1)
    v_s = sd ** 2 / n
    v_w = math.fsum(float(se) ** 2 for se, _ in window) / len(window) / n if window else 0.0
    if v_s + v_w == 0:
        return Difference(m, 0.0, n)
    df_w = min(df for _, df in window) if window else 1
    df = (v_s + v_w) ** 2 / (v_s ** 2 / (n - 1) + (v_w ** 2 / df_w if v_w else 0.0))
    return Difference(m, t975(max(1, int(df))) * math.sqrt(v_s + v_w), n)


def window_difference_se(a: Sequence[float], b: Sequence[float], scale: float = 1.0,
                         groups: Optional[Sequence] = None) -> tuple[float, int]:
    """(standard error, degrees of freedom) of mean_w(a_w - b_w) * scale over paired windows w
    (the same windows scored by two models; 0 for identical scores).

    Windows cut from one document are not independent, so with `groups` (each window's document)
    the error is the cluster-robust one (CR1: the residuals summed per document, G/(G-1) small-
    sample factor) with G - 1 degrees of freedom; without, sd / sqrt(n) with n - 1."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired windows need the same, non-zero number of windows; got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    if groups is None or len(set(groups)) < 2:
        _, sd = mean_std(diffs)
        return sd / math.sqrt(n) * abs(scale), max(1, n - 1)
    m = math.fsum(diffs) / n
    sums: dict = {}
    for g, x in zip(groups, diffs):
        sums[g] = sums.get(g, 0.0) + (x - m)
    G = len(sums)
    var = G / (G - 1) * math.fsum(v ** 2 for v in sums.values()) / n ** 2
    return math.sqrt(var) * abs(scale), G - 1


def binomial_se(correct: int, n: int) -> Optional[float]:
    """Standard error of an accuracy correct / n: sqrt(p (1 - p) / n) (None when n = 0)."""
    if n <= 0:
        return None
    p = correct / n
    return math.sqrt(p * (1 - p) / n)
