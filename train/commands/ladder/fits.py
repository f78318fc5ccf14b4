"""The Chinchilla law L(N, D) = E + A / N^alpha + B / D^beta, fitted per cell, and its
compute-optimal frontier L(C).

The fit (Hoffmann et al. 2022, appendix D.2; OLMo-core's model_ladder does the same):
parametrise a = log A, b = log B, e = log E, so that

    log L_pred(N, D) = logsumexp(a - alpha log N,  b - beta log D,  e)

and minimise sum_i Huber_delta(log L_pred_i - log L_obs_i) with delta = 1e-3 by L-BFGS-B
(scipy.optimize.minimize, analytic gradient), from every start of a 4^5 grid, keeping the best.
Pitfalls:
- log residuals of a good fit are ~1e-3, so the objective is ~1e-6 per point, below L-BFGS-B's
  absolute stopping tolerance (it compares changes against max(|f|, 1)): it would stop at once.
  The objective is therefore divided by delta^2 (same minimiser); `huber` reports the unscaled sum.
- E is bounded above by the smallest observed loss (OLMo-core's bound: the floor cannot exceed
  what was reached), alpha and beta to [0.01, 2]; a and b are free (`minimise` explains the
  centred logs the optimiser works in).
- the grid follows OLMo-core's ranges (alpha, beta in 0.2..0.8; E from near 0 to L_min) with
  Hoffmann's range for a and b (0..20: A and B of order e^0..e^20). `starts=n` runs L-BFGS-B
  from the n grid starts with the lowest objective only (all are scored in one vectorised pass);
  None runs all 1024.
- with a multi-threaded BLAS on a busy machine each L-BFGS-B step waits on idle threads (50x
  slower here); the fits run under threadpoolctl's one-thread limit.

The frontier: with C = k N D (k = the cell's FLOPs per parameter and token, the median of
C / (N D) over its runs), the N minimising L(N, C / (k N)) at a fixed C is

    N_opt = G (C / k)^(beta / (alpha + beta)),   G = (alpha A / (beta B))^(1 / (alpha + beta)),

D_opt = C / (k N_opt), and L(C) = L(N_opt, D_opt) (set the derivative in N to zero).
"""
from __future__ import annotations

import functools

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber
from threadpoolctl import ThreadpoolController

from .points import N_PARAMS, LadderError, LadderPoint

HUBER_DELTA = 1e-3
GRID_SLICES = 4
PARAM_NAMES = ("E", "A", "alpha", "B", "beta")
EXP_BOUNDS = (0.01, 2.0)      # alpha, beta (OLMo-core)
E_FLOOR_DECADES = 12.0        # e >= log(L_min) - 12: E may go (almost) to 0


@dataclass(frozen=True)
class ChinchillaParams:
    """One law L(N, D) = E + A / N^alpha + B / D^beta. Every method broadcasts over numpy arrays."""
    E: float
    A: float
    alpha: float
    B: float
    beta: float

    @classmethod
    def from_x(cls, x: np.ndarray) -> "ChinchillaParams":
        """From the optimiser's vector (a, b, e, alpha, beta)."""
        a, b, e, alpha, beta = (float(v) for v in x)
        return cls(float(np.exp(e)), float(np.exp(a)), alpha, float(np.exp(b)), beta)

    def as_array(self) -> np.ndarray:
        return np.array([self.E, self.A, self.alpha, self.B, self.beta])

    def loss(self, N, D) -> np.ndarray:
        return law_loss(self.as_array(), N, D)

    def optimal_N(self, C, k: float) -> np.ndarray:
        return frontier(self.as_array(), C, k)[0]

    def frontier_loss(self, C, k: float) -> np.ndarray:
        return frontier(self.as_array(), C, k)[2]


def _cols(theta: np.ndarray):
    """(E, A, alpha, B, beta) columns of theta [..., 5], each with a trailing axis for broadcasting
    against a vector of points when theta is 2-D (R resamples)."""
    theta = np.asarray(theta, dtype=float)
    cols = [theta[..., i] for i in range(N_PARAMS)]
    return [c[..., None] for c in cols] if theta.ndim == 2 else cols


def law_loss(theta: np.ndarray, N, D) -> np.ndarray:
    """L(N, D) for theta = (E, A, alpha, B, beta) [5] or [R, 5] (then [R, len(N)]); the power
    terms are computed in logs (A may be e^40)."""
    E, A, alpha, B, beta = _cols(theta)
    lnN, lnD = np.log(np.asarray(N, dtype=float)), np.log(np.asarray(D, dtype=float))
    return E + np.exp(np.log(A) - alpha * lnN) + np.exp(np.log(B) - beta * lnD)


