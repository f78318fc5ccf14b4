"""The `--submit` options that reproduce and ladder share: one Slurm job per run, sized by the planner."""
from __future__ import annotations

import argparse


def add_submit_group(p: argparse.ArgumentParser, submit_help: str) -> None:
    """The "cluster (--submit)" group: --submit (its help: what this command submits), --dry-run,
    --gpus-per-node, --nodes, --gpu (the GPU the planner sizes for), --time, --partition."""
    g = p.add_argument_group("cluster (--submit)")
    g.add_argument("--submit", action="store_true", help=submit_help)
    g.add_argument("--dry-run", action="store_true", help="with --submit: print the plan and the first job script only")
    g.add_argument("--gpus-per-node", type=int, default=8,
                   help="with --submit: GPUs per node, one task each (default 8; 0: CPU jobs, one task per node, "
                        "no GPU plan)")
    g.add_argument("--nodes", type=int, default=1, help="with --submit: nodes per job (default 1)")
    g.add_argument("--gpu", default="h100-80gb", help="with --submit: the GPU the planner sizes for (archscale plan)")
    g.add_argument("--time", default=None, help="with --submit: each job's time limit (default: the partition's)")
    g.add_argument("--partition", default=None, help="with --submit: the partition (default: the cluster's)")
