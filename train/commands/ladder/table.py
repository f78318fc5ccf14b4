"""A ladder's points as a table (OUT/ladder.json, written by `archscale ladder`), and
`archscale report OUT` for a ladder: the table, and the fitted page's verdicts when it has one.

One row per cell x rung x budget: N (non-embedding parameters), D (tokens seen) and C (FLOPs
counted), each the mean over seeds (seeds share them but for the last step's rows), and the
yardstick's continuation loss, mean ± std over seeds (std needs 2 seeds). Read-only: nothing is
trained or fitted again.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

LADDER_FILE = "ladder.json"
PAGE_FILE = "ladder.md"


def points_table(doc: dict) -> str:
    """The markdown table of ladder.json's points, grouped by cell, rung and budget."""
    groups: dict[tuple, list[dict]] = {}
    for p in doc["points"]:
        groups.setdefault((p["cell"], p["rung"], p["budget"]), []).append(p)
    rows = ["| cell | rung | budget | N | D (tokens) | C (FLOPs) | loss (nats/token) | seeds |",
            "|---|---|---|---|---|---|---|---|"]
    for (cell, rung, budget), pts in groups.items():
        loss = [p["loss"] for p in pts]
        sd = f" ± {statistics.stdev(loss):.4f}" if len(loss) > 1 else ""
        mean = lambda k: statistics.fmean(p[k] for p in pts)  # noqa: E731
        rows.append(f"| {cell} | {rung} | {budget:,.4g} | {mean('N'):,.0f} | {mean('D'):,.0f} | {mean('C'):.3g} | "
                    f"{statistics.fmean(loss):.4f}{sd} | {len(pts)} |")
    return "\n".join(rows)


def missing_runs(doc: dict) -> list[str]:
    """The branch directories of ladder.json's runs that have no point (not finished when written)."""
    have = {p["run_dir"] for p in doc["points"]}
    return [r["run_dir"] for r in doc["runs"] if r["budget"] is not None and r["run_dir"] not in have]


def show(path: Path, out: Path | None = None) -> int:
    """Print the ladder in `path` (its ladder.json; the verdicts of its ladder.md if fitted) and
    write OUT/report.md (default PATH/report). Returns the exit status."""
    path = Path(path)
    doc = json.loads((path / LADDER_FILE).read_text())
    table = points_table(doc)
    missing = missing_runs(doc)
    head = (f"Ladder {path}: cells {', '.join(doc['cells'])}; rungs {', '.join(doc['rungs'])}; {doc['seeds']} "
            f"seed(s); wsd decay fraction {doc['decay_fraction']}; rungs matched by {doc['match']}; "
            f"{len(doc['points'])} point(s)" + (f", {len(missing)} branch(es) unfinished" if missing else ""))
    page = path / PAGE_FILE
    verdicts = ""
    if page.exists():
        text = page.read_text()
        start = text.find("## Verdicts at the target")
        verdicts = text[start:text.find("\n## ", start + 3)] if start >= 0 else ""
    else:
        verdicts = (f"not fitted ({PAGE_FILE} is missing): the runs are not all finished, or the fit refused the "
                    f"ladder; the archscale ladder command (without --submit) says which")
    print(head + "\n\n" + table + "\n\n" + verdicts.strip())
    out = Path(out) if out else path / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(f"# archscale report: a scaling ladder\n\n{head}\n\n{table}\n\n"
                                   + (f"The fits, rollout CV, verdicts and pictures: [{PAGE_FILE}]({page.resolve()})\n\n"
                                      if page.exists() else "") + verdicts.strip() + "\n")
    print(f"\n{out / 'report.md'}" + (f"   {page}" if page.exists() else ""))
    return 0
