"""`archscale report RUNS... | SWEEP_DIR`: one comparison table across runs, plots, one HTML page.

    archscale report runs/cd-flm runs/nd-plm runs/ed-mlm --out runs/report
    archscale report runs/sweep                     # every run directory below it -> runs/sweep/report
    archscale report runs/ladder                    # an `archscale ladder` output: its points and verdicts

Per run (a directory holding config.yaml; read-only, nothing is recomputed): architecture,
objective, size, parameters, step, tokens seen, target tokens (tokens that carried a loss), FLOPs,
held-out loss, zero-shot scores. Sources: the newest complete checkpoint's trainer_state.json
(totals), metrics.jsonl (the trainer's held-out loss over training), RUN/eval/step-N.json
(`archscale eval`: held-out loss and zero-shot rank classification per checkpoint).

**Phases add up.** A run started with `init.from_checkpoint` (adaptation: NC-A, LM-A; multitask
finetuning) inherits its parent's cost: tokens, target tokens and FLOPs of every earlier phase are
added (recursively) to the run's own, and the plots place the run after its parent on the
tokens / FLOPs axes. The parent's totals are read from its checkpoint's trainer_state.json. The
parent checkpoint is the one the trainer recorded in the child's trainer_state.json (`init`:
{"checkpoint": ...}) when it does; otherwise init.from_checkpoint is resolved now, a run directory
to that run's newest complete checkpoint (see docs/evaluation.md).

**Adapted vs from scratch.** For an adapted run and a from-scratch run of the same architecture,
objective and data, the report says after how many of its own steps the adapted run's held-out
loss reaches the from-scratch run's final one (the NC-A shortcut of the reference experiment).

**Compute matching.** The reference experiment compares cells at equal tokens seen. The reference
budget is the one most runs share (the value with the most runs within 5% of it; ties: the
smallest); a run whose total tokens seen (or total FLOPs) differ from it by more than 5% is
flagged in the table (`tokens`, `FLOPs`) and on the page.

**A ladder** (the output directory of `archscale ladder`, holding ladder.json): its points per cell,
rung and budget (N, D, C, the yardstick's loss over seeds) and the verdicts of its ladder.md, in
report.md (ladder/table.py).

**The common yardstick** (report_page.py): runs are grouped into cells across seeds, and
report.md + yardstick.png show the yardstick table with error bars, the pairwise differences with
95% intervals, the curves against tokens and FLOPs, and the budget and parameter columns, each
number naming its run directories; the same tables as `archscale compare` prints.

Outputs in --out: report.json (every number), report.md and yardstick.png (the yardstick page),
loss.png and zero_shot.png (against tokens seen and against FLOPs), report.html (self-contained:
the tables and the images embedded as base64).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import re
import sys
from pathlib import Path
from typing import Optional

from ..trainer import checkpointing as ckpt

MATCH_TOLERANCE = 0.05  # the reference matches tokens seen exactly; 5% leaves room for the last step


# ============================================================================ reading runs
def find_runs(paths: list[str | Path], max_depth: int = 3) -> list[Path]:
    """Run directories (holding config.yaml) among `paths` and, for other directories, below them."""
    out: list[Path] = []

    def walk(d: Path, depth: int):
        if (d / "config.yaml").is_file():
            out.append(d)
            return
        if depth >= max_depth:
            return
        for child in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if child.name not in ("checkpoints", "eval", "export", "report", "tb", "slurm", "plots"):
                walk(child, depth + 1)

    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is not a directory; pass run directories or a sweep directory")
        found = len(out)
        walk(p, 0)
        if len(out) == found:
            raise FileNotFoundError(f"no run directory (with config.yaml) in {p}")
    return list(dict.fromkeys(out))


def _read_state(step_dir: Path) -> dict:
    """trainer_state.json as a plain dict (tolerates fields this version does not know)."""
    try:
        return json.loads((step_dir / ckpt.STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ckpt.CheckpointError(f"cannot read {step_dir / ckpt.STATE_FILE}: {e}") from e


def _resolve_checkpoint(path: str | Path) -> Path:
    """init.from_checkpoint as the trainer resolves it: a step directory, or a run's newest."""
    return ckpt.resolve_checkpoint(path, what="init.from_checkpoint")


