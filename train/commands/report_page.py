"""The report's comparison page (`archscale report` writes it beside report.html): the common
yardstick's table with error bars, the pairwise differences, curves against tokens and FLOPs,
and the budget and parameter columns, in markdown (report.md) and PNG (yardstick.png), built by
the same code as `archscale compare`'s table (comparison.py).

Cells: runs are grouped by their directory name without the seed (compare's OUT/LABEL/seed-I
groups by LABEL; a sweep's `cd-flm-debug-seed0` by `cd-flm-debug`); a run's seed index is the
number in its name (else its config's seed). Sources, all read-only: RUN/yardstick.json (the
last evaluation in full, per-window scores included), metrics.jsonl's eval lines (the curves) and
training losses, RUN/heldout.json. Every number on the page names its run directories.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

SEED_NAME = re.compile(r"^(?:(?P<stem>.*?)[-_])?seed[-_]?(?P<seed>\d+)$")


def cell_of(run_dir: Path, config_seed: int) -> tuple[str, int]:
    """(cell label, seed index) of a run directory."""
    m = SEED_NAME.match(run_dir.name)
    if not m:
        return run_dir.name, config_seed
    return (m["stem"] or run_dir.parent.name), int(m["seed"])


def run_record(row: dict) -> dict:
    """comparison.py's run record of one report row (read_run) and its yardstick files."""
    from ..trainer.yardstick import YARDSTICK_FILE

    run_dir = Path(row["run_dir"])
    ys_path = run_dir / YARDSTICK_FILE
    ys = json.loads(ys_path.read_text()) if ys_path.is_file() else {}
    curve, losses, planned = [], [], None
    if (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line a kill cut short
            if "yardstick_nats" in rec:
                curve.append(rec)
            elif "loss" in rec:
                losses.append((rec["step"], rec["loss"]))
                planned = rec.get("planned_flops_per_step", planned)
    last = curve[-1] if curve else {}
    total = row["total"]
    return {"run_dir": str(run_dir), "params": row["params"] or 0, "flops_per_token": row.get("flops_per_token"),
            "planned_flops_per_step": planned, "step": row["step"], "tokens_seen": total["tokens_seen"],
            "target_tokens": total["target_tokens"], "flops": total["flops"], "eval_loss": row["heldout_loss"],
            **{k: last.get(k) for k in ("yardstick_nats", "yardstick_bpb", "zero_shot_acc", "zero_shot_se")},
            "fingerprint": ys.get("fingerprint"), "per_window": ys.get("per_window") if ys.get("step") == row["step"]
            else None, "curve": curve, "losses": losses}


def cells_of(rows: list[dict], seeds: dict[str, int]) -> list[dict]:
    """Runs grouped into cells (see the module docstring), in the order first seen."""
    cells: dict[str, dict] = {}
    for row in rows:
        label, seed = cell_of(Path(row["run_dir"]), seeds.get(row["run_dir"], 0))
        name = f"{row['arch'].upper()}:{row['objective'].upper()}"
        cell = cells.setdefault(label, {"label": label, "name": name if name.lower().replace(":", "-") == label
                                        else f"{name} ({label})", "runs": []})
        cell["runs"].append({**run_record(row), "seed": seed})
    return [c for c in cells.values() if any(r.get("yardstick_nats") is not None for r in c["runs"])]


def write_page(cells: list[dict], out: Path, report_table: str) -> tuple[Path, Path, list[dict]]:
    """report.md and yardstick.png in `out`: (md path, png path, the pairwise differences)."""
    from .comparison import cell_table, pair_table, pairs, plot_curves, resolved_lines

    pair_rows = pairs(cells)
    png = plot_curves(cells, out / "yardstick.png")
    sources = "\n".join(f"- **{c['name']}**: " + ", ".join(f"`{r['run_dir']}` (seed {r['seed']})" for r in c["runs"])
                        for c in cells)
    md = f"""# archscale report: the common yardstick

Every cell is scored by the same code on the same held-out windows (train/eval/yardstick.py,
docs/evaluation.md): continuation loss in nats per token and bits per byte, and zero-shot
continuation choice accuracy. Mean ± std over seeds; differences are paired by seed, with 95%
intervals that also cover the windows' sampling error. MLM cells are scored the T5 way (a sentinel
before the continuation), the known handicap of span corruption before adaptation.

## Yardstick, budgets and sizes

{cell_table(cells)}

## Pairwise differences (a - b)

{pair_table(pair_rows)}

{chr(10).join('- ' + line for line in resolved_lines(pair_rows))}

## Curves

![yardstick curves]({png.name})

## Every run (own-objective held-out loss, totals over phases)

```
{report_table}
```

## Sources

{sources}
"""
    path = out / "report.md"
    path.write_text(md)
    return path, png, pair_rows
