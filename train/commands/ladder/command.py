"""`archscale ladder`: scaling ladders per cell, fitted and judged at a target scale (issue 29).

    archscale ladder [--cells cd:flm,nd:plm,ed:mlm] [--sizes 32x1,32x2,64x2,64x4] [--budgets 10,20,40]
                     [--seeds 2] [--decay-fraction 0.2] [--match params|flops] [--target N=4.8e9,D=1.68e11]
                     [--out runs/ladder] [--submit [--dry-run] ...]

For each cell x rung x seed: one stable warmup-stable-decay run (schedule.name=wsd, never
decaying) with a checkpoint kept at every branch point, then one decay branch per budget that
resumes it (ladder/plan.py: the arithmetic; docs/ladder.md). Rungs are matched across cells by
non-embedding parameters or training FLOPs per token (compare's --match, against the first cell);
budgets are tokens per non-embedding parameter (or tokens, --budget-unit tokens). Runs train here,
one after another (a finished run is read back, an interrupted one resumes), or with --submit as
Slurm jobs, each branch afterok its stable run, after the planner's GPU-hours per rung and in total.
The same command without --submit then fits and judges the finished runs.

Each finished branch is one point: N (non-embedding parameters), D (tokens seen), C (FLOPs
counted) and the common yardstick's continuation loss (nats/token) at its last step, all read from
the branch's metrics.jsonl. Written to OUT: ladder.json (every point and run directory), then,
where the fit accepts the ladder, per-cell Chinchilla fits with 95% intervals, rollout CV, verdicts
at --target (ED at its own reference size's parameter count), loss_vs_flops.png, isoflop.png and
ladder.md (command, machine, date, every number). A ladder the fit refuses (fewer than --min-rungs
rungs, one seed, ...) is one line and exit 2, after ladder.json is written.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

from ..cluster_args import add_submit_group
from ..compare import DEFAULT_CELLS
from ..compare.cells import parse_cell, unique_labels
from .plan import BUDGET_UNITS, LadderArgs, LadderRun, Rung, RungPlan, check_runs, plan_ladder
from .points import LadderError, LadderPoint

DEFAULT_SIZES = "32x1,32x2,64x2,64x4"
DEFAULT_TARGET = "N=4.8e9,D=1.68e11"
DECODER_REFERENCE_SIZE = "4.8b"  # the size the default target's N stands for (shared/SCIENCE.md)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archscale ladder", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--cells", default=None,
                   help="ARCH:OBJECTIVE[:key=value,...] cells, comma-separated (compare's syntax); the first is the match "
                        f"reference (default {','.join(DEFAULT_CELLS)})")
    p.add_argument("--claim", default=None, metavar="NAME",
                   help="instead of --cells: the cells of `archscale reproduce NAME` (su-gpt-vs-unilm, su-ed-params, "
                        "...), judged by that claim's own rule on the predicted differences at --target "
                        "(ladder/claims.py)")
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help="rungs: model_zoo sizes or WIDTHxDEPTH (d_model x n_layers, d_ff = 2 d_model), comma-separated; "
                        "at least --min-rungs (3) for a fit")
    p.add_argument("--budgets", default="10,20,40",
                   help="token budgets of every rung, comma-separated: tokens per non-embedding parameter (of the "
                        "rung's first cell), or tokens with --budget-unit tokens")
    p.add_argument("--budget-unit", choices=BUDGET_UNITS, default="per-param", help="what --budgets counts")
    p.add_argument("--seeds", type=int, default=2, help="stable runs per cell and rung (seed i varies init and data order)")
    p.add_argument("--decay-fraction", type=float, default=0.2,
                   help="the share of a branch's steps spent decaying (schedule.decay_fraction)")
    p.add_argument("--match", choices=("params", "flops"), default="params",
                   help="what a rung matches across cells: non-embedding parameters or training FLOPs per token")
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help="where to judge: N=..,D=..[,N[CELL]=..]; the default judges a cell whose architecture's "
                        "reference size is not 4.8b (ED) at that size's non-embedding parameters")
    p.add_argument("--min-rungs", type=int, default=3, help="rungs a cell needs before it is fitted")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--starts", type=int, default=None,
                   help="L-BFGS-B starts of each fit: the best-scoring of the 4^5 grid (default: all 1024; "
                        "each bootstrap refit starts from the point fit)")
    p.add_argument("--out", default="runs/ladder", help="run directories OUT/RUNG/CELL/seed-I/{stable,decay-D}")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (MLM: inputs + targets)")
    p.add_argument("--micro-batch", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (5 warm-up steps)")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between evaluations (and always at the end)")
    p.add_argument("--checkpoint-every", type=int, default=1000,
                   help="steps between checkpoints (a preempted job resumes from one), besides the branch points")
    p.add_argument("--seed", type=int, default=0, help="seed of each cell's first run (then +1 per seed)")
    p.add_argument("--set", nargs="*", default=[], metavar="a.b=c", help="more overrides for every run")
    add_submit_group(p, "submit every run to Slurm (one job each, a branch afterok its stable run) instead of "
                        "training here; then run the same command without --submit to fit and judge")
    return p


def parse_args(argv) -> tuple[argparse.Namespace, LadderArgs]:
    """The namespace and the frozen LadderArgs; raises LadderError / CellError on a bad value."""
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.seeds < 1 or ns.min_rungs < 2:
        p.error("--seeds must be >= 1 and --min-rungs >= 2")
    if ns.dry_run and not ns.submit:
        p.error("--dry-run prints what --submit would submit: give both")
    if ns.claim and ns.cells:
        p.error("give --claim (the claim's own cells) or --cells, not both")
    if ns.claim:
        from .claims import claim_cells, claim_of

        cells = claim_cells(claim_of(ns.claim))
    else:  # a comma starts a new cell only before ARCH:OBJECTIVE (a cell's own key=value,... stay with it)
        text = ns.cells or ",".join(DEFAULT_CELLS)
        cells = tuple(parse_cell(c) for c in re.split(r",(?=\w+:\w+(?::|,|$))", text) if c.strip())
    unique_labels(list(cells))
    try:
        budgets = tuple(float(b) for b in ns.budgets.split(",") if b.strip())
    except ValueError:
        raise LadderError(f"--budgets {ns.budgets!r} is not a comma-separated list of numbers (e.g. 10,20,40)") from None
    rungs = tuple(Rung.parse(s) for s in ns.sizes.split(",") if s.strip())
    args = LadderArgs(cells=cells, rungs=rungs, budgets=budgets, budget_unit=ns.budget_unit, seeds=ns.seeds,
                      decay_fraction=ns.decay_fraction, match=ns.match, out=ns.out, seq_len=ns.seq_len,
                      micro_batch=ns.micro_batch, accumulation=ns.accumulation, lr=ns.lr,
                      eval_every=ns.eval_every, checkpoint_every=ns.checkpoint_every, seed=ns.seed,
                      set=tuple(ns.set))
    return ns, args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        ns, args = parse_args(argv)
        world = ns.nodes * (ns.gpus_per_node or 1) if ns.submit else 1  # one task per GPU; CPU jobs: one per node
        plans = plan_ladder(args, world)
        print_plan(plans, args)
        if ns.submit:
            from .submit import submit_ladder

            return submit_ladder(ns, args, plans)
        check_runs(plans)
    except ValueError as e:  # LadderError, CellError, MatchError, BudgetError: one line each
        print(f"error: {e}", file=sys.stderr)
        return 2
    for run in (r for p in plans for r in p.runs):
        if not train_run(run):
            print(f"stopped by a signal during {run.run_dir}; run the same command again to resume", file=sys.stderr)
            return 1
    return judge_ladder(ns, args, plans, "archscale ladder " + " ".join(argv))


def print_plan(plans: list[RungPlan], args: LadderArgs) -> None:
    """Each rung's matched cells (non-embedding parameters, gap), budgets and steps."""
    print(f"ladder: {len(args.cells)} cell(s) x {len(plans)} rung(s) x {len(args.budgets)} budget(s) x {args.seeds} "
          f"seed(s); wsd decay fraction {args.decay_fraction}; rungs matched by {args.match} to "
          f"{args.cells[0].name}")
    for p in plans:
        print(f"rung {p.rung.label}: tokens {', '.join(f'{d:,.0f}' for d in p.tokens)}")
        for c in args.cells:
            m, facts = p.matches.get(c.label), p.facts[c.label]
            branches = [r for r in p.runs if r.cell == c.label and r.seed == 0 and r.budget is not None]
            print(f"  {c.name}: N={facts['non_embedding_params']:,}" + (f" ({m.gap:+.1%})" if m else "")
                  + f", steps {', '.join(f'{r.steps} (branch at {r.branch_step})' for r in branches)}")