def parent_phases(config: dict, state: Optional[dict] = None, seen: Optional[set] = None) -> list[dict]:
    """The earlier phases a run's weights come from, oldest first: [{run, checkpoint, arch,
    objective, step, tokens_seen, target_tokens, flops}], following init.from_checkpoint.

    The checkpoint a run was initialised from is `state["init"]["checkpoint"]` when the trainer
    recorded it in trainer_state.json, else the run config's init.from_checkpoint resolved now."""
    recorded = ((state or {}).get("init") or {}).get("checkpoint")
    init = recorded or (config.get("init") or {}).get("from_checkpoint")
    if not init:
        return []
    step_dir = _resolve_checkpoint(init)
    seen = seen or set()
    if step_dir.resolve() in seen:
        raise ValueError(f"init.from_checkpoint chain loops at {step_dir}")
    seen.add(step_dir.resolve())
    state = _read_state(step_dir)
    pcfg = state.get("config") or {}
    phase = {"run": str(step_dir.parent.parent), "checkpoint": str(step_dir),
             "arch": pcfg.get("model", {}).get("arch"), "objective": pcfg.get("objective", {}).get("name"),
             "step": state.get("step", 0), "tokens_seen": state.get("tokens_seen", 0),
             "target_tokens": state.get("target_tokens", 0), "flops": state.get("flops", 0.0)}
    return parent_phases(pcfg, state, seen) + [phase]


def _params(cfg_obj) -> Optional[int]:
    """Parameters from the run's config and tokenizer (the vocabulary is the tokenizer's)."""
    try:
        from .. import registry
        from ..data.tokenizer import load_tokenizer

        _, tokens = load_tokenizer(cfg_obj.data)
        arch = registry.get(cfg_obj.model.arch)
        return arch.num_params(arch.make_config(cfg_obj.model, registry.padded_vocab(tokens.vocab_size)))
    except Exception:  # a tokenizer directory that moved, ...: the column shows "-"
        return None


def _run_name(run_dir: Path) -> str:
    """The run's name in tables: compare's LABEL/seed-I, else the directory's name."""
    return f"{run_dir.parent.name}/{run_dir.name}" if re.fullmatch(r"seed-\d+", run_dir.name) else run_dir.name


def _flops_per_token(cfg_obj) -> Optional[float]:
    """Planned training FLOPs per token (the registry's row_flops / tokens_per_row)."""
    try:
        from .compare.sizing import cell_facts

        return cell_facts(cfg_obj)["flops_per_token"]
    except Exception:  # as _params: the column shows "-"
        return None


