"""`archscale` (also `python -m train`): one thin entry point; each command calls one function.

    archscale train [CONFIG.yaml] [a.b=c ...] [--dry-run | --local-procs N]  train or resume one run
        [--overfit [--overfit-steps 200] [--overfit-threshold 0.5] | --determinism-check [--steps 5]]
    archscale compare [--out DIR] [--seeds N] [--tokens N | --budget KIND=VALUE] ...  cells on one yardstick
    archscale reproduce NAME [--seeds N] [--size S] | --list  a published claim, judged by a stated rule
    archscale ladder [--cells ..] [--sizes ..] [--budgets ..] [--submit]  scaling ladders, fitted and judged at a target
    archscale export RUN_DIR [--out DIR] [--step N]         a Hugging Face model directory
    archscale inspect [CONFIG.yaml] [a.b=c ...] [--mask DIR]  decoded batches and mask pictures
    archscale analyze RUN_DIR [--step N]                   attention rank per layer: causal vs bidirectional
    archscale plan [CONFIG.yaml] [a.b=c ...] [--gpus N]     will it fit, how long, what it costs
    archscale tokenize [CONFIG.yaml] [a.b=c ...] [--shard-range A:B | --submit]  cached shards, here or a job array
    archscale eval RUN_DIR --tasks F.jsonl | report RUNS    zero-shot evaluation, the comparison report
    archscale submit | sweep | status ...                   Slurm (see docs/slurm.md)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def cmd_train(argv: list[str]) -> int:
    """archscale train: --dry-run, --overfit / --determinism-check, --local-procs N, or the run itself."""
    a = _train_parser().parse_args(argv)
    from .config import ConfigError, load_config_with_origins, split_config_args

    args = [*a.args, "parallel.fit_check=false"] if a.no_fit_check else a.args  # the check warns that it is off
    path, overrides = split_config_args(args)
    try:
        cfg, origins = load_config_with_origins(path, overrides)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        return _dry_run(cfg, origins, a.world_size)
    if a.overfit:
        from .commands import debug

        rc, value = _guard(lambda: debug.main_overfit(path, overrides, a.overfit_steps, a.overfit_threshold))
        return rc or value
    if a.determinism_check:
        from .commands import debug

        rc, value = _guard(lambda: debug.main_determinism(path, overrides, a.steps))
        return rc or value
    if a.local_procs is not None:
        return _local_procs(a.local_procs, args, cfg)
    return _train(cfg)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archscale train", description="Train or resume one run of the comparison.")
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] then overrides a.b=c (defaults < file < overrides)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config (with origins), batch arithmetic, DeepSpeed JSON, parameters, "
                        "FLOPs per token and whether the run would resume; train nothing, write nothing")
    p.add_argument("--world-size", type=int, default=None,
                   help="--dry-run: the number of processes to plan for (default: $WORLD_SIZE or 1)")
    p.add_argument("--local-procs", type=int, default=None, metavar="N",
                   help="rehearse the cluster here: N CPU processes over gloo (torchrun), with the ZeRO stage, "
                        "pipeline stages and data-parallel sharding of the config")
    p.add_argument("--overfit", action="store_true",
                   help="train on the first batch only, again and again (temporary run directory); exit 0 if the "
                        "loss falls below --overfit-threshold, else 1")
    p.add_argument("--overfit-steps", type=int, default=200, help="--overfit: optimizer steps (default 200)")
    p.add_argument("--overfit-threshold", type=float, default=0.5, help="--overfit: the loss to reach (default 0.5)")
    p.add_argument("--determinism-check", action="store_true",
                   help="run the same steps twice (temporary run directories) and report the first step where the "
                        "losses differ; exit 0 if identical, else 1")
    p.add_argument("--steps", type=int, default=5, help="--determinism-check: steps of each run (default 5)")
    p.add_argument("--no-fit-check", action="store_true",
                   help="skip the start-up memory check (the same as parallel.fit_check=false; a warning says it is "
                        "off): for a user who knows the run fits where the planner says it does not")
    return p


def _dry_run(cfg, origins, world_size) -> int:
    """--dry-run: what the run would do, printed; a bad config or checkpoint is one line and exit 2."""
    from .commands.dryrun import describe
    from .config import ConfigError
    from .trainer.checkpointing import CheckpointError

    try:
        print(describe(cfg, origins, world_size))
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _train(cfg) -> int:
    """The run itself, in this process (one rank of a job): its summary line, or how to resume."""
    from .trainer.loop import train

    rc, result = _guard(lambda: train(cfg))  # train checks the config and checkpoint.resume before any work
    if rc:
        return rc
    if result.stopped_by:
        print(f"stopped by {result.stopped_by} at step {result.step}; checkpoint saved, resume with the same command")
        return 0
    print(json.dumps({"run_dir": result.run_dir, "step": result.step, "tokens_seen": result.tokens_seen,
                      "eval_loss": result.eval_loss}))
    return 0


def _guard(fn) -> tuple[int, object]:
    """(0, fn()); or, when fn raises, its error printed as one line and the exit code: 2 for a bad
    config or checkpoint, 3 for a non-finite loss (the trainer's NonFiniteError)."""
    from .trainer.checkpointing import CheckpointError
    from .config import ConfigError
    from .trainer.debug import NonFiniteError

    try:
        return 0, fn()
    except (ConfigError, CheckpointError) as e:
        err, rc = e, 2
    except NonFiniteError as e:
        err, rc = e, 3
    print(f"error: {err}", file=sys.stderr)
    return rc, None


def _local_procs(n: int, args: list[str], cfg) -> int:
    """`--local-procs N`: this same command (without the flag) under torchrun, N CPU processes over
    gloo. One thread per process unless OMP_NUM_THREADS is set; TMPDIR defaults to RUN_DIR/tmp
    (torchrun leaves torchelastic_* directories there). Returns torchrun's exit code."""
    import os
    import subprocess
    from pathlib import Path

    if n < 1:
        print(f"error: --local-procs must be at least 1 (got {n})", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("OMP_NUM_THREADS", "1")
    if "TMPDIR" not in env:
        tmp = Path(cfg.run_dir) / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a fresh rendezvous: torchrun sets these for its children
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "train", "train", *args]
    return subprocess.run(cmd, env=env).returncode


def cmd_compare(argv: list[str]) -> int:
    from .commands.compare import main

    return main(argv)


def cmd_export(argv: list[str]) -> int:
    from .commands.export import main

    return main(argv)


def _slurm(name: str):
    def run(argv: list[str]) -> int:
        from slurm import cli

        return getattr(cli, f"main_{name}")(argv)

    return run


COMMANDS = {
    "train": cmd_train,
    "compare": cmd_compare,
    "export": cmd_export,
    "inspect": lambda argv: __import__("train.commands.inspection", fromlist=["main"]).main(argv),
    "analyze": lambda argv: __import__("train.commands.analyze", fromlist=["main"]).main(argv),
    "eval": lambda argv: __import__("train.eval.evaluate", fromlist=["main"]).main(argv),  # archscale eval RUN_DIR --tasks F.jsonl
    "report": lambda argv: __import__("train.commands.report", fromlist=["main"]).main(argv),  # archscale report RUNS... | SWEEP_DIR
    "reproduce": lambda argv: __import__("train.commands.reproduce", fromlist=["main"]).main(argv),  # archscale reproduce NAME
    "ladder": lambda argv: __import__("train.commands.ladder.command", fromlist=["main"]).main(argv),  # archscale ladder
    "plan": lambda argv: __import__("train.commands.plan", fromlist=["main"]).main(argv),  # archscale plan CONFIG [a.b=c] --gpus N --gpu G [--json]
    "tokenize": lambda argv: __import__("train.commands.tokenize", fromlist=["main"]).main(argv),
    "submit": _slurm("submit"),
    "sweep": _slurm("sweep"),
    "chain": _slurm("chain"),
    "status": _slurm("status"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return cmd(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