def train_run(run: LadderRun) -> bool:
    """Train one run here (compare's train_or_read); False: stopped. A finished run (RUN/FINISHED,
    e.g. a --submit job's, which has no result.json) is left as it is: its points are read from
    its metrics.jsonl, and starting it again would only evaluate it once more."""
    from ...config import load_config
    from ..compare import train_or_read

    if (Path(run.run_dir) / "FINISHED").exists():
        return True

    what = "stable" if run.budget is None else f"decay {run.budget:,.0f}"
    return train_or_read(load_config(None, list(run.overrides)), f"{run.name} {run.rung} seed {run.seed} {what}") is not None


def read_point(run: LadderRun) -> dict | None:
    """A finished branch's point (N, D, C, loss and where they came from), None if unfinished:
    D, C and the loss from the last evaluation line of RUN/metrics.jsonl at the run's last step."""
    path = Path(run.run_dir) / "metrics.jsonl"
    if not (Path(run.run_dir) / "FINISHED").exists() or not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("yardstick_nats") is not None and rec.get("step") == run.steps:
            last = rec
    if last is None:
        return None
    return {"cell": run.name, "seed": run.seed, "rung": run.rung, "N": run.non_embedding_params,
            "D": last["tokens_seen"], "C": last["flops"], "loss": last["yardstick_nats"], "budget": run.budget,
            "step": run.steps, "branch_step": run.branch_step, "run_dir": run.run_dir, "parent": run.parent}