def read_run(run_dir: str | Path) -> dict:
    """Everything the report shows about one run (see the module docstring)."""
    from ..config import from_dict, RunConfig
    from ..yamlfile import load_yaml

    run_dir = Path(run_dir)
    config = load_yaml(run_dir / "config.yaml", "run config") or {}  # the one YAML reader (a hand edit too)
    cfg = from_dict(RunConfig, config)
    layout = ckpt.RunLayout.from_config(cfg) if Path(cfg.run_dir).resolve() == run_dir.resolve() else \
        ckpt.RunLayout.of(run_dir, cfg.checkpoint.dir)
    newest = ckpt.newest_checkpoint(layout.checkpoints)
    state = _read_state(newest) if newest else {}
    evals = []
    for f in sorted((run_dir / "eval").glob("step-*.json")):
        try:
            evals.append(json.loads(f.read_text()))
        except json.JSONDecodeError:
            continue  # a file being written by another process
    evals.sort(key=lambda e: e["step"])
    metrics_loss = []  # (step, tokens, flops, loss) of the trainer's held-out evaluations
    if (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("eval_loss") is not None:
                metrics_loss.append((rec["step"], rec["tokens_seen"], rec["flops"], rec["eval_loss"]))
    phases = parent_phases(config, state)
    inherited = {k: sum(p[k] for p in phases) for k in ("tokens_seen", "target_tokens", "flops")}
    own = {k: state.get(k, 0) for k in ("tokens_seen", "target_tokens", "flops")}
    params = next((e["params"] for e in reversed(evals) if e.get("params")), None) or _params(cfg)
    heldout = metrics_loss[-1][3] if metrics_loss else None
    heldout_from = "trainer" if metrics_loss else None
    last_eval_loss = next((e for e in reversed(evals) if (e.get("heldout") or {}).get("loss") is not None), None)
    if last_eval_loss and (not metrics_loss or last_eval_loss["step"] > metrics_loss[-1][0]):
        heldout, heldout_from = last_eval_loss["heldout"]["loss"], "eval"
    zs = next((e for e in reversed(evals) if "zero_shot" in e), None)
    return {
        "run_dir": str(run_dir), "name": _run_name(run_dir), "arch": cfg.model.arch, "objective": cfg.objective.name,
        "seed": cfg.seed, "flops_per_token": _flops_per_token(cfg),
        "size": cfg.model.size, "params": params, "step": state.get("step", 0),
        "finished": (run_dir / "FINISHED").exists(), "init": config.get("init", {}).get("from_checkpoint"),
        "phases": phases, "own": own, "inherited": inherited,
        "total": {k: own[k] + inherited[k] for k in own},
        "heldout_loss": heldout, "heldout_from": heldout_from,
        "zero_shot": None if zs is None else {
            "step": zs["step"], **zs["zero_shot"]["mean"],
            "datasets": {k: v["acc"] for k, v in zs["zero_shot"]["datasets"].items()}},
        "loss_curve": [(t + inherited["tokens_seen"], f + inherited["flops"], loss) for _, t, f, loss in metrics_loss],
        "loss_steps": [(step, loss) for step, _, _, loss in metrics_loss],
        "data": config.get("data", {}),
        "score_curve": [(e["tokens_seen"] + inherited["tokens_seen"], e["flops"] + inherited["flops"],
                         e["zero_shot"]["mean"]["acc"], e["zero_shot"]["mean"]["acc_norm"])
                        for e in evals if "zero_shot" in e],
    }


def matched_reference(values: list[float], tolerance: float = MATCH_TOLERANCE) -> float:
    """The budget most runs share: the value with the most runs within `tolerance` of it (ties:
    the smallest, i.e. the from-scratch budget rather than an adapted run's larger total)."""
    if not values:
        return 0
    near = lambda v: sum(abs(w - v) <= tolerance * v for w in values)  # noqa: E731
    return min(values, key=lambda v: (-near(v), v))


def flag_unmatched(rows: list[dict], tolerance: float = MATCH_TOLERANCE) -> dict:
    """Mark runs whose total tokens seen / FLOPs differ from the budget most runs share
    (`matched_reference`) by more than `tolerance`. Sets row["flags"] ("T", "F", "TF" or "")
    and returns the reference values."""
    ref = {key: matched_reference([r["total"][key] for r in rows], tolerance) for key in ("tokens_seen", "flops")}
    for r in rows:
        flags = ""
        for key, letter in (("tokens_seen", "T"), ("flops", "F")):
            if ref[key] and abs(r["total"][key] - ref[key]) > tolerance * ref[key]:
                flags += letter
        r["flags"] = flags
    return ref


def catch_up(rows: list[dict]) -> None:
    """For every adapted run (one with earlier phases): the first of its own steps at which its
    held-out loss reaches the final held-out loss of a from-scratch run of the same architecture,
    objective and data (the NC-A claim: the adapted model gets there in far fewer steps).
    Sets row["catch_up"] = {reference, target_loss, reference_steps, steps (None: not reached)}."""
    for r in rows:
        r["catch_up"] = None
        if not r["phases"] or not r["loss_steps"]:
            continue
        refs = [q for q in rows if not q["phases"] and q["loss_steps"] and q["arch"] == r["arch"]
                and q["objective"] == r["objective"] and q["data"] == r["data"]]
        if not refs:
            continue
        ref = max(refs, key=lambda q: q["step"])
        target = ref["loss_steps"][-1][1]
        steps = next((st for st, loss in r["loss_steps"] if loss <= target), None)
        r["catch_up"] = {"reference": ref["name"], "target_loss": target, "reference_steps": ref["loss_steps"][-1][0],
                         "steps": steps}


def catch_up_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        c = r.get("catch_up")
        if not c:
            continue
        if c["steps"] is None:
            out.append(f"{r['name']} has not reached {c['reference']}'s final held-out loss {c['target_loss']:.4f} "
                       f"(step {c['reference_steps']}) in its {r['step']} steps")
        else:
            out.append(f"{r['name']} reaches {c['reference']}'s final held-out loss {c['target_loss']:.4f} "
                       f"(from scratch: {c['reference_steps']} steps) after {c['steps']} steps of its own "
                       f"({c['reference_steps'] / c['steps']:.1f}x fewer; held-out loss evaluated every "
                       f"eval.every_n_steps, so this is an upper bound)")
    return out


# ============================================================================ rendering
COLUMNS = ["run", "arch", "objective", "init from", "params", "step", "tokens seen", "target tokens", "FLOPs",
           "held-out loss", "zero-shot acc", "acc (len-norm)", "matched"]


def _label(r: dict) -> str:
    phases = "".join(f"{(p['arch'] or '?').upper()}:{(p['objective'] or '?').upper()} -> " for p in r["phases"])
    return f"{phases}{r['arch'].upper()}:{r['objective'].upper()}"


def table_rows(rows: list[dict]) -> list[list[str]]:
    def total(r, key, fmt):
        own, inh = r["own"][key], r["inherited"][key]
        return fmt(own + inh) + (f" ({fmt(inh)} inherited)" if inh else "")

    out = []
    for r in rows:
        zs = r["zero_shot"]
        out.append([r["name"], r["arch"].upper(), r["objective"].upper(),
                    " -> ".join(_label(r).split(" -> ")[:-1]) or "-",
                    "-" if r["params"] is None else f"{r['params'] / 1e6:.2f}M",
                    str(r["step"]) + ("" if r["finished"] else "*"),
                    total(r, "tokens_seen", lambda v: f"{v:,}"), total(r, "target_tokens", lambda v: f"{v:,}"),
                    total(r, "flops", lambda v: f"{v:.3g}"),
                    "-" if r["heldout_loss"] is None else f"{r['heldout_loss']:.4f}",
                    "-" if zs is None else f"{zs['acc']:.4f}", "-" if zs is None else f"{zs['acc_norm']:.4f}",
                    "yes" if not r["flags"] else "NO (" + ", ".join(
                        {"T": "tokens", "F": "FLOPs"}[c] for c in r["flags"]) + ")"])
    return out


def text_table(rows: list[dict]) -> str:
    body = table_rows(rows)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(b) for b in body])


