"""The ladder's pictures (matplotlib, Agg): loss against FLOPs with each cell's points, fitted
frontier, bootstrap band and target; and isoFLOP slices (loss against N at fixed budgets)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..plots import pyplot, save
from .bootstrap import LadderFit, percentile_interval
from .fits import frontier, law_loss
from .verdicts import Verdicts

NEAR_DECADES = 0.25  # a point sits on an isoFLOP slice when |log10(C / budget)| < this


def _colors(n: int):
    return pyplot().get_cmap("tab10")(np.arange(n) % 10)


def plot_loss_vs_flops(ladder: LadderFit, verdicts: Verdicts, path: Path) -> Path:
    """Log-log loss against training FLOPs: the runs (dots), each cell's fitted frontier L(C)
    (line) with its 95% bootstrap band, and each cell's target prediction (a cross with its
    prediction interval) at C = k N D."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    c_lo = min(p.C for b in ladder.cells.values() for p in b.points) / 3
    c_hi = max([p.C for b in ladder.cells.values() for p in b.points] + [t.C for t in verdicts.predictions]) * 3
    cs = np.geomspace(c_lo, c_hi, 200)
    targets = {t.cell: t for t in verdicts.predictions}
    for color, (cell, b) in zip(_colors(len(ladder.cells)), ladder.cells.items()):
        ax.scatter([p.C for p in b.points], [p.loss for p in b.points], s=14, color=color, alpha=0.7)
        ax.plot(cs, b.fit.params.frontier_loss(cs, b.fit.k), color=color, label=f"{cell} frontier")
        lo, hi = percentile_interval(b.frontier_samples(cs), verdicts.level)
        ax.fill_between(cs, lo, hi, color=color, alpha=0.18, lw=0)
        t = targets.get(cell)
        if t is not None:
            p = t.prediction
            ax.errorbar([t.C], [p.loss], yerr=[[p.loss - p.pi[0]], [p.pi[1] - p.loss]], fmt="x", color=color,
                        ms=9, capsize=4, label=f"{cell} target N={t.N:.3g}, D={t.D:.3g}")
    for t in {round(np.log10(t.C), 3): t for t in verdicts.predictions}.values():
        ax.axvline(t.C, color="0.5", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs (C)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"ladder: points, L(C) frontiers, {verdicts.level:.0%} bands, targets")
    ax.legend(fontsize=7)
    return save(fig, path)


def default_budgets(ladder: LadderFit, count: int = 3) -> list[float]:
    """`count` budgets spread log-evenly over the observed C (their inner quantiles)."""
    cs = np.log10([p.C for b in ladder.cells.values() for p in b.points])
    return list(10 ** np.quantile(cs, np.linspace(0.2, 0.8, count)))


def plot_isoflop(ladder: LadderFit, path: Path, budgets: Optional[Sequence[float]] = None) -> Path:
    """One panel per budget C: each cell's fitted L(N, C / (k N)) against N, its optimum N_opt
    (a star), and the runs whose C lies within NEAR_DECADES of the budget (dots)."""
    budgets = list(budgets or default_budgets(ladder))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 4), squeeze=False)
    n_all = [p.N for b in ladder.cells.values() for p in b.points]
    ns = np.geomspace(min(n_all) / 10, max(n_all) * 10, 200)
    for ax, c in zip(axes[0], budgets):
        seen = []  # losses on the panel, for its y range
        for color, (cell, b) in zip(_colors(len(ladder.cells)), ladder.cells.items()):
            theta, k = b.fit.params.as_array(), b.fit.k
            ax.plot(ns, law_loss(theta, ns, c / (k * ns)), color=color, label=cell)
            n_opt, _, l_opt = frontier(theta, c, k)
            ax.plot([n_opt], [l_opt], "*", color=color, ms=10)
            near = [p for p in b.points if abs(np.log10(p.C / c)) < NEAR_DECADES]
            ax.scatter([p.N for p in near], [p.loss for p in near], s=16, color=color, alpha=0.8)
            seen += [float(l_opt)] + [p.loss for p in near]
        ax.set_ylim(min(seen) * 0.95, max(seen) * 1.6)  # far from N_opt the curve leaves any useful range
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.set_title(f"C = {c:.3g} FLOPs")
    axes[0][0].set_ylabel("held-out loss (nats/token)")
    axes[0][0].legend(fontsize=7)
    return save(fig, path)
