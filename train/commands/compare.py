"""The README's main job: a real, small comparison of architectures and objectives.

    archscale compare [--out runs/compare] [--size debug] [--seq-len 128] [--tokens 160000]

Trains CD:FLM, ND:PLM and ED:MLM (and any other cells given with --cells) on the embedded
corpus at the same number of tokens seen (the reference experiment's rule), each through the
real trainer (DeepSpeed engine, checkpoints, held-out loss), then prints one table and saves the
loss curves against tokens seen and against FLOPs as a PNG. A cell that already finished in the
output directory is read back, not retrained; an interrupted one resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import registry
from ..objectives.config import OBJECTIVES

DEFAULT_CELLS = ["cd:flm", "nd:plm", "ed:mlm"]
CELL_OBJECTIVES = tuple(o for o in OBJECTIVES if o != "prompted")  # pretraining: prompted needs multitask data


def mlm_lengths(total: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(inputs_length, targets_length) of span corruption whose sum is at most `total` tokens
    (the reference's 512 + 114 = 626 is this for 626), computed with T5's random_spans_helper."""
    from ..objectives.span_corruption import random_spans_helper

    best = None
    for inputs in range(8, total):
        _, targets = random_spans_helper(inputs, noise_density, mean_span)
        if inputs + targets <= total:
            best = (inputs, targets)
    if best is None:
        raise ValueError(f"--seq-len {total} is too short for span corruption; use at least 16")
    return best


def cell_overrides(cell: str, args) -> list[str]:
    arch, _, objective = cell.partition(":")
    out = [f"run_dir={Path(args.out) / cell.replace(':', '-')}", f"model.arch={arch}", f"model.size={args.size}",
           f"objective.name={objective}", f"objective.seq_length={args.seq_len}",
           f"schedule.train_tokens={args.tokens}", f"parallel.micro_batch_size={args.micro_batch}",
           f"parallel.gradient_accumulation_steps={args.accumulation}", f"optim.lr={args.lr}",
           "schedule.name=cosine", "schedule.warmup_steps=5", f"eval.every_n_steps={args.eval_every}",
           f"eval.num_batches={args.eval_batches}", f"checkpoint.every_n_steps={args.checkpoint_every}",
           "logging.every_n_steps=5", f"seed={args.seed}"]
    if objective in ("mlm", "ul2"):
        inputs, targets = mlm_lengths(args.seq_len)
        # decoders read rows of inputs + targets (the encoder-decoder ignores seq_length here)
        out[4] = f"objective.seq_length={inputs + targets}"
        out += [f"objective.inputs_length={inputs}", f"objective.targets_length={targets}"]
    return out + list(args.set)


def table(results: list) -> str:
    head = ["arch", "objective", "params", "tokens seen", "target tokens", "FLOPs", "planned FLOPs/step",
            "held-out loss", "tokens/s"]
    rows = [[r["arch"].upper(), r["objective"].upper(), f"{r['params'] / 1e6:.2f}M", f"{r['tokens_seen']:,}",
             f"{r['target_tokens']:,}", f"{r['flops']:.3g}", f"{r['planned_flops_per_step']:.4g}",
             "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}", f"{r['tokens_per_s']:,.0f}"] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plot(results: list, path: Path) -> None:
    from .plots import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in results:
        label = f"{r['arch'].upper()}:{r['objective'].upper()}"
        steps, losses = zip(*r["losses"]) if r["losses"] else ((), ())
        axes[0].plot(steps, losses, label=label)
        ev = [e for e in r["eval_losses"] if e[3] is not None]
        if ev:
            axes[1].plot([e[1] for e in ev], [e[3] for e in ev], marker="o", label=label)
            axes[2].plot([e[2] for e in ev], [e[3] for e in ev], marker="o", label=label)
    axes[0].set(xlabel="step", ylabel="training loss (on each objective's targets)", title="training loss")
    axes[1].set(xlabel="tokens seen", ylabel="held-out loss", title="held-out loss vs tokens seen")
    axes[2].set(xlabel="training FLOPs", ylabel="held-out loss", title="held-out loss vs FLOPs")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/compare", help="directory holding one run directory per cell")
    p.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, help="ARCH:OBJECTIVE cells (default: %(default)s)")
    p.add_argument("--size", default="debug", help="model size for every cell (model_zoo.SIZES)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (MLM: inputs + targets)")
    p.add_argument("--tokens", type=int, default=160_000, help="tokens seen per cell (the budget all cells match)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="a.b=c", help="more overrides for every cell")
    args = p.parse_args(argv)
    for cell in args.cells:
        arch, sep, objective = cell.partition(":")
        if not sep or arch not in registry.ARCHITECTURES or objective not in CELL_OBJECTIVES:
            print(f"error: cell {cell!r} is not ARCH:OBJECTIVE with ARCH in {', '.join(registry.ARCHITECTURES)} "
                  f"and OBJECTIVE in {', '.join(CELL_OBJECTIVES)}", file=sys.stderr)
            return 2
        try:  # the registry's fit check: the same line as train, --dry-run and plan print
            registry.get(arch).check_objective(objective)
        except ValueError as e:
            print(f"error: cell {cell!r}: {e}", file=sys.stderr)
            return 2

    from ..config import ConfigError, load_config
    from ..trainer.loop import check, train

    configs = {}
    for cell in args.cells:  # every cell's config is checked before any cell trains
        try:
            configs[cell] = load_config(None, cell_overrides(cell, args))
            check(configs[cell], 1)  # compare trains each cell in this process: a world of one
        except (ConfigError, ValueError) as e:
            print(f"error: cell {cell!r}: {e}", file=sys.stderr)
            return 2
    results = []
    for cell, cfg in configs.items():
        done = Path(cfg.run_dir) / "result.json"
        if done.exists() and (Path(cfg.run_dir) / "FINISHED").exists():
            results.append(json.loads(done.read_text()))
            continue
        r = train(cfg, desc=cell.upper())
        if r.stopped_by:
            print(f"stopped by {r.stopped_by} during {cell}; run the same command again to resume", file=sys.stderr)
            return 1
        rec = dict(vars(r))
        done.write_text(json.dumps(rec) + "\n")
        results.append(rec)
    out = Path(args.out)
    print()
    print(f"Same budget for every cell: {args.tokens:,} tokens seen; size {args.size}; embedded corpus; "
          f"held-out loss is on each cell's own objective (targets differ between objectives).")
    print(table(results))
    plot(results, out / "loss_curves.png")
    (out / "comparison.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nloss curves: {out / 'loss_curves.png'}   table: {out / 'comparison.json'}")
    return 0