def plot(rows: list[dict], out: Path) -> list[Path]:
    """loss.png (held-out loss vs tokens seen / FLOPs) and, if any run was evaluated zero-shot,
    zero_shot.png (mean accuracy over datasets vs tokens seen / FLOPs)."""
    from .plots import pyplot, save

    plt = pyplot()
    written = []
    specs = [("loss.png", "loss_curve", 2, "held-out loss (each run's own objective)")]
    if any(r["score_curve"] for r in rows):
        specs.append(("zero_shot.png", "score_curve", 2, "zero-shot accuracy (mean over datasets)"))
    for name, key, col, ylabel in specs:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
        for r in rows:
            pts = r[key]
            if not pts:
                continue
            label = f"{r['name']} ({_label(r)})" + (" [not matched]" if r["flags"] else "")
            for ax, x in zip(axes, (0, 1)):
                ax.plot([p[x] for p in pts], [p[col] for p in pts], marker="o", label=label)
                if r["phases"]:  # where the adapted run's own phase starts
                    ax.axvline(r["inherited"]["tokens_seen" if x == 0 else "flops"], color="grey", lw=0.6, ls=":")
        axes[0].set(xlabel="tokens seen (all phases)", ylabel=ylabel, title=f"{ylabel} vs tokens seen")
        axes[1].set(xlabel="training FLOPs (all phases)", ylabel=ylabel, title=f"{ylabel} vs FLOPs")
        for ax in axes:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        written.append(save(fig, out / name, dpi=100))
    return written


