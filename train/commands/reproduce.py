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

Claims that need a control or a chain this stack does not run yet are listed with what they
need, and refused.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

METRIC = "yardstick_nats"  # every rule reads the continuation loss (lower is better)


def _pair(pairs: list[dict], a: str, b: str, metric: str = METRIC) -> dict:
    """The a - b difference on `metric` (either order in the list; sign fixed to a - b)."""
    for p in pairs:
        if p["metric"] != metric:
            continue
        if (p["a"], p["b"]) == (a, b):
            return p
        if (p["a"], p["b"]) == (b, a):
            flip = lambda v: None if v is None else -v  # noqa: E731
            return {**p, "a": a, "b": b, "mean": -p["mean"], "low": flip(p["high"]), "high": flip(p["low"])}
    raise KeyError(f"no {a} - {b} difference on {metric}")


def better(p: dict) -> bool:
    """a is resolved better (lower loss) than b."""
    return p["resolved"] and p["mean"] < 0


def worse(p: dict) -> bool:
    return p["resolved"] and p["mean"] > 0


def _describe(p: dict, unit: str = "nats/token") -> str:
    iv = "no interval" if p["low"] is None else f"[{p['low']:+.4f}, {p['high']:+.4f}]"
    return f"{p['a']} - {p['b']} = {p['mean']:+.4f} {unit}, 95% {iv}"


def rule_gpt_vs_unilm(pairs: list[dict], names: dict) -> tuple[str, list[str]]:
    """Reproduced: ND is not resolved better than CD (no gain from the bidirectional prefix) and
    the mixed-direction ND is resolved better than both. Not reproduced: ND resolved better than
    CD, or mixed resolved worse than CD or ND. Otherwise inconclusive."""
    nd_cd = _pair(pairs, names["nd"], names["cd"])
    mix_nd, mix_cd = _pair(pairs, names["mixed"], names["nd"]), _pair(pairs, names["mixed"], names["cd"])
    reasons = [_describe(nd_cd), _describe(mix_nd), _describe(mix_cd)]
    if better(nd_cd) or worse(mix_nd) or worse(mix_cd):
        return "not reproduced", reasons
    if better(mix_nd) and better(mix_cd):
        return "reproduced", reasons
    return "inconclusive", reasons


def rule_ed_params(pairs: list[dict], names: dict) -> tuple[str, list[str]]:
    """Reproduced: ED at equal per-token FLOPs (2x the parameters) is resolved better than CD, and
    ED at equal parameters (half depth) is not. Not reproduced: the parameter-matched ED is resolved
    better than CD too (the advantage is not the parameters). Otherwise (no resolved advantage at
    equal FLOPs to explain) inconclusive."""
    flops, params = _pair(pairs, names["ed"], names["cd"]), _pair(pairs, names["ed-half"], names["cd"])
    reasons = [_describe(flops), _describe(params)]
    if better(params):
        return "not reproduced", reasons
    if better(flops):
        return "reproduced", reasons
    return "inconclusive", reasons


RANK = "prefix_effective_rank"  # su-low-rank's metric: mean effective rank of the prefix block's attention


def rule_low_rank(pairs: list[dict], names: dict) -> tuple[str, list[str]]:
    """On held-out windows (the yardstick's first 16, prefix = the first 64 tokens), the mean
    effective rank (exp of the singular values' entropy) of every layer's and head's attention
    over the prefix block, each model under the mask it was trained with. Reproduced: ND's
    bidirectional block is resolved lower-rank than CD's causal block and than the
    mixed-direction ND's block. Not reproduced: it is resolved higher than either. Otherwise
    inconclusive."""
    nd_cd, nd_mix = _pair(pairs, names["nd"], names["cd"], RANK), _pair(pairs, names["nd"], names["mixed"], RANK)
    reasons = [_describe(nd_cd, "effective rank"), _describe(nd_mix, "effective rank")]
    if worse(nd_cd) or worse(nd_mix):
        return "not reproduced", reasons
    if better(nd_cd) and better(nd_mix):
        return "reproduced", reasons
    return "inconclusive", reasons


