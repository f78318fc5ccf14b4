"""Scaling-ladder analysis (issue 29): per-cell Chinchilla fits L(N, D) and their compute-optimal
frontiers L(C) (fits), the paired bootstrap over seeds (bootstrap), rollout cross-validation
(rollout), verdicts at a target scale (verdicts), pictures (plots) and the markdown page (page).
Pure analysis of finished runs: numpy, scipy and matplotlib, nothing of the trainer.
The command `archscale ladder` lives beside it (command, plan, submit; table for `archscale
report`) and is not imported here, so the analysis stays light.
docs/ladder.md has the math, how to read the output, and the command."""
from .bootstrap import CellBootstrap, LadderFit, Prediction, fit_ladder
from .fits import ChinchillaParams, CellFit, fit_cell, frontier, law_loss
from .page import page_text, summary_text, write_page
from .plots import plot_isoflop, plot_loss_vs_flops
from .points import LadderError, LadderPoint, check_points
from .rollout import Rollout, RolloutRow, rollout_cv
from .verdicts import Crossing, Difference, Target, Verdicts, judge

__all__ = ["CellBootstrap", "CellFit", "ChinchillaParams", "Crossing", "Difference", "LadderError", "LadderFit",
           "LadderPoint", "Prediction", "Rollout", "RolloutRow", "Target", "Verdicts", "check_points",
           "fit_cell", "fit_ladder", "frontier", "judge", "law_loss", "page_text", "plot_isoflop",
           "plot_loss_vs_flops", "rollout_cv", "summary_text", "write_page"]