def frontier(theta: np.ndarray, C, k: float):
    """(N_opt, D_opt, L) along the compute-optimal frontier at compute C, for C = k N D (closed
    form above); theta [5] or [R, 5] as in law_loss."""
    E, A, alpha, B, beta = _cols(theta)
    lnX = np.log(np.asarray(C, dtype=float) / k)
    lnG = (np.log(alpha) + np.log(A) - np.log(beta) - np.log(B)) / (alpha + beta)
    lnN = lnG + beta / (alpha + beta) * lnX
    lnD = lnX - lnN
    L = E + np.exp(np.log(A) - alpha * lnN) + np.exp(np.log(B) - beta * lnD)
    return np.exp(lnN), np.exp(lnD), L


def flops_per_param_token(points: Sequence[LadderPoint]) -> float:
    """k = median of C / (N D): the cell's own FLOPs per parameter and token (6 for a plain
    decoder's training step with N all its FLOP-bearing weights; more with attention and
    embeddings counted, less when only part of the tokens pass through every weight)."""
    return float(np.median([p.C / (p.N * p.D) for p in points]))


def objective(x: np.ndarray, lnN: np.ndarray, lnD: np.ndarray, lnL: np.ndarray):
    """(sum Huber(r) / delta^2, its gradient) at x = (a, b, e, alpha, beta), r = log L_pred -
    log L_obs. With w the softmax weights of the three logsumexp terms and psi = Huber'(r) =
    clip(r, -delta, delta): d/da = sum psi w1, d/db = sum psi w2, d/de = sum psi w3,
    d/dalpha = -sum psi w1 log N, d/dbeta = -sum psi w2 log D."""
    a, b, e, alpha, beta = x
    t0, t1 = a - alpha * lnN, b - beta * lnD  # (point,) the log power terms; the third is e
    m = np.maximum(np.maximum(t0, t1), e)  # logsumexp written out: one pass, no reductions over axes
    x0, x1, x2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
    s = x0 + x1 + x2
    r = m + np.log(s) - lnL
    psi = np.minimum(np.maximum(r, -HUBER_DELTA), HUBER_DELTA) / (HUBER_DELTA ** 2 * s)  # Huber' / delta^2 / s
    p0, p1 = psi * x0, psi * x1  # psi * softmax weight of each term
    grad = np.array([p0.sum(), p1.sum(), psi @ x2, -(p0 @ lnN), -(p1 @ lnD)])
    return huber(HUBER_DELTA, r).sum() / HUBER_DELTA ** 2, grad


def start_grid(L_min: float, slices: int = GRID_SLICES) -> np.ndarray:
    """The slices^5 starts (a, b, e, alpha, beta) [slices^5, 5]."""
    ab = np.linspace(0.0, 20.0, slices)
    e = np.log(L_min * np.linspace(0.05, 0.95, slices))
    ex = np.linspace(0.2, 0.8, slices)
    return np.array(list(itertools.product(ab, ab, e, ex, ex)))


def screen(grid: np.ndarray, lnN, lnD, lnL) -> np.ndarray:
    """The grid's rows ordered by objective, lowest first (one vectorised pass, no optimiser)."""
    a, b, e, alpha, beta = (grid[:, i, None] for i in range(N_PARAMS))
    lse = np.logaddexp.reduce(np.stack(np.broadcast_arrays(a - alpha * lnN, b - beta * lnD, e)), axis=0)
    f = huber(HUBER_DELTA, lse - lnL).sum(axis=1)
    return grid[np.argsort(f, kind="stable")]


def bounds_for(L_min: float) -> list[tuple[float, float]]:
    e_hi = float(np.log(L_min))
    return [(None, None), (None, None), (e_hi - E_FLOOR_DECADES, e_hi), EXP_BOUNDS, EXP_BOUNDS]


@functools.lru_cache(maxsize=1)
def _threadpools() -> ThreadpoolController:
    """The process's BLAS/OpenMP pools, scanned once: `threadpool_limits(1)` rescans every loaded
    library at each call (dl_iterate_phdr and /proc reads), which was 40% of a bootstrap's time."""
    return ThreadpoolController()


