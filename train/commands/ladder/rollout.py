"""Rollout cross-validation: refit every cell without its largest rung (the full fit and the
paired bootstrap, as `bootstrap.fit_ladder`), predict each held-out run, and set the error
beside the prediction interval. On a ladder that extrapolates well the errors are within the
intervals; an error far outside says the law, not the noise, is off at the next scale."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .bootstrap import LEVEL, LadderFit, fit_ladder
from .points import LadderError, LadderPoint, check_points, rung_order


@dataclass
class RolloutRow:
    cell: str
    rung: object
    seed: int
    N: float
    D: float
    observed: float
    predicted: float
    pi: tuple[float, float]

    @property
    def error(self) -> float:
        """observed - predicted (nats per token)."""
        return self.observed - self.predicted

    @property
    def relative_error(self) -> float:
        return self.error / self.observed

    @property
    def inside(self) -> bool:
        return self.pi[0] <= self.observed <= self.pi[1]


@dataclass
class Rollout:
    rows: list[RolloutRow]
    held_out: dict[str, object]  # cell -> the rung left out
    fit: LadderFit  # the fit without those rungs

    @property
    def coverage(self) -> float:
        return sum(r.inside for r in self.rows) / max(len(self.rows), 1)


def rollout_cv(points: Sequence[LadderPoint], resamples: int = 1000, seed: int = 0,
               starts: Optional[int] = None, min_rungs: int = 3, level: float = LEVEL) -> Rollout:
    """Fit without each cell's largest rung (by median N; the fit keeps `min_rungs - 1` rungs at
    least, so `min_rungs` is the full ladder's minimum) and predict the rung's runs."""
    cells = check_points(points, min_rungs)
    held = {c: rung_order(pts)[-1] for c, pts in cells.items()}
    train = [p for p in points if p.rung != held[p.cell]]
    if not train:
        raise LadderError("rollout cross-validation: nothing is left without the largest rung; add rungs")
    fit = fit_ladder(train, resamples, seed, starts, max(min_rungs - 1, 2))
    rows = []
    for cell, pts in cells.items():
        b = fit.cells[cell]
        for p in pts:
            if p.rung == held[cell]:
                pred = b.predict(p.N, p.D, level)
                rows.append(RolloutRow(cell, p.rung, p.seed, p.N, p.D, p.loss, pred.loss, pred.pi))
    return Rollout(rows, held, fit)
