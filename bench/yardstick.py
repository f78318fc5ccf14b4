"""What the common yardstick costs next to training (issue 16's target: at most 15% of a cell's
training time per evaluated checkpoint, at compare's default settings).

    python -m bench.yardstick                      # compare's 3 default cells, 160k tokens each
    python -m bench.yardstick --cells cd:flm --tokens 40000 --out /tmp/ys-bench

For each cell: trains it once through the real trainer with no evaluation during training
(eval.yardstick=false, eval.every_n_steps=0), timing the run; then loads its final checkpoint and
times one yardstick evaluation (the best of `--repeat`), exactly as `archscale eval` and the
trainer score it. Prints seconds and the ratio; nothing is asserted (a benchmark, not a test).
Record the numbers with the machine and date in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def main(argv=None) -> int:
    from train.commands.compare import DEFAULT_CELLS, base_overrides, plan_cells
    from train.commands.compare import parse_args as compare_args
    from train.config import load_config
    from train.eval.evaluate import checkpoint_yardstick
    from train.trainer import checkpointing as ckpt
    from train.trainer.loop import train
    from train.trainer.weights import load_model

    p = argparse.ArgumentParser(prog="python -m bench.yardstick", description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", nargs="+", default=DEFAULT_CELLS)
    p.add_argument("--tokens", type=int, default=160_000, help="tokens seen per cell (compare's default)")
    p.add_argument("--repeat", type=int, default=2, help="yardstick evaluations per cell; the fastest counts")
    p.add_argument("--out", default=None, help="run directories here (default: a temporary directory, removed)")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = a.out or tempfile.mkdtemp(prefix="bench-yardstick-")
    args = compare_args(["--out", out, "--tokens", str(a.tokens), "--cells", *a.cells])
    plan = plan_cells(args)
    rows = []
    for c in args.cells:
        cfg = load_config(None, base_overrides(c, args, plan.schedules[c.label]) + [
            "eval.yardstick=false", "eval.every_n_steps=0", f"run_dir={out}/{c.label}", "logging.progress_bar=false"])
        t0 = time.perf_counter()
        r = train(cfg, desc=c.name)
        train_s = time.perf_counter() - t0
        model, tok, _ = load_model(ckpt.newest_checkpoint(ckpt.RunLayout.from_config(cfg).checkpoints))
        run_cfg = load_config(None, base_overrides(c, args, plan.schedules[c.label]) +
                              [f"run_dir={cfg.run_dir}"])  # the yardstick's settings as compare runs them
        best = None
        for _ in range(a.repeat):
            t1 = time.perf_counter()
            res = checkpoint_yardstick(model, tok, run_cfg)
            best = min(best or 1e9, time.perf_counter() - t1)
        rows.append((c.name, r.step, r.tokens_seen, train_s, best, res["windows"]))
    print(f"{'cell':10} {'steps':>6} {'tokens':>9} {'train s':>8} {'yardstick s':>12} {'ratio':>7}  windows")
    for name, steps, tokens, train_s, ys_s, windows in rows:
        print(f"{name:10} {steps:6d} {tokens:9,d} {train_s:8.1f} {ys_s:12.2f} {ys_s / train_s:7.1%}  {windows}")
    if a.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