def minimise(starts: np.ndarray, lnN, lnD, lnL, bounds) -> Optional[tuple[np.ndarray, float]]:
    """The best (x, scaled objective) of L-BFGS-B from each start, or None when every start
    failed (an exception, or a non-finite result). The optimiser sees centred logs, z = (a -
    alpha mean(log N), b - beta mean(log D), e, alpha, beta) against log N - mean(log N), the same
    law: uncentred, a and alpha move together along a long valley (log N ~ 15), and L-BFGS-B
    needs several times more steps."""
    cN, cD = float(lnN.mean()), float(lnD.mean())
    shift = lambda x, sign: x + sign * np.array([x[3] * cN, x[4] * cD, 0.0, 0.0, 0.0])  # noqa: E731
    best = None
    with _threadpools().limit(limits=1):
        for x0 in starts:
            try:
                r = minimize(objective, shift(x0, -1), args=(lnN - cN, lnD - cD, lnL), jac=True, method="L-BFGS-B",
                             bounds=bounds, options={"maxiter": 2000})
            except (ValueError, FloatingPointError, np.linalg.LinAlgError):
                continue
            if np.all(np.isfinite(r.x)) and np.isfinite(r.fun) and (best is None or r.fun < best[1]):
                best = (shift(r.x, +1), float(r.fun))
    return best


@dataclass
class CellFit:
    """One cell's fitted law: params, k (FLOPs per parameter and token), the unscaled Huber sum,
    the log residuals log L_obs - log L_pred of its points, and which parameters ended on a bound
    (E at L_min: the points show no floor yet; alpha or beta at 2 or 0.01: no curvature seen)."""
    cell: str
    params: ChinchillaParams
    k: float
    huber: float
    residuals: np.ndarray
    at_bounds: tuple[str, ...]
    x: np.ndarray  # (a, b, e, alpha, beta): a warm start for refits

    @property
    def n_points(self) -> int:
        return int(self.residuals.size)

    @property
    def residual_scale(self) -> float:
        """The spread of log residuals, sqrt(sum r^2 / (n - 5)): the degrees-of-freedom
        correction undoes the shrinkage of residuals by fitting 5 parameters."""
        n = self.n_points
        return float(np.sqrt(np.sum(self.residuals ** 2) / max(n - N_PARAMS, 1)))


def log_arrays(points: Sequence[LadderPoint]):
    return (np.log([p.N for p in points]), np.log([p.D for p in points]), np.log([p.loss for p in points]))


def fit_cell(cell: str, points: Sequence[LadderPoint], starts: Optional[int] = None) -> CellFit:
    """Fit one cell's law from the full start grid (or its `starts` best-scoring starts)."""
    lnN, lnD, lnL = log_arrays(points)
    L_min = float(np.exp(lnL.min()))
    grid = screen(start_grid(L_min), lnN, lnD, lnL)
    bounds = bounds_for(L_min)
    best = minimise(grid if starts is None else grid[:starts], lnN, lnD, lnL, bounds)
    if best is None:
        raise LadderError(f"cell {cell}: every L-BFGS-B start of the fit failed; check its points for "
                          f"outliers (a diverged run) and drop them")
    x, _ = best
    return cell_fit(cell, points, x, bounds)


def cell_fit(cell: str, points: Sequence[LadderPoint], x: np.ndarray, bounds) -> CellFit:
    lnN, lnD, lnL = log_arrays(points)
    params = ChinchillaParams.from_x(x)
    resid = lnL - np.log(params.loss(np.exp(lnN), np.exp(lnD)))
    names = ("A", "B", "E", "alpha", "beta")
    hit = tuple(n for n, v, bound in zip(names, x, bounds) if any(b is not None and np.isclose(v, b, atol=1e-6)
                                                                   for b in bound))
    return CellFit(cell, params, flops_per_param_token(points), float(huber(HUBER_DELTA, -resid).sum()), resid, hit,
                   np.asarray(x, dtype=float))


def refit(fit: CellFit, points: Sequence[LadderPoint], idx: np.ndarray) -> Optional[np.ndarray]:
    """One bootstrap refit on points[idx], as (E, A, alpha, B, beta), or None when it failed.
    L-BFGS-B starts from the full data's optimum (a resample's optimum lies near it; the full grid
    1000 times over would take hours) and, only when that start fails, from the resample's
    best-scoring grid start."""
    sub = [points[i] for i in idx]
    if len({p.N for p in sub}) < 2 or len({p.D for p in sub}) < 2 or len(sub) < N_PARAMS:
        return None
    lnN, lnD, lnL = log_arrays(sub)
    L_min = float(np.exp(lnL.min()))
    bounds = bounds_for(L_min)
    x0 = fit.x.copy()
    x0[2] = min(x0[2], bounds[2][1])
    best = minimise(x0[None], lnN, lnD, lnL, bounds)
    if best is None:
        best = minimise(screen(start_grid(L_min), lnN, lnD, lnL)[:1], lnN, lnD, lnL, bounds)
    return None if best is None else ChinchillaParams.from_x(best[0]).as_array()
