"""The README's main job: a real comparison of architectures and objectives on one yardstick.

    archscale compare [--out runs/compare] [--cells cd:flm nd:plm ed:mlm] [--seeds 2]
                      [--budget tokens-seen=160000 | flops=F | target-tokens=N | steps=N]
                      [--match params|flops --match-to cd:flm] [--grid cells.yaml] [--set a.b=c ...]

Trains every cell (ARCH:OBJECTIVE[:key=value,...], see compare/cells.py, or a YAML grid) `--seeds`
times through the real trainer (DeepSpeed engine, checkpoints, held-out loss), seed i varying the
model init (seed) and the data order (data.seed) while the held-out split and the yardstick's
windows stay fixed. Every cell is scored on the common yardstick (train/eval/yardstick.py:
continuation loss in nats per token and bits per byte, zero-shot continuation choice) at its
eval steps and at the end. Prints the data source, one table (mean ± std over seeds; every
budget column; non-embedding and total parameters, the embedding's share, FLOPs per token), the
paired difference of every pair of cells with its 95% interval and whether it excludes zero, and
saves the mean curves with bands as a PNG, and every number as JSON. A run that already finished
in the output directory is read back, not retrained; an interrupted one resumes. Run
directories: OUT/LABEL/seed-I.

`--match params|flops` gives every cell of another family than the --match-to cell the shape
(d_model, n_heads, d_ff, n_layers) whose non-embedding parameters, or training FLOPs per token,
land within 5% of that cell's (compare/matching.py: the search), and prints each cell's gap; no
shape within 5% is a one-line refusal before anything trains.

The arguments are read once into a frozen CompareArgs, and what is decided per cell (matched
shape, schedule, counts, data source) into a frozen CellPlan; functions receive them and change
neither.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional

from ...trainer.wandb_log import grouping_overrides
from .cells import Cell, CellError, load_grid, parse_cell, unique_labels
from .matching import Match, MatchError  # noqa: F401  (MatchError, BudgetError, CellError: what callers catch)
from .sizing import BUDGETS, MATCHES, TOLERANCE, Budget, BudgetError, cell_facts, match_cell, schedule_overrides

DEFAULT_CELLS = ["cd:flm", "nd:plm", "ed:mlm"]


@dataclass(frozen=True)
class CompareArgs:
    """compare's command line with its grid file read in: built once (`parse_args`, or
    `from_namespace` for an argparse namespace) and handed to every function that needs a setting;
    none changes it. Defaults are the command line's."""

    cells: tuple[Cell, ...] = ()  # resolved from --cells or --grid (DEFAULT_CELLS when neither)
    out: str = "runs/compare"  # OUT/LABEL/seed-I run directories
    budget: Budget = Budget("tokens-seen", 160_000)  # --budget, else tokens-seen=--tokens
    match: Optional[str] = None  # --match (or the grid's match:): params | flops
    match_to: Optional[str] = None  # --match-to (or the grid's match_to:); None: the first cell
    grid_set: tuple[str, ...] = ()  # the grid's `set:`, after compare's settings
    set: tuple[str, ...] = ()  # --set, after the grid's
    seeds: int = 1
    size: str = "debug"
    seq_len: int = 128
    micro_batch: int = 8
    accumulation: int = 1
    lr: float = 3e-3
    eval_every: int = 40
    eval_batches: int = 4
    checkpoint_every: int = 100
    seed: int = 0
    wandb_group: str = ""  # logging.wandb.group of every run unless given; "" = OUT's name (a ladder: its OUT's)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "CompareArgs":
        """Read the grid file (if any), parse the cells and the budget (raises CellError, BudgetError)."""
        given = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
        grid = load_grid(ns.grid) if getattr(ns, "grid", None) else None
        if grid and getattr(ns, "cells", None):
            raise CellError("give cells with --cells or --grid, not both")
        cells = grid["cells"] if grid else [parse_cell(c) for c in (getattr(ns, "cells", None) or DEFAULT_CELLS)]
        unique_labels(cells)
        match = given.get("match") or (grid or {}).get("match")
        if match is not None and match not in MATCHES:
            raise CellError(f"grid {ns.grid}: match {match!r} must be one of {MATCHES}")
        budget = Budget.parse(ns.budget) if getattr(ns, "budget", None) else \
            Budget("tokens-seen", getattr(ns, "tokens", cls.budget.value))
        return cls(**{**given, "cells": tuple(cells), "budget": budget, "match": match,
                      "match_to": given.get("match_to") or (grid or {}).get("match_to"),
                      "grid_set": tuple(grid["set"]) if grid else (), "set": tuple(given.get("set") or ())})

    def match_kind(self, cell: Cell) -> Optional[str]:
        """What `cell` is matched on: its grid entry's own `match:` if given, else --match (None: keeps its shape)."""
        kind = cell.match if cell.match is not None else self.match
        return None if kind == "none" else kind

    def match_target(self) -> Cell:
        """The --match-to cell (label, ARCH:OBJECTIVE or its full spec; None: the first)."""
        for c in self.cells:
            if self.match_to in (None, c.label, c.spec, f"{c.arch}:{c.objective}"):
                return c
        raise CellError(f"--match-to {self.match_to!r} names no cell; use one of {[c.label for c in self.cells]}")