def write_points(plans: list[RungPlan], args: LadderArgs) -> tuple[list[dict], list[str]]:
    """OUT/ladder.json: every run (directory, parent, steps) and every finished branch's point;
    returns (points, unfinished branch directories)."""
    runs = [r for p in plans for r in p.runs]
    points, missing = [], []
    for r in (r for r in runs if r.budget is not None):
        pt = read_point(r)
        (points.append(pt) if pt else missing.append(r.run_dir))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"cells": [c.name for c in args.cells], "rungs": [p.rung.label for p in plans],
           "budgets": list(args.budgets), "budget_unit": args.budget_unit, "seeds": args.seeds,
           "decay_fraction": args.decay_fraction, "match": args.match, "points": points,
           "runs": [{"cell": r.name, "rung": r.rung, "seed": r.seed, "budget": r.budget, "steps": r.steps,
                     "branch_step": r.branch_step, "run_dir": r.run_dir, "parent": r.parent} for r in runs]}
    (out / "ladder.json").write_text(json.dumps(doc, indent=1) + "\n")
    return points, missing


def target_of(text: str, args: LadderArgs, plans: list[RungPlan] = (), claim: str | None = None):
    """--target as a Target. With --claim, every cell it does not name sits at its matched ratio
    (claims.claim_target); else the default judges each cell whose registry entry's reference size
    is not DECODER_REFERENCE_SIZE (ED: 11b) at that size's non-embedding parameters."""
    from ... import registry
    from ...config import load_config
    from .verdicts import Target

    target = Target.parse(text)
    if claim:
        from .claims import claim_target

        return claim_target(target, plans, args.cells)
    if text != DEFAULT_TARGET:
        return target
    per = []
    for c in args.cells:
        entry = registry.get(c.arch)
        if entry.reference_size and entry.reference_size != DECODER_REFERENCE_SIZE:
            cfg = load_config(None, [f"model.arch={c.arch}", f"model.size={entry.reference_size}"])
            mc = entry.make_config(cfg.model, 32128)  # non-embedding parameters do not depend on the vocabulary
            per.append((c.name, float(entry.num_params(mc, embeddings=False))))
    return Target(target.N, target.D, tuple(per))


