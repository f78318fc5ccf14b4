"""The README's main job: a real comparison of architectures and objectives on one yardstick.

    archscale compare [--out runs/compare] [--cells cd:flm nd:plm ed:mlm] [--seeds 2]
                      [--budget tokens-seen=160000 | flops=F | target-tokens=N | steps=N]
                      [--match params|flops --match-to cd:flm] [--grid cells.yaml] [--set a.b=c ...]

Trains every cell (ARCH:OBJECTIVE[:key=value,...], see compare/cells.py, or a YAML grid) `--seeds`
times through the real trainer (DeepSpeed engine, checkpoints, held-out loss), seed i varying the
model init (seed) and the data order (data.seed) while the held-out split and the yardstick's
windows stay fixed. Every cell is scored on the common yardstick (train/eval/yardstick.py:
continuation loss in nats per token and bits per byte, zero-shot continuation choice) at its
eval steps and at the end. Prints one table (mean ± std over seeds; every budget column;
parameters and FLOPs per token), the paired difference of every pair of cells with its 95%
interval and whether it excludes zero, and saves the mean curves with bands as a PNG, and every
number as JSON. A run that already finished in the output directory is read back, not
retrained; an interrupted one resumes. Run directories: OUT/LABEL/seed-I.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cells import Cell, CellError, load_grid, parse_cell, unique_labels
from .sizing import BUDGETS, MATCHES, Budget, BudgetError, cell_facts, match_depth, schedule_overrides

DEFAULT_CELLS = ["cd:flm", "nd:plm", "ed:mlm"]
DEPTH_KEY = "model.overrides.n_layers"  # the depth --match sets (per stack for an encoder-decoder)


def mlm_lengths(total: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(inputs_length, targets_length) of span corruption whose sum is at most `total` tokens
    (the reference's 512 + 114 = 626 is this for 626), computed with T5's random_spans_helper."""
    from ...objectives.span_corruption import random_spans_helper

    best = None
    for inputs in range(8, total):
        _, targets = random_spans_helper(inputs, noise_density, mean_span)
        if inputs + targets <= total:
            best = (inputs, targets)
    if best is None:
        raise ValueError(f"--seq-len {total} is too short for span corruption; use at least 16")
    return best


def base_overrides(cell: Cell | str, args, extra: list[str] = ()) -> list[str]:
    """compare's settings for a cell (its lengths per objective), then `extra` (the budget's
    schedule, the matched depth), then the grid's and --set overrides, then the cell's own: the
    later wins, and the table shows what each cell ran."""
    cell = parse_cell(cell) if isinstance(cell, str) else cell
    out = [f"model.arch={cell.arch}", f"model.size={args.size}", f"objective.name={cell.objective}",
           f"objective.seq_length={args.seq_len}", f"parallel.micro_batch_size={args.micro_batch}",
           f"parallel.gradient_accumulation_steps={args.accumulation}", f"optim.lr={args.lr}",
           "schedule.name=cosine", "schedule.warmup_steps=5", f"eval.every_n_steps={args.eval_every}",
           f"eval.num_batches={args.eval_batches}", f"checkpoint.every_n_steps={args.checkpoint_every}",
           "logging.every_n_steps=5"]
    if cell.objective in ("mlm", "ul2"):
        inputs, targets = mlm_lengths(args.seq_len)
        # decoders read rows of inputs + targets (the encoder-decoder ignores seq_length here)
        out[3] = f"objective.seq_length={inputs + targets}"
        out += [f"objective.inputs_length={inputs}", f"objective.targets_length={targets}"]
    return out + list(extra) + list(getattr(args, "grid_set", [])) + list(args.set) + list(cell.overrides)