def render_html(rows: list[dict], images: list[Path], ref: dict, yardstick: str = "") -> str:
    esc = html.escape
    ys = (f"<h2>The common yardstick (mean ± std over seeds; pairwise 95% intervals)</h2><pre>{esc(yardstick)}</pre>"
          if yardstick else "")
    head = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    body = "".join("<tr" + (' class="flag"' if r["flags"] else "") + ">" + "".join(f"<td>{esc(c)}</td>" for c in cells)
                   + "</tr>" for r, cells in zip(rows, table_rows(rows)))
    datasets = sorted({d for r in rows if r["zero_shot"] for d in r["zero_shot"]["datasets"]})
    ds_table = ""
    if datasets:
        ds_head = "".join(f"<th>{esc(d)}</th>" for d in datasets)
        ds_rows = "".join(f"<tr><td>{esc(r['name'])}</td><td>{r['zero_shot']['step']}</td>" + "".join(
            f"<td>{r['zero_shot']['datasets'][d]:.4f}</td>" if d in r["zero_shot"]["datasets"] else "<td>-</td>"
            for d in datasets) + "</tr>" for r in rows if r["zero_shot"])
        ds_table = (f"<h2>Zero-shot accuracy per dataset (median over prompts)</h2><table><tr><th>run</th>"
                    f"<th>step</th>{ds_head}</tr>{ds_rows}</table>")
    phases = "".join(f"<li><b>{esc(r['name'])}</b>: {esc(_label(r))}; inherited from "
                     + ", ".join(f"{esc(p['checkpoint'])} ({p['tokens_seen']:,} tokens, {p['flops']:.3g} FLOPs)"
                                 for p in r["phases"]) + "</li>" for r in rows if r["phases"])
    imgs = "".join(f'<h2>{esc(p.stem.replace("_", " "))}</h2><img alt="{esc(p.name)}" '
                   f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">' for p in images)
    flagged = [r["name"] for r in rows if r["flags"]]
    note = (f"<p class='warn'>Not compute-matched (total tokens seen or FLOPs more than "
            f"{MATCH_TOLERANCE:.0%} from the budget most runs share, {ref['tokens_seen']:,} tokens / "
            f"{ref['flops']:.3g} FLOPs): "
            f"{esc(', '.join(flagged))}</p>" if flagged else
            f"<p>All runs are compute-matched within {MATCH_TOLERANCE:.0%} (tokens seen and FLOPs).</p>")
    catch = "".join(f"<li>{esc(line)}</li>" for line in catch_up_lines(rows))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>archscale report</title><style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; margin-bottom: 1em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }} tr.flag td {{ background: #fde8e8; }}
.warn {{ color: #a00; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>archscale report</h1>
<p>Tokens seen, target tokens and FLOPs are totals over every phase (a run started from another
run's checkpoint inherits that run's cost; the inherited part is in parentheses). Held-out loss is
each run's own objective, so it compares runs of the same objective only. Zero-shot accuracy is
rank classification: accuracy per prompt, median over a dataset's prompts, mean over datasets.
A * after the step marks an unfinished run.</p>
{ys}
{note}
<table><tr>{head}</tr>{body}</table>
{ds_table}
{"<h2>Phases</h2><ul>" + phases + "</ul>" if phases else ""}
{"<h2>Adapted vs from scratch</h2><ul>" + catch + "</ul>" if catch else ""}
{imgs}
</body></html>
"""


def report(paths: list[str | Path], out: str | Path | None = None) -> dict:
    """Read the runs, write report.json, the PNGs and report.html into `out`; return the summary."""
    runs = find_runs(paths)
    rows = [read_run(r) for r in runs]
    ref = flag_unmatched(rows)
    catch_up(rows)
    if out is None:
        p = Path(paths[0])
        out = p / "report" if len(paths) == 1 and not (p / "config.yaml").is_file() else Path("report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = plot(rows, out)
    from .comparison import cell_table, pair_table
    from .report_page import cells_of, write_page

    cells = cells_of(rows, {r["run_dir"]: r["seed"] for r in rows})
    page, pair_rows, yardstick = None, [], ""
    if cells:
        page, png, pair_rows = write_page(cells, out, text_table(rows))
        images.insert(0, png)
        yardstick = cell_table(cells) + "\n\n" + pair_table(pair_rows)
    (out / "report.json").write_text(json.dumps({"reference": ref, "runs": rows, "cells": cells, "pairs": pair_rows},
                                                indent=1) + "\n")
    (out / "report.html").write_text(render_html(rows, images, ref, yardstick))
    return {"out": str(out), "rows": rows, "reference": ref, "images": [str(p) for p in images], "cells": cells,
            "pairs": pair_rows, "page": str(page) if page else None, "yardstick": yardstick}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale report", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="run directories, or a sweep directory holding them")
    p.add_argument("--out", default=None, help="output directory (default: SWEEP_DIR/report, or ./report)")
    a = p.parse_args(argv)
    if len(a.paths) == 1 and (Path(a.paths[0]) / "ladder.json").is_file():  # an `archscale ladder` output directory
        from .ladder.table import show

        return show(Path(a.paths[0]), a.out)
    try:
        res = report(a.paths, a.out)
    except (ckpt.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if res["yardstick"]:
        print(res["yardstick"] + "\n")
    print(text_table(res["rows"]))
    for line in catch_up_lines(res["rows"]):
        print(line)
    flagged = [r["name"] for r in res["rows"] if r["flags"]]
    if flagged:
        print(f"\nnot compute-matched (tokens seen / FLOPs more than {MATCH_TOLERANCE:.0%} from the budget most runs "
              f"share, {res['reference']['tokens_seen']:,} tokens / {res['reference']['flops']:.3g} FLOPs): "
              f"{', '.join(flagged)}")
    print(f"\n{Path(res['out']) / 'report.html'}" + (f"   {res['page']}" if res["page"] else ""))
    return 0
