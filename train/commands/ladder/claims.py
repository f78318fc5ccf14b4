"""`archscale ladder --claim NAME`: one of `archscale reproduce`'s claims judged on ladders.

The one-point reproduction (train/commands/reproduce) trains the claim's cells at one size and
judges the measured differences with the claim's rule. On a ladder the same cells are trained at
every rung and budget, and the same rule function (reproduce/rules.py, unchanged) reads instead
the fits' predicted differences at the target, each with its paired-bootstrap interval:

    pair = {"a", "b", "metric": yardstick_nats, "mean": L_a - L_b, "low", "high", "resolved"}

Where each cell is judged. The first cell at the target's N; every other cell at N times its own
ratio of non-embedding parameters to the first cell's at the largest rung, unless --target names
it (N[CELL]=...). The match carries to the target: a parameter-matched cell sits at ~N, a cell
matched on FLOPs per token (su-ed-params' `ed-flops`) at its own, larger, count. (A ladder without
--claim judges ED at its reference size instead: verdicts.Target, command.target_of.)

Across rungs. For every pair of the claim's cells, the measured difference at each rung: the mean
over seeds and budgets of the paired differences of finished branches (same rung, seed, budget),
and whether its sign is the same at every rung. Reported beside the verdict, not folded into it.

A claim whose rule reads a measurement other than the loss (su-low-rank's rank, wang-*'s
finetuned accuracies) or whose cells change with the model's depth is refused in one line.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np

from .points import LadderError


def claim_of(name: str):
    """reproduce's Claim called `name`, if a ladder can judge it (else LadderError, one line)."""
    from ..reproduce import CLAIMS

    claim = CLAIMS.get(name)
    fit = sorted(n for n, c in CLAIMS.items() if c.measure is None and c.cells(1) == c.cells(2))
    if claim is None or name not in fit:
        why = "is not a claim of archscale reproduce" if claim is None else (
            "is judged on a measurement of the runs, not on the loss a ladder fits" if claim.measure is not None
            else "has cells that change with the model's depth, so a rung's cells would differ")
        raise LadderError(f"--claim {name!r} {why}; a ladder judges: {', '.join(fit)}")
    return claim


def claim_cells(claim) -> tuple:
    """The claim's cells (labels and own matches, as reproduce builds its grid); its match_to,
    where it has one, must be the first cell (the ladder's match reference)."""
    from ...yamlfile import parse_yaml
    from ..compare.cells import grid_from_data, parse_cell

    text = "cells:\n" + "".join(f"  - {c}\n" for c in claim.cells(1))
    cells = grid_from_data(parse_yaml(text, f"claim {claim.name}"), f"claim {claim.name}")["cells"]
    if claim.match_to and parse_cell(claim.match_to).label != cells[0].label:
        raise LadderError(f"claim {claim.name} matches its cells to {claim.match_to}, not to its first cell "
                          f"{cells[0].spec}; the ladder matches every rung to the first cell")
    return tuple(cells)


def claim_target(target, plans, cells):
    """`target` with each cell not named in it judged at N times its non-embedding parameter ratio to
    the first cell at the largest rung (the module docstring)."""
    facts = plans[-1].facts
    ref = facts[cells[0].label]["non_embedding_params"]
    named = dict(target.cell_N)
    extra = tuple((c.name, target.N * facts[c.label]["non_embedding_params"] / ref) for c in cells[1:]
                  if c.name not in named)
    return replace(target, cell_N=target.cell_N + extra)


def predicted_pairs(verdicts) -> list[dict]:
    """The verdicts' differences at the target in the rules' pair format."""
    from ..reproduce.rules import METRIC

    return [{"a": d.a, "b": d.b, "metric": METRIC, "mean": d.diff, "low": d.ci[0], "high": d.ci[1],
             "resolved": d.resolved} for d in verdicts.differences]


def rung_signs(points: list[dict], names: list[str], rungs: list[str]) -> list[dict]:
    """For each pair (a, b) of `names`: per rung, the mean over seeds and budgets of the paired
    differences loss_a - loss_b (None where no pair finished), and whether the sign holds."""
    loss = {(p["cell"], p["rung"], p["seed"], p["budget"]): p["loss"] for p in points}
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            per = defaultdict(list)
            for (cell, rung, seed, budget), value in loss.items():
                other = loss.get((b, rung, seed, budget))
                if cell == a and other is not None:
                    per[rung].append(value - other)
            means = {r: float(np.mean(per[r])) if per[r] else None for r in rungs}
            signs = {np.sign(m) for m in means.values() if m is not None}
            out.append({"a": a, "b": b, "means": means, "n": {r: len(per[r]) for r in rungs},
                        "holds": len(signs) == 1 and None not in means.values()})
    return out


def judge_claim(claim, verdicts, points: list[dict], rungs: list[str]) -> tuple[str, list[str], list[dict]]:
    """(the rule's verdict at the target, its reasons, rung_signs of the claim's cells)."""
    verdict, reasons = claim.rule(predicted_pairs(verdicts), claim.names)
    return verdict, reasons, rung_signs(points, list(dict.fromkeys(claim.names.values())), rungs)


def claim_section(claim, verdict: str, reasons: list[str], signs: list[dict], rungs: list[str], verdicts) -> str:
    """The page's section for the claim (markdown; the terminal prints the same lines)."""
    rule = " ".join(claim.rule.__doc__.split())
    lines = [f"## Claim {claim.name} on the ladder", "", f"**Claim** ({claim.source}): {claim.text}", "",
             f"**Rule** (reproduce's, unchanged, applied to the predicted differences at the target): {rule}", "",
             f"**Verdict at the target: {verdict}.**"] + [f"- {r}" for r in reasons]
    bounded = sorted({b for d in verdicts.differences for b in d.bounded})
    if bounded:
        lines += ["", f"**Caveat:** the fits of {'; '.join(bounded)} ended on a bound, so the differences above are "
                      f"the bounded laws' extrapolation to the target, and their intervals are cut on that side."]
    lines += ["", "Measured differences per rung (mean over seeds and budgets of paired branches, nats/token):", "",
              "| A - B | " + " | ".join(rungs) + " | sign holds across rungs |", "|" + "---|" * (len(rungs) + 2)]
    for s in signs:
        cols = [("-" if s["means"][r] is None else f"{s['means'][r]:+.4f} (n={s['n'][r]})") for r in rungs]
        lines.append(f"| {s['a']} - {s['b']} | " + " | ".join(cols) + f" | {'yes' if s['holds'] else 'no'} |")
    return "\n".join(lines) + "\n"
