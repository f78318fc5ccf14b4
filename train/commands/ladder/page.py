"""The ladder's markdown page (every number: parameters with intervals, the rollout
cross-validation, the predictions, the pairwise differences and the crossings) and the same
tables as plain text for the terminal."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ...atomic import atomic_write_text
from .bootstrap import LadderFit
from .fits import PARAM_NAMES
from .rollout import Rollout
from .verdicts import Verdicts


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def _iv(iv, fmt: str = ".4f") -> str:
    return f"[{iv[0]:{fmt}}, {iv[1]:{fmt}}]"


def parameter_table(ladder: LadderFit, level: float = 0.95) -> list[str]:
    rows = []
    for cell, b in ladder.cells.items():
        ivs, p = b.intervals(level), b.fit.params
        rows.append([cell, str(b.fit.n_points)]
                    + [f"{getattr(p, n):.4g} {_iv(ivs[n], '.4g')}" for n in PARAM_NAMES]
                    + [f"{b.fit.k:.3g}", f"{b.fit.residual_scale:.2e}", f"{b.failed}/{ladder.resamples}"])
    return _table(["cell", "points", *PARAM_NAMES, "k = C/(ND)", "log-residual scale", "failed refits"], rows)


def rollout_table(rollout: Rollout, level: float = 0.95) -> list[str]:
    rows = [[r.cell, str(r.rung), str(r.seed), f"{r.N:.3g}", f"{r.D:.3g}", f"{r.observed:.4f}",
             f"{r.predicted:.4f}", _iv(r.pi), f"{r.error:+.4f} ({r.relative_error:+.2%})",
             "yes" if r.inside else "**no**"] for r in rollout.rows]
    return _table(["cell", "held-out rung", "seed", "N", "D", "observed", "predicted",
                   f"{level:.0%} prediction interval", "error (obs - pred)", "inside"], rows)


def verdict_tables(v: Verdicts) -> list[str]:
    lv = f"{v.level:.0%}"
    out = [f"Target: N={v.target.N:.3g}, D={v.target.D:.3g}"
           + "".join(f", N[{c}]={n:.3g}" for c, n in v.target.cell_N), ""]
    out += _table(["cell", "N", "D", "C = kND", "predicted loss", f"{lv} prediction interval",
                   f"{lv} confidence interval"],
                  [[t.cell, f"{t.N:.3g}", f"{t.D:.3g}", f"{t.C:.3g}", f"{t.prediction.loss:.4f}",
                    _iv(t.prediction.pi), _iv(t.prediction.ci)] for t in v.predictions])
    out += ["", f"Pairwise differences at the target (paired bootstrap, {lv} interval of the curves' "
                f"difference; resolved when it excludes 0):", ""]
    out += _table(["A", "B", "L_A - L_B", f"{lv} interval", "resolved", "paired resamples", "fit on a bound"],
                  [[d.a, d.b, f"{d.diff:+.4f}", _iv(d.ci, "+.4f"), "yes" if d.resolved else "no",
                    str(d.paired), "; ".join(d.bounded) or "-"] for d in v.differences])
    if any(d.bounded for d in v.differences):
        out += ["", "A fit on a bound has its bootstrap cut at that bound: the interval of a difference that "
                    "involves it is too narrow on that side, and its \"resolved\" is the bounded law's "
                    "extrapolation, not something the points pin down (docs/ladder.md)."]
    out += ["", f"Frontier crossings L_A(C) = L_B(C), searched over C in {v.c_range[0]:.3g}..{v.c_range[1]:.3g} FLOPs:", ""]
    rows = []
    for c in v.crossings:
        where = (f"{c.C:.3g} FLOPs" if c.C is not None
                 else f"no crossing in range {v.c_range[0]:.3g}..{v.c_range[1]:.3g} FLOPs")
        rows.append([c.a, c.b, where, _iv(c.ci, ".3g") if c.ci else "-", f"{c.fraction:.0%}"])
    out += _table(["A", "B", "crossing", f"{lv} interval", "resamples crossing in range"], rows)
    return out


def page_text(ladder: LadderFit, rollout: Optional[Rollout], verdicts: Verdicts, command: str, machine: str,
              date: str, pictures: Sequence[Path] = (), title: str = "Scaling ladder") -> str:
    """The whole page; `pictures` are linked by file name (write them beside the page)."""
    lines = [f"# {title}", "", f"- command: `{command}`", f"- machine: {machine}", f"- date: {date}",
             f"- fit: L(N, D) = E + A/N^alpha + B/D^beta per cell, log-space Huber (delta 1e-3), L-BFGS-B from "
             f"{'all 1024' if ladder.starts is None else f'the best {ladder.starts} of 1024'} grid starts; "
             f"{ladder.resamples} paired bootstrap resamples over seeds within rungs (seed {ladder.seed}); "
             f"docs/ladder.md explains every number", ""]
    lines += ["## Fitted parameters (point fit [95% bootstrap interval])", ""] + parameter_table(ladder, verdicts.level)
    if rollout is not None:
        lines += ["", "## Rollout cross-validation (fit without the largest rung, predict it)", "",
                  "Held out: " + ", ".join(f"{c}: rung {r}" for c, r in rollout.held_out.items())
                  + f"; {sum(r.inside for r in rollout.rows)} of {len(rollout.rows)} runs inside their interval.", ""]
        lines += rollout_table(rollout, verdicts.level)
    lines += ["", "## Verdicts at the target", ""] + verdict_tables(verdicts)
    notes = list(verdicts.notes) + ([f"rollout fit: {n}" for n in rollout.fit.notes] if rollout is not None else [])
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if pictures:
        lines += ["", "## Pictures", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in pictures]
    return "\n".join(lines) + "\n"


def write_page(path: Path, ladder: LadderFit, rollout: Optional[Rollout], verdicts: Verdicts, command: str,
               machine: str, date: str, pictures: Sequence[Path] = (), title: str = "Scaling ladder") -> Path:
    """Write page_text to `path` atomically (its folder created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page_text(ladder, rollout, verdicts, command, machine, date, pictures, title))
    return path


def summary_text(verdicts: Verdicts, rollout: Optional[Rollout] = None) -> str:
    """The verdicts (and the rollout table) as the terminal prints them."""
    lines = (rollout_table(rollout, verdicts.level) + [""] if rollout is not None else []) + verdict_tables(verdicts)
    return "\n".join(lines)