def cell_overrides(cell: Cell | str, args, seed_index: int = 0, data_seed: int = 1234) -> list[str]:
    """Every override of one run of a cell: its settings, budget and seed, and its run directory."""
    cell = parse_cell(cell) if isinstance(cell, str) else cell
    budget = getattr(args, "budget_obj", None) or Budget("tokens-seen", args.tokens)
    schedule = getattr(args, "schedules", {}).get(cell.label)
    if schedule is None:  # plan_cells did not run (a caller of this function alone): no probe needed
        schedule = schedule_overrides(budget, None)
    ov = base_overrides(cell, args, schedule + list(getattr(args, "matched", {}).get(cell.label, [])))
    if cell.overrides:  # the cell's own overrides come last; fill in their {out} and {seed}
        ov[-len(cell.overrides):] = [o.replace("{out}", str(args.out)).replace("{seed}", str(seed_index))
                                     for o in cell.overrides]
    return ov + [f"seed={args.seed + seed_index}", f"data.seed={data_seed + seed_index}",
                 f"run_dir={Path(args.out) / cell.label / f'seed-{seed_index}'}"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="archscale compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--out", default="runs/compare", help="directory holding OUT/LABEL/seed-I run directories")
    p.add_argument("--cells", nargs="+", default=None,
                   help=f"ARCH:OBJECTIVE[:key=value,...] cells (default: {' '.join(DEFAULT_CELLS)})")
    p.add_argument("--grid", default=None, help="a YAML grid of cells instead of --cells (compare/cells.py)")
    p.add_argument("--seeds", type=int, default=1, help="runs per cell, seed i varying init and data order")
    p.add_argument("--budget", default=None, metavar="KIND=VALUE",
                   help=f"the compute every cell gets, KIND in {', '.join(BUDGETS)} (default: tokens-seen=--tokens)")
    p.add_argument("--tokens", type=int, default=160_000, help="tokens seen per cell when no --budget is given")
    p.add_argument("--match", choices=MATCHES, default=None,
                   help="size the cells of another family (their depth) to the --match-to cell's parameters or "
                        "training FLOPs per token")
    p.add_argument("--match-to", default=None, help="the cell (label or ARCH:OBJECTIVE) to match (default: the first)")
    p.add_argument("--size", default="debug", help="model size for every cell (model_zoo.SIZES)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (MLM: inputs + targets)")
    p.add_argument("--micro-batch", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine schedule, 5 warm-up steps)")
    p.add_argument("--eval-every", type=int, default=40, help="steps between evaluations (held-out loss, yardstick)")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches for the own-objective loss")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed of the first run of each cell (then +1 per seed)")
    p.add_argument("--set", nargs="*", default=[], metavar="a.b=c", help="more overrides for every cell")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds} must be >= 1")
    return args


def resolve_cells(args) -> list[Cell]:
    """The cells, the budget and the matching of the command line / grid (raises CellError, BudgetError)."""
    args.grid_set = []
    if args.grid and args.cells:
        raise CellError("give cells with --cells or --grid, not both")
    if args.grid:
        grid = load_grid(args.grid)
        cells, args.grid_set = grid["cells"], grid["set"]
        args.match = args.match or grid["match"]
        args.match_to = args.match_to or grid["match_to"]
        if args.match is not None and args.match not in MATCHES:
            raise CellError(f"grid {args.grid}: match {args.match!r} must be one of {MATCHES}")
    else:
        cells = [parse_cell(c) for c in (args.cells or DEFAULT_CELLS)]
    unique_labels(cells)
    args.budget_obj = Budget.parse(args.budget) if args.budget else Budget("tokens-seen", args.tokens)
    return cells


def plan_cells(cells: list[Cell], args) -> None:
    """--match (depths) and the budget's schedules, into args.matched / args.schedules."""
    from ... import registry
    from ...config import load_config

    args.matched, args.schedules = {}, {}
    base = lambda c, extra=(): load_config(None, base_overrides(c, args, list(extra)))  # noqa: E731
    if args.match:
        target = next((c for c in cells if args.match_to in (None, c.label, c.spec, f"{c.arch}:{c.objective}")), None)
        if target is None:
            raise CellError(f"--match-to {args.match_to!r} names no cell; use one of {[c.label for c in cells]}")
        facts = cell_facts(base(target))
        spec = registry.get(target.arch)
        for c in cells:
            if not registry.get(c.arch).same_family(spec):
                n, _ = match_depth(args.match, facts, lambda n, c=c: base(c, [f"{DEPTH_KEY}={n}"]))
                args.matched[c.label] = [f"{DEPTH_KEY}={n}"]
    b = args.budget_obj
    for c in cells:
        cfg = base(c, args.matched.get(c.label, []))
        args.schedules[c.label] = schedule_overrides(b, cfg)


def run_record(cell: Cell, seed_index: int, cfg, result: dict, flops_per_token: float) -> dict:
    """One run's line of the comparison (comparison.py's run record)."""
    flat = result.get("yardsticks", [])[-1] if result.get("yardsticks") else {}
    return {"run_dir": str(cfg.run_dir), "seed": seed_index, "params": result["params"],
            "flops_per_token": flops_per_token, "step": result["step"],
            "tokens_seen": result["tokens_seen"], "target_tokens": result["target_tokens"], "flops": result["flops"],
            "eval_loss": result["eval_loss"], "tokens_per_s": result["tokens_per_s"],
            "planned_flops_per_step": result["planned_flops_per_step"],
            **{k: flat.get(k) for k in ("yardstick_nats", "yardstick_bpb", "zero_shot_acc", "zero_shot_se")},
            "fingerprint": (result.get("yardstick") or {}).get("fingerprint"),
            "per_window": (result.get("yardstick") or {}).get("per_window"),
            "curve": result.get("yardsticks", []), "losses": result.get("losses", []),
            "eval_losses": result.get("eval_losses", [])}