@dataclass(frozen=True)
class CellPlan:
    """What compare decides per cell label before anything trains (plan_cells)."""

    matched: Mapping[str, tuple[str, ...]]  # the model.overrides.* of the shape --match chose
    schedules: Mapping[str, tuple[str, ...]]  # the schedule overrides that give the budget
    matches: Mapping[str, Match]  # --match: every cell's matched quantity against the named cell's
    facts: Mapping[str, dict]  # cell_facts as planned (parameters, FLOPs per token and per step)
    data: Mapping[str, str]  # the data source, in words


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


def base_overrides(cell: Cell | str, args: CompareArgs, extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """compare's settings for a cell (its lengths per objective), then `extra` (the budget's
    schedule, the matched shape), then the grid's and --set overrides, then the cell's own: the
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
    return out + list(extra) + list(args.grid_set) + list(args.set) + list(cell.overrides)


def cell_overrides(cell: Cell | str, args: CompareArgs, seed_index: int = 0, data_seed: int = 1234,
                   plan: Optional[CellPlan] = None) -> list[str]:
    """Every override of one run of a cell: its settings, matched shape, budget and seed, and its
    run directory. Without a `plan` (a caller of this function alone) the budget must need no
    probe of the cell (tokens-seen, steps) and the cell keeps its shape."""
    cell = parse_cell(cell) if isinstance(cell, str) else cell
    schedule = plan.schedules[cell.label] if plan else tuple(schedule_overrides(args.budget, None))
    matched = plan.matched.get(cell.label, ()) if plan else ()
    ov = base_overrides(cell, args, schedule + matched)
    if cell.overrides:  # the cell's own overrides come last; fill in their {out} and {seed}
        ov[-len(cell.overrides):] = [o.replace("{out}", str(args.out)).replace("{seed}", str(seed_index))
                                     for o in cell.overrides]
    # W&B (if on): one group per comparison, a run named by its directory; any later group wins
    group = grouping_overrides(args.wandb_group or Path(args.out).absolute().name, f"{cell.label}/seed-{seed_index}")
    return group + ov + [f"seed={args.seed + seed_index}", f"data.seed={data_seed + seed_index}",
                         f"run_dir={Path(args.out) / cell.label / f'seed-{seed_index}'}"]


def parse_args(argv) -> CompareArgs:
    """The command line (and its grid file) as a CompareArgs; raises CellError or BudgetError on a
    bad cell, grid or budget (argparse's own errors exit as usual)."""
    d = CompareArgs()
    p = argparse.ArgumentParser(prog="archscale compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--out", default=d.out, help="directory holding OUT/LABEL/seed-I run directories")
    p.add_argument("--cells", nargs="+", default=None,
                   help=f"ARCH:OBJECTIVE[:key=value,...] cells (default: {' '.join(DEFAULT_CELLS)})")
    p.add_argument("--grid", default=None, help="a YAML grid of cells instead of --cells (compare/cells.py)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="runs per cell, seed i varying init and data order")
    p.add_argument("--budget", default=None, metavar="KIND=VALUE",
                   help=f"the compute every cell gets, KIND in {', '.join(BUDGETS)} (default: tokens-seen=--tokens)")
    p.add_argument("--tokens", type=int, default=int(d.budget.value), help="tokens seen per cell when no --budget is given")
    p.add_argument("--match", choices=MATCHES, default=None,
                   help="size every cell of another family than the --match-to cell (d_model, n_heads, d_ff, "
                        "n_layers; compare/matching.py) to its non-embedding parameters or training FLOPs per "
                        "token, within 5%%")
    p.add_argument("--match-to", default=None, help="the cell (label or ARCH:OBJECTIVE) to match (default: the first)")
    p.add_argument("--size", default=d.size, help="model size for every cell (model_zoo.SIZES)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per row (MLM: inputs + targets)")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="rows per micro-batch")
    p.add_argument("--accumulation", type=int, default=d.accumulation, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (cosine schedule, 5 warm-up steps)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="steps between evaluations (held-out loss, yardstick)")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="held-out batches for the own-objective loss")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the first run of each cell (then +1 per seed)")
    p.add_argument("--set", nargs="*", default=[], metavar="a.b=c", help="more overrides for every cell")
    ns = p.parse_args(argv)
    if ns.seeds < 1:
        p.error(f"--seeds {ns.seeds} must be >= 1")
    return CompareArgs.from_namespace(ns)


def data_source(data) -> str:
    """A cell's data source in words (its `data` section)."""
    if data.source == "files":
        files = data.train_files
        return f"files {', '.join(files[:2])}" + (f" (+{len(files) - 2} more)" if len(files) > 2 else "")
    if data.source == "hub":
        return f"hub {data.hub_name}" + (f" ({data.hub_config})" if data.hub_config else "")
    return "the embedded corpus (this Python installation's sources and docs)"


def plan_cells(args: CompareArgs) -> CellPlan:
    """--match's shapes, the budget's schedules, each cell's facts and data source. Raises
    CellError, BudgetError or MatchError (one line each) before anything trains."""
    from ...config import load_config

    base = lambda c, extra=(): load_config(None, base_overrides(c, args, extra))  # noqa: E731
    matched, matches = {}, {}
    kinds = {c.label: args.match_kind(c) for c in args.cells}
    if any(kinds.values()):
        reference = base(args.match_target())
        for c in (c for c in args.cells if kinds[c.label]):
            cfg = base(c)
            m = match_cell(kinds[c.label], reference, cfg, name=f"cell {c.label}")
            matches[c.label] = m
            if m.searched:  # a cell of another family: the searched shape (the user's own values stay)
                matched[c.label] = tuple(f"model.overrides.{k}={v}" for k, v in m.shape.overrides().items()
                                         if k not in cfg.model.overrides)
    schedules, facts, data = {}, {}, {}
    for c in args.cells:
        cfg = base(c, matched.get(c.label, ()))
        schedules[c.label] = tuple(schedule_overrides(args.budget, cfg))
        facts[c.label] = cell_facts(cfg)
        data[c.label] = data_source(cfg.data)
    freeze = MappingProxyType
    return CellPlan(freeze(matched), freeze(schedules), freeze(matches), freeze(facts), freeze(data))


def run_record(cell: Cell, seed_index: int, cfg, result: dict, facts: dict) -> dict:
    """One run's line of the comparison (comparison.py's run record); `facts`: the cell's
    cell_facts (the analytic counts the seeds share)."""
    flat = result.get("yardsticks", [])[-1] if result.get("yardsticks") else {}
    return {"run_dir": str(cfg.run_dir), "seed": seed_index, "params": result["params"],
            "non_embedding_params": facts["non_embedding_params"],
            "flops_per_token": facts["flops_per_token"], "step": result["step"],
            "tokens_seen": result["tokens_seen"], "target_tokens": result["target_tokens"], "flops": result["flops"],
            "eval_loss": result["eval_loss"], "tokens_per_s": result["tokens_per_s"],
            "planned_flops_per_step": result["planned_flops_per_step"],
            **{k: flat.get(k) for k in ("yardstick_nats", "yardstick_bpb", "zero_shot_acc", "zero_shot_se")},
            "fingerprint": (result.get("yardstick") or {}).get("fingerprint"),
            "per_window": (result.get("yardstick") or {}).get("per_window"),
            "curve": result.get("yardsticks", []), "losses": result.get("losses", []),
            "eval_losses": result.get("eval_losses", [])}


def plan_runs(args: CompareArgs, world_size: int = 1, plan: Optional[CellPlan] = None) -> tuple[list[Cell], dict]:
    """The cells and every run's (overrides, config), each checked for a world of `world_size`
    before any run trains (`plan`: plan_cells(args), made here if not given). Raises CellError,
    BudgetError, MatchError, or ValueError naming the cell."""
    from ...config import ConfigError, load_config
    from ...trainer.loop import check
    from .sizing import check_budget

    plan = plan or plan_cells(args)
    runs = {}
    for c in args.cells:
        data_seed = load_config(None, base_overrides(c, args)).data.seed
        for i in range(args.seeds):
            ov = cell_overrides(c, args, i, data_seed, plan)
            try:
                cfg = load_config(None, ov)
                check(cfg, world_size)
                check_budget(args.budget, cfg, world_size)  # on the run's own stream, before anything trains
            except (ConfigError, ValueError) as e:
                raise ValueError(f"cell {c.spec!r}: {e}") from None
            runs[(c.label, i)] = (ov, cfg)
    return list(args.cells), runs


def cell_summary(c: Cell, args: CompareArgs, plan: CellPlan, runs: list[dict]) -> dict:
    """One cell of comparison.json: its runs, the overrides compare gave it, its data source and
    (--match) its matched quantity against the named cell's."""
    m = plan.matches.get(c.label)
    match = None if m is None else {"kind": m.kind, "to": args.match_target().label, "value": m.value,
                                     "target": m.target, "gap": m.gap, "shape": m.shape.overrides(),
                                     "searched": m.searched}
    return {"label": c.label, "name": c.name, "spec": c.spec, "arch": c.arch, "objective": c.objective,
            "overrides": list(plan.matched.get(c.label, ())) + list(c.overrides), "data": plan.data[c.label],
            "match": match, "runs": runs}


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        plan = plan_cells(args)
        cells, runs = plan_runs(args, plan=plan)  # compare trains each run in this process: a world of one
    except ValueError as e:  # CellError, BudgetError, MatchError, a config error naming its cell
        print(f"error: {e}", file=sys.stderr)
        return 2
    configs = {k: cfg for k, (_, cfg) in runs.items()}
    summary = []
    for c in cells:
        records = []
        for i in range(args.seeds):
            result = train_or_read(configs[(c.label, i)], f"{c.name} seed {i}")
            if result is None:
                print(f"stopped by a signal during {c.name} seed {i}; run the same command again to resume",
                      file=sys.stderr)
                return 1
            records.append(run_record(c, i, configs[(c.label, i)], result, plan.facts[c.label]))
        summary.append(cell_summary(c, args, plan, records))
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


def print_summary(summary: list[dict], args: CompareArgs) -> None:
    from ..comparison import budget_lines, cell_table, match_lines, pair_table, pairs, plot_curves, resolved_lines

    out = Path(args.out)
    pair_rows = pairs(summary)
    sources = {s["data"] for s in summary}
    data = sources.pop() if len(sources) == 1 else "; ".join(f"{s['label']}: {s['data']}" for s in summary)
    print()
    print(f"Budget for every cell: {args.budget.text()}; size {args.size}; {args.seeds} seed(s) per cell; "
          f"data: {data}.")
    for line in match_lines(summary):
        print(line)
    print("Yardstick: the same held-out windows for every cell (eval.window_tokens tokens cut at "
          "eval.prefix_fractions); continuation loss in nats/token and bits/byte, continuation choice "
          "accuracy (chance 1/eval.choices); mean ± std over seeds. MLM cells are scored the T5 way "
          "(docs/evaluation.md): their known handicap before adaptation.")
    print(cell_table(summary))
    for line in budget_lines(summary, args.budget.kind, args.budget.value, tolerance=TOLERANCE):
        print(line)
    print()
    print("Pairwise differences (paired by seed; 95% t interval):")
    print(pair_table(pair_rows))
    for line in resolved_lines(pair_rows):
        print(line)
    plot_curves(summary, out / "curves.png")
    doc = {"budget": {"kind": args.budget.kind, "value": args.budget.value}, "seeds": args.seeds,
           "size": args.size, "match": args.match, "match_to": args.match_to, "cells": summary, "pairs": pair_rows}
    (out / "comparison.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\ncurves: {out / 'curves.png'}   every number: {out / 'comparison.json'}")