def measure_low_rank(doc: dict, names: dict, windows: int = 16, prefix: int = 64) -> list[dict]:
    """Adds RANK (and prefix_numerical_rank) to every run of `doc` from its newest checkpoint;
    returns the paired differences on RANK (comparison.pairs' format)."""
    import torch
    from model_zoo.analysis import attention_spectra

    from ..data import prepare
    from ..eval.stats import mean_std
    from ..eval.yardstick import build_yardstick
    from ..trainer import checkpointing as ckpt
    from ..trainer.weights import load_model
    from .comparison import pairs

    ids = None
    for cell in doc["cells"]:
        for r in cell["runs"]:
            model, tok, cfg = load_model(ckpt.newest_checkpoint(Path(r["run_dir"]) / "checkpoints"))
            if ids is None:
                ys = build_yardstick(prepare(cfg.data, None), cfg.eval, cfg.data, tok)
                ids = torch.tensor(ys.tokens[:windows])
            batch = {"input_ids": ids, "prefix_lengths": torch.full((ids.shape[0],), prefix)}
            with torch.no_grad():
                rows = attention_spectra(model, batch, block="bidirectional")
            r[RANK] = mean_std([x["effective_rank"] for x in rows])[0]
            r["prefix_numerical_rank"] = mean_std([x["numerical_rank"] for x in rows])[0]
    return pairs(doc["cells"], (RANK,))


LENGTHS = (1, 2, 4)  # su-entropy-scale: evaluation windows of n, 2n and 4n tokens (n = the training length)


def length_metric(m: int) -> str:
    return f"nats_at_{m}n"


def rule_entropy_scale(pairs: list[dict], names: dict) -> tuple[str, list[str]]:
    """On held-out windows 4n tokens long (n = the training length), the mean next-token loss of
    each window's last n/2 tokens (nats/token; the same count at every length, so windows of n,
    2n and 4n differ only in how far past the trained length those tokens sit). Reproduced: the
    log_512(n)-scaled RoPE model and the RoPE + q/k-bias model are each resolved lower at 4n
    than plain RoPE. Not reproduced: either is resolved higher at 4n. Otherwise inconclusive."""
    key = length_metric(LENGTHS[-1])
    logn, bias = _pair(pairs, names["logn"], names["rope"], key), _pair(pairs, names["qkbias"], names["rope"], key)
    reasons = [_describe(logn) + f" at {LENGTHS[-1]}n", _describe(bias) + f" at {LENGTHS[-1]}n"]
    if worse(logn) or worse(bias):
        return "not reproduced", reasons
    if better(logn) and better(bias):
        return "reproduced", reasons
    return "inconclusive", reasons


def reading_lengths(doc: dict, names: dict) -> str:
    """Whether plain RoPE fails to extrapolate at all here (the claim's premise)."""
    runs = next(c for c in doc["cells"] if c["name"] == names["rope"])["runs"]
    first, last = (sum(r[length_metric(m)] for r in runs) / len(runs) for m in (LENGTHS[0], LENGTHS[-1]))
    if last > first:
        return ""
    return (f"Plain RoPE shows no extrapolation failure at this scale: its loss on the same last n/2 tokens is "
            f"{last:.3f} at {LENGTHS[-1]}n against {first:.3f} at n (more context still helps), so there is no "
            f"failure for either control to repair, and this run cannot test the claim.")