def plan_runs(args, world_size: int = 1) -> tuple[list[Cell], dict]:
    """The cells and every run's (overrides, config), each checked for a world of `world_size`
    before any run trains. Raises CellError, BudgetError, or ValueError naming the cell."""
    from ...config import ConfigError, load_config
    from ...trainer.loop import check

    cells = resolve_cells(args)
    plan_cells(cells, args)
    data_seeds = {c.label: load_config(None, base_overrides(c, args)).data.seed for c in cells}
    runs = {}
    for c in cells:
        for i in range(args.seeds):
            ov = cell_overrides(c, args, i, data_seeds[c.label])
            try:
                cfg = load_config(None, ov)
                check(cfg, world_size)
            except (ConfigError, ValueError) as e:
                raise ValueError(f"cell {c.spec!r}: {e}") from None
            runs[(c.label, i)] = (ov, cfg)
    return cells, runs


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cells, runs = plan_runs(args)  # compare trains each run in this process: a world of one
    except ValueError as e:  # CellError, BudgetError, a config error naming its cell
        print(f"error: {e}", file=sys.stderr)
        return 2
    configs = {k: cfg for k, (_, cfg) in runs.items()}
    summary = []
    for c in cells:
        runs = []
        per_token = cell_facts(configs[(c.label, 0)])["flops_per_token"]  # the seeds share the model and objective
        for i in range(args.seeds):
            result = train_or_read(configs[(c.label, i)], f"{c.name} seed {i}")
            if result is None:
                print(f"stopped by a signal during {c.name} seed {i}; run the same command again to resume",
                      file=sys.stderr)
                return 1
            runs.append(run_record(c, i, configs[(c.label, i)], result, per_token))
        summary.append({"label": c.label, "name": c.name, "spec": c.spec, "arch": c.arch, "objective": c.objective,
                        "overrides": args.matched.get(c.label, []) + c.overrides, "runs": runs})
    print_summary(summary, args)
    return 0


def train_or_read(cfg, desc: str):
    """The RunResult dict of a finished run directory, or of training it now (None: stopped)."""
    from ...trainer.loop import train

    done = Path(cfg.run_dir) / "result.json"
    if done.exists() and (Path(cfg.run_dir) / "FINISHED").exists():
        return json.loads(done.read_text())
    r = train(cfg, desc=desc)
    if r.stopped_by:
        return None
    rec = dict(vars(r))
    done.write_text(json.dumps(rec) + "\n")
    return rec


def print_summary(summary: list[dict], args) -> None:
    from ..comparison import budget_lines, cell_table, pair_table, pairs, plot_curves, resolved_lines

    out = Path(args.out)
    pair_rows = pairs(summary)
    matched = f"; --match {args.match} to {args.match_to or summary[0]['label']}: " + ", ".join(
        f"{s['label']} {' '.join(s['overrides'][:1])}" for s in summary if s["overrides"]) if args.match else ""
    print()
    print(f"Budget for every cell: {args.budget_obj.text()}; size {args.size}; {args.seeds} seed(s) per cell; "
          f"embedded corpus{matched}.")
    print("Yardstick: the same held-out windows for every cell (eval.window_tokens tokens cut at "
          "eval.prefix_fractions); continuation loss in nats/token and bits/byte, continuation choice "
          "accuracy (chance 1/eval.choices); mean ± std over seeds. MLM cells are scored the T5 way "
          "(docs/evaluation.md): their known handicap before adaptation.")
    print(cell_table(summary))
    for line in budget_lines(summary, args.budget_obj.kind, args.budget_obj.value):
        print(line)
    print()
    print("Pairwise differences (paired by seed; 95% t interval):")
    print(pair_table(pair_rows))
    for line in resolved_lines(pair_rows):
        print(line)
    plot_curves(summary, out / "curves.png")
    doc = {"budget": {"kind": args.budget_obj.kind, "value": args.budget_obj.value}, "seeds": args.seeds,
           "size": args.size, "match": args.match, "match_to": args.match_to, "cells": summary, "pairs": pair_rows}
    (out / "comparison.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\ncurves: {out / 'curves.png'}   every number: {out / 'comparison.json'}")
