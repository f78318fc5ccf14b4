"""`archscale reproduce NAME`: a published claim, run as a comparison, judged by a rule stated in advance.

    archscale reproduce --list
    archscale reproduce su-gpt-vs-unilm [--size debug] [--seeds 2] [--tokens 160000] [--out DIR]
    archscale reproduce su-ed-params --seeds 3 --results docs/results

Each claim is a set of cells trained by `archscale compare` (the same held-out yardstick for
every cell, `--seeds` runs per cell, paired 95% intervals; docs/evaluation.md) and a verdict
rule on those intervals, written below before any run: "reproduced", "not reproduced" or
"inconclusive". The command prints the claim, the table, the differences and the verdict, and
writes RESULTS/NAME.md (the command, the machine, the date, the tables, the verdict's reasons)
and RESULTS/NAME.png (the curves). Nothing is tuned for a claim: the cells use compare's
settings; a claim that does not reproduce is reported as it is. At the default (debug) size
these are smoke-scale reproductions: the page says so.

Some claims measure more than compare's table: the prefix block's rank (su-low-rank), the loss
at 2n and 4n (su-entropy-scale), the catch-up of an adapted run (wang-nca), and the same models
after multitask finetuning (wang-zero-shot); their pages carry those tables. `--submit` runs the
cells as Slurm jobs at a cluster's size (the planner prints their GPU-hours first); the same
command without it then judges the finished runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..cluster_args import add_submit_group
from .measures import (MTF_STEPS, measure_catch_up, measure_lengths, measure_low_rank, measure_zero_shot,
                       reading_ed_params, reading_low_rank, reading_lengths, reading_nca)
from .pages import write_index, write_page
from .rules import (LENGTHS, METRIC, NCA_EVAL_EVERY, RANK, RANK_INIT, SPEEDUP, better, length_metric,  # noqa: F401
                    rule_ed_params, rule_entropy_scale, rule_gpt_vs_unilm, rule_low_rank, rule_nca, rule_zero_shot,
                    worse)

@dataclass(frozen=True)
class Claim:
    name: str
    source: str
    text: str
    cells: Callable[[int], list[str]]  # grid cells for a size of n decoder layers
    names: dict  # role -> the cell's name in compare's table
    rule: Callable
    measure: Callable = None  # doc -> extra pairs the rule reads (None: compare's pairs)
    measured: tuple = ()  # (run key, column title) of what `measure` adds to each run, for the page
    measured_title: str = ""
    picture: str = ""  # a picture the measure writes into the runs' directory, shown on the page
    reading: Callable = None  # doc, names -> a sentence the numbers support about the test itself ("" = none)
    caveat: str = ("Smoke scale: the debug size (0.6M parameters, most of them embeddings) on ~160k tokens of "
                   "this Python installation's own sources; the published claims were made at 100M-10B "
                   "parameters on web text. A verdict here says what this scale shows, not what the paper's does.")
    extra: list = field(default_factory=list)
    match_to: str = ""  # the grid's match_to: the cell that the cells' own `match:` sizes against ("" = none)


CLAIMS = {c.name: c for c in [
    Claim("su-gpt-vs-unilm", "Su Jianlin, 'Why are current LLMs all decoder-only?' (2023); SCIENCE.md",
          "CD vs ND with the same parameters and the same PLM data, only the mask over the prefix differs: the "
          "bidirectional prefix brings no gain, and mixed-direction attention (half the heads lower-, half "
          "upper-triangular over the prefix) does best.",
          lambda n: ["cd:plm", "nd:plm", "{cell: 'nd:plm', label: nd-mixed, set: "
                     "{model.overrides.bidirectional_mode: mixed_heads}}"],
          {"cd": "CD:PLM", "nd": "ND:PLM", "mixed": "ND:PLM (nd-mixed)"}, rule_gpt_vs_unilm),
    Claim("su-ed-params", "Su Jianlin (2023); SCIENCE.md ('ED has about 2x the parameters')",
          "ED vs CD on the same PLM data at equal training FLOPs per token (ED: each token passes through one "
          "stack, so at the decoder's shape it has ~2x the parameters), and at equal non-embedding parameters: "
          "ED's advantage comes from its doubled parameters. Both ED cells are sized by compare's width-and-depth "
          "search (d_model, heads, d_ff, layers) to within 5% of CD's FLOPs per token and of its non-embedding "
          "parameters respectively.",
          lambda n: ["cd:plm", "{cell: 'ed:plm', label: ed-flops, match: flops}",
                     "{cell: 'ed:plm', label: ed-params, match: params}"],
          {"cd": "CD:PLM", "ed": "ED:PLM (ed-flops)", "ed-params": "ED:PLM (ed-params)"}, rule_ed_params,
          match_to="cd:plm", reading=reading_ed_params),
    Claim("su-low-rank", "Su Jianlin (2023); SCIENCE.md, the low-rank argument",
          "A bidirectional attention block (ND's prefix) is lower-rank than a causal one, whose lower-triangular "
          "matrix with a positive diagonal is full rank by construction, and than a mixed-direction block (every "
          "head triangular).",
          lambda n: ["cd:plm", "nd:plm", "{cell: 'nd:plm', label: nd-mixed, set: "
                     "{model.overrides.bidirectional_mode: mixed_heads}}"],
          {"cd": "CD:PLM", "nd": "ND:PLM", "mixed": "ND:PLM (nd-mixed)"}, rule_low_rank, measure=measure_low_rank,
          measured=((RANK, "effective rank"), ("prefix_numerical_rank", "numerical rank"),
                    (RANK_INIT, "effective rank at init")),
          measured_title="Prefix-block rank (each model under its own mask)", picture="prefix_rank.png",
          reading=reading_low_rank),
    Claim("wang-nca", "Wang et al. 2022, 'What language model architecture and pretraining objective work best "
          "for zero-shot generalization?'; SCIENCE.md",
          "Non-causal MLM adaptation (NC-A): a CD:FLM model continued as ND:MLM reaches the from-scratch ND:MLM "
          "model's final loss in about 1/3.3 of the tokens.",
          lambda n: ["cd:flm", f"{{cell: 'nd:mlm', label: nd-mlm, set: {{eval.every_n_steps: {NCA_EVAL_EVERY}}}}}",
                     f"{{cell: 'nd:mlm', label: nd-mlm-nca, set: {{init.from_checkpoint: '{{out}}/cd-flm/seed-{{seed}}',"
                     f" eval.every_n_steps: {NCA_EVAL_EVERY}}}}}"],
          {"scratch": "ND:MLM", "nca": "ND:MLM (nd-mlm-nca)"}, rule_nca, measure=measure_catch_up,
          measured=(("target_loss", "target (scratch's final held-out loss)"), ("final_loss", "NC-A's final loss"),
                    ("catch_up_step", "NC-A's step there"),
                    ("scratch_steps", "scratch's steps"), (SPEEDUP, "speed-up")),
          measured_title="Catch-up of the adapted model (held-out MLM loss, own objective)", reading=reading_nca),
    Claim("wang-zero-shot", "Wang et al. 2022; SCIENCE.md",
          "CD:FLM is the best model after pretraining alone, and the MLM-pretrained encoder-decoder is the best "
          "after multitask finetuning (MT-F).",
          lambda n: ["cd:flm", "nd:plm", "ed:mlm"], {"cd": "CD:FLM", "nd": "ND:PLM", "ed": "ED:MLM"},
          rule_zero_shot, measure=measure_zero_shot,
          measured=(("pre_nats", "nats/token before MT-F"), ("mtf_nats", "after MT-F"),
                    ("pre_tasks_acc", "held-out task acc before"), ("mtf_tasks_acc", "after")),
          measured_title=f"Before and after multitask finetuning ({MTF_STEPS} steps of configs/mtf.yaml on the "
                         "toy mixture; the held-out task is a prompt never trained on)"),
    Claim("su-entropy-scale", "Su Jianlin (2021, 2023); SCIENCE.md (JL lemma / entropy-invariant attention, "
          "RoPE + bias)",
          "Trained at length n and evaluated at n, 2n and 4n: RoPE attention with the entropy-invariant scale "
          "log_512(n) / sqrt(d), and RoPE with a bias on the q and k projections, each extrapolate in length "
          "better than plain RoPE.",
          lambda n: [f"{{cell: 'cd:flm', label: {label}, set: {{model.overrides.position: rope{extra}}}}}"
                     for label, extra in (("rope", ""), ("rope-logn", ", model.overrides.entropy_scale: true"),
                                          ("rope-qkbias", ", model.overrides.qk_bias: true"))],
          {"rope": "CD:FLM (rope)", "logn": "CD:FLM (rope-logn)", "qkbias": "CD:FLM (rope-qkbias)"},
          rule_entropy_scale, measure=measure_lengths, reading=reading_lengths,
          measured=tuple((length_metric(m), f"nats/token at {m}n") for m in LENGTHS),
          measured_title="Loss at n, 2n and 4n (each window's last n/2 tokens; n = the training length)"),
]}



def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("name", nargs="?", help=f"one of {', '.join(CLAIMS)}")
    p.add_argument("--list", action="store_true", help="the claims and their rules")
    p.add_argument("--size", default="debug", help="model size of every cell (model_zoo.SIZES)")
    p.add_argument("--seeds", type=int, default=2, help="runs per cell")
    p.add_argument("--tokens", type=int, default=160_000, help="tokens seen per run (the budget every cell matches)")
    p.add_argument("--out", default=None, help="run directories (default: runs/reproduce/NAME)")
    p.add_argument("--results", default="docs/results", help="where NAME.md and NAME.png are written")
    p.add_argument("--set", nargs="*", default=[], metavar="a.b=c", help="more overrides for every cell")
    add_submit_group(p, "submit every run to Slurm instead of training here (one job each; a run that starts from "
                        "another cell's run waits for it); then run the same command without --submit to judge")
    a = p.parse_args(argv)
    if a.list or not a.name:
        for c in CLAIMS.values():
            print(f"{c.name}: {c.text}\n    rule: {' '.join(c.rule.__doc__.split())}")
        return 0 if a.list else 2
    claim = CLAIMS.get(a.name)
    if claim is None:
        print(f"error: unknown claim {a.name!r}; choose one of {', '.join(CLAIMS)} (archscale reproduce --list)",
              file=sys.stderr)
        return 2
    import model_zoo

    from ..compare import main as compare_main

    if a.size not in model_zoo.SIZES:
        print(f"error: --size {a.size!r} is not one of {', '.join(model_zoo.SIZES)}", file=sys.stderr)
        return 2
    out = Path(a.out or f"runs/reproduce/{claim.name}")
    out.mkdir(parents=True, exist_ok=True)
    grid = out / "cells.yaml"
    grid.write_text((f"match_to: {claim.match_to}\n" if claim.match_to else "") + "cells:\n"
                    + "".join(f"  - {c}\n" for c in claim.cells(model_zoo.SIZES[a.size]["n_layers"])))
    argv_compare = ["--out", str(out), "--grid", str(grid), "--seeds", str(a.seeds), "--size", a.size,
                    "--tokens", str(a.tokens)] + (["--set", *a.set] if a.set else [])
    print(f"{claim.name}: {claim.text}\nrule: {' '.join(claim.rule.__doc__.split())}\n")
    if a.submit:
        return submit_claim(a, argv_compare, out)
    rc = compare_main(argv_compare)
    if rc:
        return rc
    doc = json.loads((out / "comparison.json").read_text())
    if claim.measure is not None:
        doc["pairs"] = claim.measure(doc, claim.names) + doc["pairs"]
    verdict, reasons = claim.rule(doc["pairs"], claim.names)
    print(f"\nverdict: {verdict}\n" + "\n".join(f"  {r}" for r in reasons))
    write_index(write_page(claim, a, doc, verdict, reasons, out).parent, CLAIMS)
    return 0


def print_plan(runs: dict, gpus: int, gpu: str) -> bool:
    """Each run's plan on `gpus` x `gpu` and the total GPU-hours; False (after a one-line error)
    when a run does not fit."""
    from ..plan.planner import plan

    total, rows = 0.0, []
    for (label, i), (ov, _) in runs.items():
        p = plan(None, ov, gpus=gpus, gpu=gpu)
        if not p["memory"]["fits"]:
            print(f"error: {label} seed {i} does not fit on {gpus} x {gpu} (peak {p['memory']['peak_gib']:.1f} "
                  f"GiB of {p['memory']['usable_gib']:.1f}); `archscale plan` with its overrides shows a fix "
                  f"(pass it with --set)", file=sys.stderr)
            return False
        total += p["time"]["gpu_hours"]
        rows.append(f"  {label} seed {i}: {p['model']['parameters'] / 1e6:,.1f}M params, peak "
                    f"{p['memory']['peak_gib']:.1f} GiB, {p['time']['wall_hours']:.2f} h wall, "
                    f"{p['time']['gpu_hours']:.1f} GPU-hours")
    print(f"plan on {gpus} x {gpu} per run (archscale plan's model):\n" + "\n".join(rows)
          + f"\n  total: {total:,.1f} GPU-hours")
    return True


def submit_claim(a, argv_compare: list[str], out: Path) -> int:
    """--submit: every run of the claim's cells as one Slurm job (compare's overrides, its run
    directory), after the planner's memory and GPU-hours on the jobs' GPUs. A cell whose settings
    name another cell's run (`{out}/LABEL/seed-{seed}`, NC-A's init) waits for that run's job."""
    from slurm.cluster import SlurmError
    from slurm.render import Resources
    from slurm.submit import submit

    from ..compare import parse_args, plan_runs

    world = a.nodes * (a.gpus_per_node or 1)  # one task per GPU; CPU jobs (--gpus-per-node 0): one per node
    try:
        cells, runs = plan_runs(parse_args(argv_compare), world_size=world)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.gpus_per_node and not print_plan(runs, world, a.gpu):
        return 2
    resources = Resources(nodes=a.nodes, gpus_per_node=a.gpus_per_node, time=a.time, partition=a.partition)
    jobs: dict = {}
    try:
        for c in cells:
            parents = [d for d in jobs if f"{{out}}/{d[0]}/" in " ".join(c.overrides)]
            for i in range(a.seeds):
                parent = next((d for d in parents if d[1] == i), None)
                after = jobs[parent] if parent else None
                ov = [o for o in runs[(c.label, i)][0] if not o.startswith("run_dir=")]  # submit's own argument
                sub = submit(None, ov, run_dir=out / c.label / f"seed-{i}", resources=resources,
                             after=after, dry_run=a.dry_run, job_name=f"{a.name}-{c.label}-{i}")
                jobs[(c.label, i)] = sub.job_id
                print(f"{c.label} seed {i}: " + (f"job {sub.job_id}" if sub.job_id else "dry run")
                      + (f" (after {parent[0]} seed {i}" + (f": job {after}" if after else "") + ", afterok)" if parent else ""))
                if a.dry_run and len(jobs) == 1:
                    print(sub.script + "(the other jobs' scripts differ in their run directory and overrides)")
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not a.dry_run:
        cmd = " ".join(["archscale reproduce", a.name, "--size", a.size, "--seeds", str(a.seeds), "--tokens",
                        str(a.tokens), "--out", str(out)])
        print(f"when they have finished (archscale status {out}), judge them here: {cmd}")
    return 0
