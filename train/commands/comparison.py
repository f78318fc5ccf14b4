"""The tables and curves of a comparison across cells and seeds, shared by `archscale compare`
and `archscale report` (so both print the same numbers from the same records).

A *cell* is {"label", "name", "runs": [run record, ...]}, one run record per seed:
{"run_dir", "seed", "params", "flops_per_token", "step", "tokens_seen", "target_tokens", "flops",
"eval_loss", "tokens_per_s", "yardstick_nats", "yardstick_bpb", "zero_shot_acc", "zero_shot_se",
"curve": [{"step", "tokens_seen", "flops", "yardstick_nats", ...}, ...]}. Every number of a table
is a mean ± sample std over a cell's runs (one run: its value; accuracy then shows its binomial
SE); differences are paired by seed, their intervals widened by the windows' sampling error where
the runs kept per-window scores on the same windows (train/eval/stats.py).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional

from ..eval.stats import mean_std, paired_difference, window_difference_se

# (key, column, format, lower is better)
METRICS = [("yardstick_nats", "continuation loss (nats/token)", ".4f", True),
           ("yardstick_bpb", "bits/byte", ".4f", True),
           ("zero_shot_acc", "continuation choice acc", ".3f", False),
           ("eval_loss", "own-objective held-out loss", ".4f", True)]
PAIR_METRICS = ("yardstick_nats", "yardstick_bpb", "zero_shot_acc")
BUDGET_COLUMNS = [("step", "steps", ",.0f"), ("tokens_seen", "tokens seen", ",.0f"),
                  ("target_tokens", "target tokens", ",.0f"), ("flops", "FLOPs", ".3g")]


def values(cell: dict, key: str) -> list[float]:
    return [r[key] for r in cell["runs"] if r.get(key) is not None]


def _mean_std_text(vals: list[float], fmt: str, se: Optional[float] = None) -> str:
    if not vals:
        return "-"
    m, s = mean_std(vals)
    if len(vals) == 1:
        return f"{m:{fmt}}" + (f" (SE {se:{fmt}})" if se is not None else "")
    return f"{m:{fmt}} ± {s:{fmt}}"


def _md(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def embedding_share(run: dict) -> Optional[float]:
    """The embedding's share of a run's parameters, 1 - non-embedding / total (None when the run
    record has no non-embedding count: runs recorded before compare kept it)."""
    ne = run.get("non_embedding_params")
    return None if ne is None or not run.get("params") else 1 - ne / run["params"]


def cell_table(cells: list[dict]) -> str:
    """One row per cell: seeds, size (non-embedding and total parameters, the embedding's share),
    every budget column, every yardstick metric (mean ± std)."""
    head = ["cell", "seeds", "non-emb params", "params", "emb share", "FLOPs/token", "planned FLOPs/step"] + \
        [c for _, c, _ in BUDGET_COLUMNS] + [c for _, c, _, _ in METRICS]
    rows = []
    for cell in cells:
        runs = cell["runs"]
        ne = [r["non_embedding_params"] / 1e6 for r in runs if r.get("non_embedding_params") is not None]
        share = [x for x in map(embedding_share, runs) if x is not None]
        row = [cell["name"], str(len(runs)), _mean_std_text(ne, ".3f") + ("M" if ne else ""),
               _mean_std_text([r["params"] / 1e6 for r in runs], ".3f") + "M",
               _mean_std_text([100 * x for x in share], ".1f") + ("%" if share else ""),
               _mean_std_text([r["flops_per_token"] for r in runs if r.get("flops_per_token")], ".3g"),
               _mean_std_text(values(cell, "planned_flops_per_step"), ".4g")]
        row += [_mean_std_text(values(cell, k), f) for k, _, f in BUDGET_COLUMNS]
        for k, _, f, _ in METRICS:
            se = runs[0].get("zero_shot_se") if k == "zero_shot_acc" and len(runs) == 1 else None
            row.append(_mean_std_text(values(cell, k), f, se))
        rows.append(row)
    return _md(head, rows)


def match_lines(cells: list[dict]) -> list[str]:
    """--match: each matched cell's quantity against the named cell's, with its gap and shape
    (searched, or its own for a cell of the named cell's family). Empty without --match."""
    ms = [(c, c.get("match")) for c in cells if c.get("match")]
    if not ms:
        return []
    out = [f"--match to {ms[0][1]['to']}: each cell within 5% of its {' / '.join(sorted({m['kind'] for _, m in ms}))} "
           f"(compare/matching.py: d_model, n_heads, d_ff, n_layers searched for another family)"]
    for c, m in ms:
        what, fmt = ("non-embedding parameters", ",.0f") if m["kind"] == "params" else ("training FLOPs per token", ".4g")
        how = "searched" if m["searched"] else "its own shape"
        shape = " ".join(f"{k}={v}" for k, v in m["shape"].items())
        out.append(f"  {c['name']}: {what} {m['value']:{fmt}} against {m['target']:{fmt}} ({m['gap']:+.1%}), "
                   f"{how}: {shape}")
    return out


BUDGET_KEYS = {"tokens-seen": "tokens_seen", "target-tokens": "target_tokens", "flops": "flops", "steps": "step"}


def budget_lines(cells: list[dict], kind: str, value: float, tolerance: float = 0.02) -> list[str]:
    """The cells whose measured budget (mean over seeds) is more than `tolerance` from `value`, or
    one optimizer step where a step is coarser (compare's own rule, compare/sizing.TOLERANCE, which
    it checks on every run's stream before training; this is the after-the-fact reading of what the
    runs counted). Empty: every cell met it."""
    key = BUDGET_KEYS[kind]
    out = []
    for c in cells:
        got = values(c, key)
        if not got:
            continue
        m, _ = mean_std(got)
        steps = values(c, "step")
        step = m / mean_std(steps)[0] if steps and mean_std(steps)[0] else 0.0
        if abs(m - value) > max(tolerance * value, step):
            out.append(f"budget not met: {c['name']} ran {m:,.4g} {kind} ({m / value:.0%} of {value:,.4g}); its "
                       f"rows carried {'more' if m > value else 'less'} than its plan, so compare it on the "
                       f"columns it matched")
    return out


def pairs(cells: list[dict], metrics: tuple = PAIR_METRICS) -> list[dict]:
    """Every pair of cells and metric: the paired difference a - b over their common seeds (the
    yardstick's metrics with their windows' sampling error, any other run key over seeds alone)."""
    out = []
    for a, b in itertools.combinations(cells, 2):
        by_seed_a = {r["seed"]: r for r in a["runs"]}
        by_seed_b = {r["seed"]: r for r in b["runs"]}
        seeds = sorted(set(by_seed_a) & set(by_seed_b))
        for key in metrics:
            xa = [by_seed_a[s].get(key) for s in seeds]
            xb = [by_seed_b[s].get(key) for s in seeds]
            if not seeds or any(v is None for v in xa + xb):
                continue
            se = [window_se(by_seed_a[s], by_seed_b[s], key) if key in PAIR_METRICS else None for s in seeds]
            d = paired_difference(xa, xb, None if None in se else se)
            out.append({"a": a["name"], "b": b["name"], "metric": key, "seeds": seeds, "mean": d.mean,
                        "half_width": d.half_width, "low": d.low, "high": d.high, "resolved": d.resolved})
    return out


def window_se(ra: dict, rb: dict, key: str) -> Optional[tuple[float, int]]:
    """(se, df): the windows' sampling error of one seed's difference on `key`, clustered by
    document (None unless both runs were scored on the same windows and kept per-window scores)."""
    import math

    wa, wb = ra.get("per_window"), rb.get("per_window")
    if not wa or not wb or ra.get("fingerprint") != rb.get("fingerprint") or len(wa["nll"]) != len(wb["nll"]):
        return None
    n, docs = len(wa["nll"]), wa.get("docs")
    if key == "zero_shot_acc":
        if wa["correct"] is None or wb["correct"] is None:
            return None
        return window_difference_se(wa["correct"], wb["correct"], groups=docs)
    denom = sum(wa["tokens"]) if key == "yardstick_nats" else sum(wa["bytes"]) * math.log(2)
    return window_difference_se(wa["nll"], wb["nll"], n / denom, docs)  # a ratio of sums: the same bytes / tokens


def pair_table(pair_rows: list[dict]) -> str:
    """The pairwise differences with their 95% intervals, and whether each excludes zero."""
    names = {k: c for k, c, _, _ in METRICS}
    lower = {k: lo for k, _, _, lo in METRICS}
    rows = []
    for p in pair_rows:
        hw = "-" if p["half_width"] is None else f"{p['half_width']:.4f}"
        interval = "-" if p["low"] is None else f"[{p['low']:+.4f}, {p['high']:+.4f}]"
        if p["resolved"]:
            better = p["a"] if (p["mean"] < 0) == lower[p["metric"]] else p["b"]
            verdict = f"yes: {better} better"
        else:
            verdict = "no" if p["half_width"] is not None else "no (1 seed)"
        rows.append([f"{p['a']} - {p['b']}", names[p["metric"]], str(len(p["seeds"])), f"{p['mean']:+.4f}", hw,
                     interval, verdict])
    return _md(["pair (a - b)", "metric", "seeds", "difference", "± (95%)", "95% interval", "resolved"], rows)


def resolved_lines(pair_rows: list[dict]) -> list[str]:
    """In words: which differences are resolved (their 95% interval excludes zero), which not."""
    yes = [p for p in pair_rows if p["resolved"]]
    no = [p for p in pair_rows if not p["resolved"]]
    out = []
    if yes:
        out.append("resolved (95% interval excludes 0): " + "; ".join(
            f"{p['a']} - {p['b']} on {p['metric']} = {p['mean']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}]" for p in yes))
    if no:
        out.append("not resolved: " + "; ".join(f"{p['a']} - {p['b']} on {p['metric']}" for p in no))
    return out


def _mean_curve(cell: dict, x: str, y: str):
    """(xs, mean, low, high) over the runs' eval points, by eval index (runs of a cell evaluate at
    the same steps); the band is mean ± std (min..max with two runs is the same width class)."""
    curves = [[pt for pt in r.get("curve", []) if pt.get(y) is not None] for r in cell["runs"]]
    n = min((len(c) for c in curves), default=0)
    xs, ms, lo, hi = [], [], [], []
    for i in range(n):
        pts = [c[i] for c in curves]
        m, s = mean_std([p[y] for p in pts])
        xs.append(sum(p[x] for p in pts) / len(pts))
        ms.append(m)
        lo.append(m - s)
        hi.append(m + s)
    return xs, ms, lo, hi


def plot_curves(cells: list[dict], path: Path) -> Path:
    """Mean yardstick curves with ± std bands against tokens seen and FLOPs, the continuation
    choice accuracy, and the training loss (mean over seeds)."""
    from .plots import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [(axes[0][0], "tokens_seen", "yardstick_nats", "tokens seen", "continuation loss (nats/token)"),
              (axes[0][1], "flops", "yardstick_nats", "training FLOPs", "continuation loss (nats/token)"),
              (axes[1][0], "tokens_seen", "zero_shot_acc", "tokens seen", "continuation choice accuracy")]
    for ax, x, y, xl, yl in panels:
        for cell in cells:
            xs, ms, lo, hi = _mean_curve(cell, x, y)
            if xs:
                line, = ax.plot(xs, ms, marker="o", label=cell["name"])
                ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
        ax.set(xlabel=xl, ylabel=yl, title=f"{yl} vs {xl} (mean ± std over seeds)")
    ax = axes[1][1]
    for cell in cells:
        losses = [dict(r.get("losses") or []) for r in cell["runs"]]
        steps = sorted(set.intersection(*(set(l) for l in losses))) if losses and all(losses) else []
        if steps:
            ax.plot(steps, [sum(l[s] for l in losses) / len(losses) for s in steps], label=cell["name"])
    ax.set(xlabel="step", ylabel="training loss (each objective's own targets)", title="training loss (mean)")
    for row in axes:
        for a in row:
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend()
    save(fig, path)
    return path