def baselines_line(points: list[dict]) -> str:
    """The n-gram baselines (train/eval/baselines.py) on the yardstick windows of the first point's
    run, in words: what the token statistics alone score, beside the cells' losses."""
    from ...config import load_config
    from ...data import prepare
    from ...eval.baselines import ngram_baselines
    from ...eval.yardstick import build_yardstick

    try:  # a help to the reader, never a reason to lose the fitted page
        cfg = load_config(Path(points[0]["run_dir"]) / "config.yaml")
        prepared = prepare(cfg.data, None)
        ys = build_yardstick(prepared, cfg.eval, cfg.data)
        b = ngram_baselines(prepared, ys, len(prepared.tokenizer))
    except (OSError, ValueError) as e:  # ConfigError is a ValueError
        return f"Baselines not computed: {' '.join(str(e).split())[:200]}"
    bigram = f", bigram {b['bigram']:.4f}" if b["bigram"] is not None else ""
    return (f"On the same yardstick continuations ({b['tokens']:,} tokens), from the training split's "
            f"{b['train_tokens']:,} tokens (train/eval/baselines.py): uniform {b['uniform']:.4f}, unigram "
            f"{b['unigram']:.4f}{bigram} nats/token. A cell below the bigram line has learned more than which token "
            f"follows which.")


def judge_ladder(ns, args: LadderArgs, plans: list[RungPlan], command: str) -> int:
    """Collect the points, write ladder.json, then fit, judge, draw and write the page."""
    from . import fit_ladder, judge, plot_isoflop, plot_loss_vs_flops, rollout_cv, summary_text, write_page
    from ..reproduce.pages import _machine
    from .table import points_table

    points, missing = write_points(plans, args)
    out = Path(args.out)
    print(f"\n{len(points)} point(s) in {out / 'ladder.json'}"
          + (f"; {len(missing)} branch(es) not finished, e.g. {missing[0]}" if missing else ""))
    try:
        pts = [LadderPoint.from_dict(p) for p in points]
        ladder = fit_ladder(pts, resamples=ns.resamples, seed=args.seed, starts=ns.starts, min_rungs=ns.min_rungs)
        verdicts = judge(ladder, target_of(ns.target, args, plans, ns.claim))
    except LadderError as e:
        print(f"error: cannot fit the ladder: {e}", file=sys.stderr)
        return 2
    try:
        rollout = rollout_cv(pts, resamples=ns.resamples, seed=args.seed, starts=ns.starts, min_rungs=ns.min_rungs)
    except LadderError as e:  # the full ladder fits, the one without its largest rung does not
        rollout = None
        print(f"rollout CV skipped: {e}")
    pics = [plot_loss_vs_flops(ladder, verdicts, out / "loss_vs_flops.png"), plot_isoflop(ladder, out / "isoflop.png")]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = write_page(out / "ladder.md", ladder, rollout, verdicts, command, _machine(), date, pics)
    base, section = baselines_line(points), ""
    if ns.claim:
        from .claims import claim_of, claim_section, judge_claim

        claim, rungs = claim_of(ns.claim), [p.rung.label for p in plans]
        section = "\n" + claim_section(claim, *judge_claim(claim, verdicts, points, rungs), rungs, verdicts)
    with open(page, "a") as f:
        f.write(f"\n## Baselines\n\n{base}\n")
        f.write(f"\n## Points ({len(points)} finished branches; every run in ladder.json)\n\n"
                + points_table(json.loads((out / "ladder.json").read_text())) + "\n" + section)
    print(base)
    print(summary_text(verdicts, rollout))
    if section:
        print(section)
    print(f"\npage: {page}   pictures: {', '.join(str(p) for p in pics)}")
    return 0
