"""`archscale submit | sweep | chain | status`: argparse front ends over slurm.submit / slurm.status.
Each main_* takes argv (without the subcommand) and returns an exit code; errors are one line."""
from __future__ import annotations

import argparse
import pathlib
import sys

from .cluster import SlurmError
from .render import Resources
from .status import format_status, status
from .submit import Sweep, load_chain, submit, submit_chain, submit_sweep


def _resource_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("slurm")
    g.add_argument("--nodes", type=int, help="nodes (default 1)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU (default 0)")
    g.add_argument("--tasks-per-node", type=int, help="tasks per node (default: one per GPU, else 1)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--mem", help="memory per node, e.g. 64G")
    g.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    g.add_argument("--partition", help="default: the cluster's default partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--exclusive", action="store_true", default=None)
    g.add_argument("--signal-seconds", type=int, help="USR1 this many seconds before the time limit (default 300)")
    g.add_argument("--max-restarts", type=int, help="requeues before giving up (default 10)")
    g.add_argument("--sbatch-arg", action="append", dest="sbatch_args", metavar="ARG",
                   help="passed to sbatch verbatim, e.g. --sbatch-arg=--reservation=x (repeatable)")


def _resources(a, base: Resources = Resources()) -> Resources:
    return base.replace(nodes=a.nodes, gpus_per_node=a.gpus_per_node, tasks_per_node=a.tasks_per_node,
                        cpus_per_task=a.cpus_per_task, mem=a.mem, time=a.time, partition=a.partition,
                        account=a.account, qos=a.qos, constraint=a.constraint, exclusive=a.exclusive,
                        signal_seconds=a.signal_seconds, max_restarts=a.max_restarts,
                        sbatch_args=tuple(a.sbatch_args) if a.sbatch_args else None)


def _fail(prog: str, e: Exception) -> int:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def local_cluster_problem() -> str | None:
    """None when the project's local cluster (slurm/local_cluster.sh) is up, else what to do."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).with_name("local_cluster.sh")
    try:
        r = subprocess.run(["bash", str(script), "status"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot check the local Slurm cluster ({e}); start it with `bash {script} start`"
    if r.returncode != 0:
        return f"the local Slurm cluster is not running: start it with `bash {script} start` (as root)"
    return None


def main_submit(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale submit", description="Submit one training run to Slurm.")
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] a.b=c",
                   help="the run's config YAML (optional, as for `archscale train`), then overrides a.b=c; "
                        "checked with the trainer's config loader before anything is submitted")
    p.add_argument("--run-dir", required=True, help="the run directory (scripts and logs go to RUN_DIR/slurm/)")
    p.add_argument("--after", metavar="JOBID", help="start only after this job succeeded (afterok)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="export this in the job script, e.g. --env DS_ACCELERATOR=cpu (repeatable; the "
                        "submitting shell's environment is passed on as well, as sbatch does)")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("--local", action="store_true",
                   help="rehearse on the project's local Slurm cluster (slurm/local_cluster.sh, which must be "
                        "running): CPU training (DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1 unless --env sets them) "
                        "and a 10-minute time limit unless --time is given")
    p.add_argument("--gpu", default=None, metavar="KIND",
                   help="the job's GPU kind, for the memory fit check (the planner's table, `archscale plan "
                        "--help`; default h100-80gb)")
    p.add_argument("--no-fit-check", action="store_true",
                   help="skip the memory fit check here and in the job (parallel.fit_check=false)")
    _resource_args(p)
    a = p.parse_args(argv)
    from train.config import split_config_args  # light: yaml and dataclasses

    config, overrides = split_config_args([*a.args, "parallel.fit_check=false"] if a.no_fit_check else a.args)
    env = {}
    if a.local:
        problem = local_cluster_problem()
        if problem:
            return _fail(p.prog, SlurmError(problem))
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        a.time = a.time or "10"
    for kv in a.env:
        key, eq, value = kv.partition("=")
        if not eq or not key.isidentifier():
            return _fail(p.prog, ValueError(f"--env {kv!r}: expected KEY=VALUE"))
        env[key] = value
    try:
        sub = submit(config, overrides, run_dir=a.run_dir, resources=_resources(a),
                     after=a.after, dry_run=a.dry_run, env=env or None, gpu=a.gpu)
    except (SlurmError, ValueError) as e:
        return _fail(p.prog, e)
    if a.dry_run:
        print(sub.script, end="")
    else:
        print(sub.job_id)
        print(f"submitted job {sub.job_id}: {sub.script_path}", file=sys.stderr)
    return 0


def main_sweep(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale sweep",
                                description="Submit a grid as one job array, one run directory per cell; "
                                            "finished cells are skipped.")
    p.add_argument("grid", help="sweep YAML: config, grid {key: [values]}, dir, overrides, concurrency, slurm {...}")
    p.add_argument("--after", metavar="JOBID", help="start only after this job succeeded (afterok)")
    p.add_argument("--dry-run", action="store_true", help="print the array script and the cells, submit nothing")
    p.add_argument("--seeds", type=int, default=None,
                   help="runs per grid point (NAME/seed-K; seed and data.seed + K); default: the YAML's seeds, or 1")
    _resource_args(p)
    a = p.parse_args(argv)
    try:
        sweep = Sweep.from_yaml(a.grid)
        if a.seeds is not None:
            sweep.seeds = a.seeds
        sweep.resources = _resources(a, sweep.resources)
        sub = submit_sweep(sweep, after=a.after, dry_run=a.dry_run)
    except (SlurmError, ValueError, OSError) as e:
        return _fail(p.prog, e)
    if a.dry_run:
        print(sub.script, end="")
        for c in sweep.cells():
            print(f"# cell {c['index']}: {c['name']}: {' '.join(c['overrides'])}")
    elif sub.job_id is None:
        print(f"every cell of {sweep.dir} is finished; nothing submitted", file=sys.stderr)
    else:
        print(sub.job_id)
        print(f"submitted array {sub.job_id}: {sub.script_path}", file=sys.stderr)
    return 0


def main_chain(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale chain",
                                description="Submit stages that each start after the previous one succeeded.")
    p.add_argument("chain", help="chain YAML: slurm {...} defaults, stages [{name, config, run_dir, overrides, slurm}]")
    p.add_argument("--after", metavar="JOBID", help="the first stage waits for this job")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    try:
        subs = submit_chain(load_chain(a.chain), after=a.after, dry_run=a.dry_run)
    except (SlurmError, ValueError, OSError) as e:
        return _fail(p.prog, e)
    for s in subs:
        print(s.script if a.dry_run else f"{s.job_id} {s.run_dir}")
    return 0


def main_status(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale status",
                                description="What is running, pending, done or failed, and each run's last step.")
    p.add_argument("paths", nargs="+", help="run directories or sweep directories")
    a = p.parse_args(argv)
    try:
        for path in a.paths:
            print(format_status(status(pathlib.Path(path))))
    except SlurmError as e:
        return _fail(p.prog, e)
    return 0


COMMANDS = {"submit": main_submit, "sweep": main_sweep, "chain": main_chain, "status": main_status}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m slurm {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
