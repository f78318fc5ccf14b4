"""The ladder's input: one `LadderPoint` per finished run, the checks that refuse a ladder no fit
can use (each a one-line `LadderError` naming the problem and the fix), and the paired resampling
of the bootstrap.

A *rung* is one model size, matched across cells (by non-embedding parameters or FLOPs per token);
each rung has several token budgets and several seeds. Seeds are the bootstrap's unit: a seed's
runs at one rung (its budgets, which under a warmup-stable-decay schedule are decay branches of
one stable run, so their errors are correlated) are drawn together, and the same seeds are drawn
for every cell, so a difference between two cells is a paired difference.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import numpy as np

from ...errors import ConfigError

Rung = Union[str, int]
N_PARAMS = 5  # E, A, alpha, B, beta


class LadderError(ConfigError):
    """A ladder that cannot be fitted or judged; the message is one line with the fix."""


@dataclass(frozen=True)
class LadderPoint:
    """One finished run of a ladder.

    cell: the architecture:objective it trained (e.g. "CD:FLM"); seed: its seed (seeds are paired
    across cells); rung: the size it belongs to (a label shared across cells); N: non-embedding
    parameters; D: tokens seen; C: training FLOPs actually counted (the trainer's `flops`);
    loss: the held-out (yardstick) loss in nats per token.
    """
    cell: str
    seed: int
    rung: Rung
    N: float
    D: float
    C: float
    loss: float

    def __post_init__(self):
        for name in ("N", "D", "C", "loss"):
            v = getattr(self, name)
            if not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
                raise LadderError(f"ladder point {self.cell} seed {self.seed} rung {self.rung}: {name}={v!r} "
                                  f"is not a positive finite number; drop the run or fix its record")

    @classmethod
    def from_dict(cls, d: dict) -> "LadderPoint":
        """From {"cell", "seed", "rung", "N", "D", "C", "loss"} (extra keys are ignored)."""
        missing = [k for k in ("cell", "seed", "rung", "N", "D", "C", "loss") if k not in d]
        if missing:
            raise LadderError(f"ladder point {d!r} lacks {', '.join(missing)}; every run needs cell, seed, "
                              f"rung, N, D, C and loss")
        return cls(str(d["cell"]), int(d["seed"]), d["rung"], float(d["N"]), float(d["D"]), float(d["C"]),
                   float(d["loss"]))


def by_cell(points: Iterable[LadderPoint]) -> dict[str, list[LadderPoint]]:
    """The points of each cell, cells in order of first appearance."""
    out: dict[str, list[LadderPoint]] = {}
    for p in points:
        out.setdefault(p.cell, []).append(p)
    return out


def rung_order(points: Sequence[LadderPoint]) -> list[Rung]:
    """Rungs from smallest to largest, by the median N of their points."""
    ns: dict[Rung, list[float]] = {}
    for p in points:
        ns.setdefault(p.rung, []).append(p.N)
    return sorted(ns, key=lambda r: float(np.median(ns[r])))


def check_points(points: Sequence[LadderPoint], min_rungs: int = 3) -> dict[str, list[LadderPoint]]:
    """The points by cell, or a one-line LadderError for a ladder no fit can use: no points, a cell
    with fewer than `min_rungs` rungs or fewer than 6 points (5 parameters plus a residual),
    parameter counts or budgets that do not vary (A, alpha or B, beta then cannot be told
    apart from E), or no rung with two seeds (the bootstrap over seeds would have nothing to draw)."""
    if not points:
        raise LadderError("no ladder points: finish at least one run per rung, budget and seed first")
    cells = by_cell(points)
    for cell, pts in cells.items():
        rungs = {p.rung for p in pts}
        if len(rungs) < min_rungs:
            raise LadderError(f"cell {cell} has {len(rungs)} rung(s); the fit needs at least {min_rungs}: "
                              f"add model sizes to the ladder")
        if len({p.N for p in pts}) < 2:
            raise LadderError(f"cell {cell}: every run has N={pts[0].N:.4g}; the rungs must differ in "
                              f"non-embedding parameters")
        if not any(len({p.D for p in pts if p.rung == r}) > 1 for r in rungs):
            raise LadderError(f"cell {cell}: the token budget does not vary within any rung, so B and beta "
                              f"cannot be fitted; give each rung at least 2 budgets")
        if len(pts) < N_PARAMS + 1:
            raise LadderError(f"cell {cell} has {len(pts)} points; 5 parameters need at least 6: add "
                              f"budgets or seeds")
    if max(len(v) for v in seed_groups(points).values()) < 2:
        raise LadderError("every rung has one seed: the bootstrap over seeds needs at least 2 seeds per "
                          "rung; run the ladder with 2 or more seeds")
    return cells


def seed_groups(points: Iterable[LadderPoint]) -> dict[Rung, list[int]]:
    """The seeds present at each rung (over all cells), sorted."""
    out: dict[Rung, set[int]] = {}
    for p in points:
        out.setdefault(p.rung, set()).add(p.seed)
    return {r: sorted(s) for r, s in out.items()}


class PairedResampler:
    """Draws bootstrap resamples of whole (rung, seed) groups, the same draw for every cell.

    One draw: for each rung with seeds s_1..s_m (the union over cells), m seeds drawn with
    replacement; a cell's resample is all of its runs with those (rung, seed) pairs, repeated as
    often as drawn. A cell lacking a drawn seed at a rung simply contributes no run for it.
    """

    def __init__(self, cells: dict[str, list[LadderPoint]]):
        self.groups = seed_groups(p for pts in cells.values() for p in pts)
        self.index: dict[str, dict[tuple, np.ndarray]] = {}
        for cell, pts in cells.items():
            idx: dict[tuple, list[int]] = {}
            for i, p in enumerate(pts):
                idx.setdefault((p.rung, p.seed), []).append(i)
            self.index[cell] = {k: np.array(v) for k, v in idx.items()}

    def draw(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """cell -> the indices (into that cell's point list) of one paired resample."""
        drawn = [(r, s) for r, seeds in self.groups.items()
                 for s in rng.choice(seeds, size=len(seeds), replace=True)]
        empty = np.zeros(0, dtype=int)
        return {cell: np.concatenate([idx.get((r, int(s)), empty) for r, s in drawn])
                for cell, idx in self.index.items()}
