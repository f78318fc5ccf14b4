"""The paired bootstrap over seeds and runs: each cell's law refitted on resamples drawn by
`points.PairedResampler` (the same seeds for every cell), giving percentile intervals.

- Confidence interval of a parameter or of the fitted curve at (N, D): the 2.5 and 97.5
  percentiles of its value over the successful refits.
- Prediction interval for a new run at (N, D): the percentiles of L_j(N, D) * exp(eps_j), where
  L_j is refit j's curve and eps_j is drawn from a normal with the point fit's residual scale
  (log residuals, degrees-of-freedom corrected: CellFit.residual_scale): parameter uncertainty
  plus the run-to-run scatter of a single new run. One eps_j per resample and cell, drawn from
  the bootstrap's seed, so the interval is reproducible.
- Few seeds make the percentile bootstrap too narrow: resampling m seeds from m gives a mean's
  variance times (m - 1) / m (2/3 for 3 seeds), and synthetic ladders then cover the truth ~85%
  of the time. Every interval is therefore widened about the point fit by sqrt(m / (m - 1)), m
  the mean number of seeds over the rungs with more than one (`inflation`): a refit's value v_j
  enters as v_hat + sqrt(m / (m - 1)) (v_j - v_hat). (The crossings of verdicts.py use the raw
  refits.)
- A refit fails when every start fails or a resample lost all variation in N or D; failures are
  counted (`failed`), left out of every percentile, and a cell all of whose refits failed is an
  error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .fits import EXP_BOUNDS, PARAM_NAMES, CellFit, fit_cell, frontier, law_loss, refit
from .points import LadderError, LadderPoint, PairedResampler, check_points

LEVEL = 0.95


def percentile_interval(samples: np.ndarray, level: float = LEVEL, axis: int = 0):
    """(lo, hi): the (1 - level) / 2 and (1 + level) / 2 quantiles, NaN (failed refits) ignored."""
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo, hi = np.nanpercentile(samples, q, axis=axis)
    return lo, hi


@dataclass
class Prediction:
    """A predicted loss at (N, D): the point fit's value, its confidence interval (the curve) and
    its prediction interval (a new run)."""
    loss: float
    ci: tuple[float, float]
    pi: tuple[float, float]


@dataclass
class CellBootstrap:
    """A cell's point fit and its R refits: samples [R, 5] as (E, A, alpha, B, beta), NaN rows
    for failed refits; eps [R] the log-scatter draw of each resample (see the module doc)."""
    fit: CellFit
    points: list[LadderPoint]
    samples: np.ndarray
    eps: np.ndarray
    inflation: float = 1.0

    @property
    def ok(self) -> np.ndarray:
        return np.all(np.isfinite(self.samples), axis=1)

    @property
    def failed(self) -> int:
        return int((~self.ok).sum())

    def widen(self, samples: np.ndarray, point) -> np.ndarray:
        """The refits' values widened about the point fit's (see the module doc)."""
        return point + self.inflation * (samples - point)

    def intervals(self, level: float = LEVEL) -> dict[str, tuple[float, float]]:
        """Each parameter's interval. E, A and B are positive: widened in log space (a linear
        widening of a refit's A = 1e8 about a point fit of 2e8 would give a negative bound), alpha
        and beta linearly, then held inside the fit's bounds (fits.EXP_BOUNDS)."""
        point, positive = self.fit.params.as_array(), np.array([n in ("E", "A", "B") for n in PARAM_NAMES])
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(positive, np.log(np.where(positive, self.samples, 1.0)), self.samples)
            widened = self.widen(logs, np.where(positive, np.log(np.where(positive, point, 1.0)), point))
        exps = np.array([n in ("alpha", "beta") for n in PARAM_NAMES])
        values = np.where(positive, np.exp(widened), np.where(exps, np.clip(widened, *EXP_BOUNDS), widened))
        lo, hi = percentile_interval(values, level)
        return {n: (float(lo[i]), float(hi[i])) for i, n in enumerate(PARAM_NAMES)}

    def curve_samples(self, N, D) -> np.ndarray:
        """L_j(N, D) for every refit j, widened: [R, len(N)] (NaN rows for failures)."""
        N, D = np.atleast_1d(N), np.atleast_1d(D)
        return self.widen(law_loss(self.samples, N, D), self.fit.params.loss(N, D))

    def new_run_samples(self, N, D) -> np.ndarray:
        """L_j(N, D) * exp(eps_j): the bootstrap distribution of a new run's loss [R, len(N)]."""
        return self.curve_samples(N, D) * np.exp(self.eps)[:, None]

    def predict(self, N: float, D: float, level: float = LEVEL) -> Prediction:
        ci = percentile_interval(self.curve_samples(N, D)[:, 0], level)
        pi = percentile_interval(self.new_run_samples(N, D)[:, 0], level)
        return Prediction(float(self.fit.params.loss(N, D)), (float(ci[0]), float(ci[1])),
                          (float(pi[0]), float(pi[1])))

    def frontier_samples(self, C) -> np.ndarray:
        """The refits' frontier losses L_j(C) [R, len(C)], with the cell's own k, widened."""
        C = np.atleast_1d(C)
        return self.widen(frontier(self.samples, C, self.fit.k)[2], self.fit.params.frontier_loss(C, self.fit.k))


@dataclass
class LadderFit:
    """Every cell's bootstrap, from one paired resampling (`resamples` draws from `seed`)."""
    cells: dict[str, CellBootstrap]
    resamples: int
    seed: int
    starts: Optional[int] = None
    notes: list[str] = field(default_factory=list)


def fit_ladder(points: Sequence[LadderPoint], resamples: int = 1000, seed: int = 0,
               starts: Optional[int] = None, min_rungs: int = 3) -> LadderFit:
    """Fit every cell (`fits.fit_cell`, `starts` as there) and bootstrap it `resamples` times with
    the paired resampler. Raises LadderError on a ladder `points.check_points` refuses or a cell
    whose refits all failed."""
    if resamples < 1:
        raise LadderError(f"resamples={resamples}: the bootstrap needs at least 1 (1000 is the default)")
    cells = check_points(points, min_rungs)
    fits = {c: fit_cell(c, pts, starts) for c, pts in cells.items()}
    sampler = PairedResampler(cells)
    rng = np.random.default_rng(seed)
    samples = {c: np.full((resamples, 5), np.nan) for c in cells}
    for j in range(resamples):
        for c, idx in sampler.draw(rng).items():
            theta = refit(fits[c], cells[c], idx)
            if theta is not None:
                samples[c][j] = theta
    noise = np.random.default_rng([seed, 1]).standard_normal((len(cells), resamples))
    m = float(np.mean([len(s) for s in sampler.groups.values() if len(s) > 1]))  # check_points: some rung has 2
    inflation = float(np.sqrt(m / (m - 1))) if m > 1 else 1.0
    out = {c: CellBootstrap(fits[c], cells[c], samples[c], noise[i] * fits[c].residual_scale, inflation)
           for i, c in enumerate(cells)}
    notes = []
    for c, b in out.items():
        if b.failed == resamples:
            raise LadderError(f"cell {c}: all {resamples} bootstrap refits failed; the ladder needs more "
                              f"seeds or rungs")
        if b.failed:
            notes.append(f"{c}: {b.failed} of {resamples} bootstrap refits failed and are left out")
        if b.fit.at_bounds:
            notes.append(f"{c}: the fit ended on the bound of {', '.join(b.fit.at_bounds)}")
    return LadderFit(out, resamples, seed, starts, notes)