def measure_lengths(doc: dict, names: dict, windows: int = 32) -> list[dict]:
    """Adds length_metric(m) for m in LENGTHS to every run of `doc` (newest checkpoint; the same
    held-out windows for every run, cut from documents of at least 4n tokens); returns their
    paired differences (comparison.pairs' format, seeds' spread only)."""
    import dataclasses

    from ..data import prepare
    from ..eval.scoring import Scorer
    from ..eval.yardstick import build_yardstick
    from ..trainer import checkpointing as ckpt
    from ..trainer.weights import load_model
    from .comparison import pairs

    sets = {}
    for cell in doc["cells"]:
        for r in cell["runs"]:
            model, tok, cfg = load_model(ckpt.newest_checkpoint(Path(r["run_dir"]) / "checkpoints"))
            n = int(cfg.objective.seq_length)
            if not sets:
                prepared = prepare(cfg.data, None)
                for m in LENGTHS:
                    ev = dataclasses.replace(cfg.eval, window_tokens=m * n, windows=windows)
                    sets[m] = build_yardstick(prepared, ev, cfg.data, tok).tokens.tolist()
            scorer = Scorer(model, batch_size=cfg.eval.score_batch_size)
            for m in LENGTHS:
                lls = scorer.loglikelihoods([(w[:1], w[1:]) for w in sets[m]])
                tail = [-lp for ll in lls for lp in ll.token_logprobs[-(n // 2):]]
                r[length_metric(m)] = sum(tail) / len(tail)
            r["trained_length"] = n
    return pairs(doc["cells"], tuple(length_metric(m) for m in LENGTHS))


SPEEDUP = "catch_up_speedup"  # wang-nca: from-scratch steps / the adapted run's steps to the same held-out loss
NCA_EVAL_EVERY = 10  # wang-nca: both ND:MLM cells evaluate their held-out loss this often (rule_nca says 10)


def rule_nca(pairs: list[dict], names: dict) -> tuple[str, list[str]]:
    """Per seed: the from-scratch ND:MLM run's final held-out MLM loss (own objective) is the
    target; the speed-up is its step count divided by the first step at which the NC-A run (seed i
    of CD:FLM, continued as ND:MLM on the same batches per step) reaches that loss (both ND:MLM
    cells evaluate every 10 steps, so the speed-up is a lower bound). Reproduced: a speed-up of at least 2 on every seed (the
    paper's is 3.3). Not reproduced: some seed's NC-A run never reaches the target in its budget,
    or the mean speed-up is below 1.5. Otherwise inconclusive."""
    p = next(q for q in pairs if q["metric"] == SPEEDUP)
    per_seed = p["per_seed"]
    reasons = [f"{p['a']} vs {p['b']}: speed-up per seed "
               + ", ".join("never reached" if x is None else f"{x:.2f}x" for x in per_seed)
               + (f"; mean {p['mean']:.2f}x" if None not in per_seed else "")]
    if None in per_seed or p["mean"] < 1.5:
        return "not reproduced", reasons
    if min(per_seed) >= 2:
        return "reproduced", reasons
    return "inconclusive", reasons


def reading_nca(doc: dict, names: dict) -> str:
    """Where the adapted run starts and ends next to the from-scratch run (mean over seeds)."""
    cells = {c["name"]: c["runs"] for c in doc["cells"]}
    mean = lambda runs, j: sum(r["eval_losses"][j][3] for r in runs) / len(runs)  # noqa: E731
    nca, scratch = cells[names["nca"]], cells[names["scratch"]]
    first = nca[0]["eval_losses"][0][0]
    return (f"At its first evaluation (step {first}) the NC-A run's held-out loss is {mean(nca, 0):.3f} against "
            f"{mean(scratch, 0):.3f} from scratch; at the end it is {mean(nca, -1):.3f} against "
            f"{mean(scratch, -1):.3f} (means over seeds; each run has its own warm-up and cosine schedule).")


def measure_catch_up(doc: dict, names: dict) -> list[dict]:
    """Adds the catch-up (target loss, steps) to every NC-A run; returns the speed-up as one entry
    of the pairs list (metric SPEEDUP, per_seed: None where the target was not reached)."""
    cells = {c["name"]: c for c in doc["cells"]}
    scratch = {r["seed"]: r for r in cells[names["scratch"]]["runs"]}
    per_seed = []
    for r in cells[names["nca"]]["runs"]:
        ref = scratch[r["seed"]]["eval_losses"][-1]  # (step, tokens, flops, loss)
        step = next((st for st, _, _, loss in r["eval_losses"] if loss <= ref[3]), None)
        r["target_loss"], r["catch_up_step"], r["scratch_steps"] = ref[3], step, ref[0]
        r["final_loss"] = r["eval_losses"][-1][3]
        r[SPEEDUP] = None if step is None else ref[0] / step
        per_seed.append(r[SPEEDUP])
    mean = None if None in per_seed else sum(per_seed) / len(per_seed)
    return [{"a": names["nca"], "b": names["scratch"], "metric": SPEEDUP, "per_seed": per_seed, "mean": mean,
             "low": None, "high": None, "resolved": False, "seeds": [r["seed"] for r in cells[names["nca"]]["runs"]]}]


@dataclass(frozen=True)
class Claim:
    name: str
    source: str
    text: str
    cells: Callable[[int], list[str]]  # grid cells for a size of n decoder layers
    names: dict  # role -> the cell's name in compare's table
    rule: Callable
    needs: str = ""  # what is missing for it to run; "" = runnable
    measure: Callable = None  # doc -> extra pairs the rule reads (None: compare's pairs)
    measured: tuple = ()  # (run key, column title) of what `measure` adds to each run, for the page
    measured_title: str = ""
    reading: Callable = None  # doc, names -> a sentence the numbers support about the test itself ("" = none)
    caveat: str = ("Smoke scale: the debug size (0.6M parameters, most of them embeddings) on ~160k tokens of "
                   "this Python installation's own sources; the published claims were made at 100M-10B "
                   "parameters on web text. A verdict here says what this scale shows, not what the paper's does.")
    extra: list = field(default_factory=list)


CLAIMS = {c.name: c for c in [
    Claim("su-gpt-vs-unilm", "Su Jianlin, 'Why are current LLMs all decoder-only?' (2023); SCIENCE.md",
          "CD vs ND with the same parameters and the same PLM data, only the mask over the prefix differs: the "
          "bidirectional prefix brings no gain, and mixed-direction attention (half the heads lower-, half "
          "upper-triangular over the prefix) does best.",
          lambda n: ["cd:plm", "nd:plm", "{cell: 'nd:plm', label: nd-mixed, set: "
                     "{model.overrides.bidirectional_mode: mixed_heads}}"],
          {"cd": "CD:PLM", "nd": "ND:PLM", "mixed": "ND:PLM (nd-mixed)"}, rule_gpt_vs_unilm),
    Claim("su-ed-params", "Su Jianlin (2023); SCIENCE.md ('ED has about 2x the parameters')",
          "ED vs CD on the same PLM data at equal per-token FLOPs (ED: encoder and decoder each as deep as the "
          "decoder, ~2x the parameters), and at equal parameters (ED at half depth each): ED's advantage comes "
          "from its doubled parameters.",
          lambda n: ["cd:plm", "ed:plm", f"{{cell: 'ed:plm', label: ed-half, set: {{model.overrides.n_layers: "
                     f"{max(1, n // 2)}}}}}"],
          {"cd": "CD:PLM", "ed": "ED:PLM", "ed-half": "ED:PLM (ed-half)"}, rule_ed_params),
    Claim("su-low-rank", "Su Jianlin (2023); SCIENCE.md, the low-rank argument",
          "A bidirectional attention block (ND's prefix) is lower-rank than a causal one, whose lower-triangular "
          "matrix with a positive diagonal is full rank by construction, and than a mixed-direction block (every "
          "head triangular).",
          lambda n: ["cd:plm", "nd:plm", "{cell: 'nd:plm', label: nd-mixed, set: "
                     "{model.overrides.bidirectional_mode: mixed_heads}}"],
          {"cd": "CD:PLM", "nd": "ND:PLM", "mixed": "ND:PLM (nd-mixed)"}, rule_low_rank, measure=measure_low_rank,
          measured=((RANK, "effective rank"), ("prefix_numerical_rank", "numerical rank")),
          measured_title="Prefix-block rank (each model under its own mask)"),
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
    Claim("wang-zero-shot", "Wang et al. 2022", "CD:FLM is best zero-shot after pretraining; MLM-pretrained "
          "models are best after multitask finetuning.", lambda n: [], {}, None,
          needs="a multitask-finetuning stage after each cell"),
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


def _machine() -> str:
    import os

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("name", nargs="?", help=f"one of {', '.join(CLAIMS)}")
    p.add_argument("--list", action="store_true", help="the claims, their rules and what each needs")
    p.add_argument("--size", default="debug", help="model size of every cell (model_zoo.SIZES)")
    p.add_argument("--seeds", type=int, default=2, help="runs per cell")
    p.add_argument("--tokens", type=int, default=160_000, help="tokens seen per run (the budget every cell matches)")
    p.add_argument("--out", default=None, help="run directories (default: runs/reproduce/NAME)")
    p.add_argument("--results", default="docs/results", help="where NAME.md and NAME.png are written")
    p.add_argument("--set", nargs="*", default=[], metavar="a.b=c", help="more overrides for every cell")
    g = p.add_argument_group("cluster (--submit)")
    g.add_argument("--submit", action="store_true",
                   help="submit every run to Slurm instead of training here (one job each; a run that starts from "
                        "another cell's run waits for it); then run the same command without --submit to judge")
    g.add_argument("--dry-run", action="store_true", help="with --submit: print the plan and the job scripts only")
    g.add_argument("--gpus-per-node", type=int, default=8, help="with --submit: GPUs per job (default 8)")
    g.add_argument("--nodes", type=int, default=1, help="with --submit: nodes per job (default 1)")
    g.add_argument("--gpu", default="h100-80gb", help="with --submit: the GPU the planner sizes for (archscale plan)")
    g.add_argument("--time", default=None, help="with --submit: each job's time limit (default: the partition's)")
    g.add_argument("--partition", default=None, help="with --submit: the partition (default: the cluster's)")
    a = p.parse_args(argv)
    if a.list or not a.name:
        for c in CLAIMS.values():
            state = f"needs {c.needs}" if c.needs else "runnable"
            print(f"{c.name}: {c.text}\n    rule: {' '.join((c.rule.__doc__ or '-').split()) if c.rule else '-'}"
                  f"\n    {state}")
        return 0 if a.list else 2
    claim = CLAIMS.get(a.name)
    if claim is None:
        print(f"error: unknown claim {a.name!r}; choose one of {', '.join(CLAIMS)} (archscale reproduce --list)",
              file=sys.stderr)
        return 2
    if claim.needs:
        print(f"error: {claim.name} cannot run yet: it needs {claim.needs}", file=sys.stderr)
        return 2
    import model_zoo

    from .compare import main as compare_main

    if a.size not in model_zoo.SIZES:
        print(f"error: --size {a.size!r} is not one of {', '.join(model_zoo.SIZES)}", file=sys.stderr)
        return 2
    out = Path(a.out or f"runs/reproduce/{claim.name}")
    out.mkdir(parents=True, exist_ok=True)
    grid = out / "cells.yaml"
    grid.write_text("cells:\n" + "".join(f"  - {c}\n" for c in claim.cells(model_zoo.SIZES[a.size]["n_layers"])))
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
    write_page(claim, a, doc, verdict, reasons, out)
    return 0


def submit_claim(a, argv_compare: list[str], out: Path) -> int:
    """--submit: every run of the claim's cells as one Slurm job (compare's overrides, its run
    directory), after the planner's memory and GPU-hours on the jobs' GPUs. A cell whose settings
    name another cell's run (`{out}/LABEL/seed-{seed}`, NC-A's init) waits for that run's job."""
    from slurm.cluster import SlurmError
    from slurm.render import Resources
    from slurm.submit import submit

    from .compare import parse_args, plan_runs
    from .plan.planner import plan

    gpus = a.gpus_per_node * a.nodes
    try:
        cells, runs = plan_runs(parse_args(argv_compare), world_size=gpus)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total, rows = 0.0, []
    for (label, i), (ov, _) in runs.items():
        p = plan(None, ov, gpus=gpus, gpu=a.gpu)
        if not p["memory"]["fits"]:
            print(f"error: {label} seed {i} does not fit on {gpus} x {a.gpu} (peak {p['memory']['peak_gib']:.1f} "
                  f"GiB of {p['memory']['usable_gib']:.1f}); `archscale plan` with its overrides shows a fix "
                  f"(pass it with --set)", file=sys.stderr)
            return 2
        total += p["time"]["gpu_hours"]
        rows.append(f"  {label} seed {i}: {p['model']['parameters'] / 1e6:,.1f}M params, peak "
                    f"{p['memory']['peak_gib']:.1f} GiB, {p['time']['wall_hours']:.2f} h wall, "
                    f"{p['time']['gpu_hours']:.1f} GPU-hours")
    print(f"plan on {gpus} x {a.gpu} per run (archscale plan's model):\n" + "\n".join(rows)
          + f"\n  total: {total:,.1f} GPU-hours")
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


def _cell_value(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def write_page(claim: Claim, a, doc: dict, verdict: str, reasons: list[str], out: Path) -> Path:
    from .comparison import budget_lines, cell_table, pair_table

    metric_text = ("Intervals are paired by seed, 95% (the seeds' spread only)." if claim.measure else
                   "The metric is the common yardstick's continuation loss in nats per token (docs/evaluation.md); "
                   "intervals are paired by seed, 95%, covering the seeds and the held-out windows.")
    measured_keys = {k for k, _ in claim.measured}
    rank_table = ""
    if claim.measured and any(k in r for c in doc["cells"] for r in c["runs"] for k in measured_keys):
        unit = claim.measured[0][1] if claim.measure is measure_low_rank else "nats/token"
        rank_table = (f"## {claim.measured_title}\n\n| cell | seed | " + " | ".join(t for _, t in claim.measured)
                      + " |\n|---|---|" + "---|" * len(claim.measured) + "\n" + "".join(
                          f"| {c['name']} | {r['seed']} | " + " | ".join(_cell_value(r.get(k)) for k, _ in claim.measured)
                          + " |\n" for c in doc["cells"] for r in c["runs"] if measured_keys & set(r)) + "\n" + "\n".join(
            f"- {p['metric']}: {_describe(p, unit)}{' (resolved)' if p['resolved'] else ''}"
            for p in doc["pairs"] if p["metric"] in measured_keys and "per_seed" not in p) + "\n\n")
    gaps = budget_lines(doc["cells"], doc["budget"]["kind"], doc["budget"]["value"])
    budget_text = (f"{doc['budget']['kind']} = {doc['budget']['value']:,.0f} for every cell; "
                   + ("; ".join(gaps) + ". The verdict compares cells that did not see the same budget."
                      if gaps else "every cell met it within 5%."))

    reading = claim.reading(doc, claim.names) if claim.reading else ""
    reading = f"\n\n**Reading.** {reading}" if reading else ""
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    png = results / f"{claim.name}.png"
    shutil.copyfile(out / "curves.png", png)
    command = " ".join(["archscale reproduce", claim.name, "--size", a.size, "--seeds", str(a.seeds), "--tokens",
                        str(a.tokens)] + (["--out", a.out] if a.out else []) + (["--set", *a.set] if a.set else []))
    page = f"""# {claim.name}: {verdict}

**Claim** ({claim.source}): {claim.text}

**Rule, stated before the run**: {' '.join(claim.rule.__doc__.split())} {metric_text}

**Verdict: {verdict}.**
{chr(10).join('- ' + r for r in reasons)}

**Budget.** {budget_text}

**Scale caveat.** {claim.caveat}{reading}

Command: `{command}` (run directories: `{out}`). Machine: {_machine()}. Date:
{datetime.date.today().isoformat()}.

## Cells

{cell_table(doc["cells"])}

{rank_table}## Differences

{pair_table([p for p in doc["pairs"] if p["metric"] not in measured_keys])}

![curves]({png.name})
"""
    path = results / f"{claim.name}.md"
    path.write_text(page)
    write_index(results)
    print(f"{path}  {png}")
    return path


def write_index(results: Path) -> Path:
    """RESULTS/README.md: every claim, and the verdict, command and date of its page in RESULTS
    (read back from the pages, so the index says what the runs printed)."""
    import re

    rows = []
    for c in CLAIMS.values():
        page = results / f"{c.name}.md"
        if not page.exists():
            rows.append(f"| {c.name} | not run | {'needs ' + c.needs if c.needs else '-'} | - |")
            continue
        text = page.read_text()
        verdict = text.splitlines()[0].split(": ", 1)[-1]
        command = re.search(r"Command: `([^`]*)`", text)
        date = re.search(r"Date:\s*(\S+)\.", text)
        rows.append(f"| [{c.name}]({page.name}) | {verdict} | `{command.group(1) if command else '?'}` | "
                    f"{date.group(1) if date else '?'} |")
    index = results / "README.md"
    index.write_text("# Reproductions\n\nThe published claims the project's brief lists (SCIENCE.md, in `../shared/` beside "
                     "the repository), each run by `archscale reproduce NAME` and judged by the rule its page "
                     "states. This index is written by the command from the pages; the machine and the scale "
                     "caveat are on each page.\n\n| claim | verdict | command | date |\n|---|---|---|---|\n"
                     + "\n".join(rows) + "\n")
    return index
