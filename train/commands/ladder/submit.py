"""`archscale ladder --submit`: the ladder's runs as Slurm jobs, after the planner's GPU-hours.

One job per run through slurm.submit.submit (as `reproduce --submit`): the stable run of each
cell x rung x seed, and each of its decay branches `afterok` it. A job array (slurm's sweep) would
need every run to differ only in a grid of values; a branch differs from its siblings in three
keys and depends on one stable job, so single jobs with dependencies are the natural fit.
The planner (`archscale plan`'s model) sizes each run on the jobs' GPUs: the stable run for its
steps, a branch for its decay steps only (it resumes the rest); a run that does not fit refuses
its rung, in one line, before anything is submitted.
"""
from __future__ import annotations

import sys

from .plan import LadderArgs, RungPlan, check_runs, replace_steps


def plan_hours(plans: list[RungPlan], gpus: int, gpu: str) -> bool:
    """Print each rung's GPU-hours on `gpus` x `gpu` and the total; False (after a one-line error)
    when a run of a rung does not fit."""
    from ..plan.planner import plan

    total = 0.0
    print(f"plan on {gpus} x {gpu} per run (archscale plan's model; a branch counts its decay steps):")
    for p in plans:
        hours, peak = 0.0, 0.0
        for r in p.runs:
            got = plan(None, replace_steps(r.overrides, r.decay_steps), gpus=gpus, gpu=gpu)
            if not got["memory"]["fits"]:
                print(f"error: rung {p.rung.label} does not fit: {r.name} seed {r.seed} needs "
                      f"{got['memory']['peak_gib']:.1f} GiB of {got['memory']['usable_gib']:.1f} on {gpus} x {gpu}; "
                      f"`archscale plan` with its overrides shows a fix (pass it with --set), or drop the rung "
                      f"from --sizes", file=sys.stderr)
                return False
            hours += got["time"]["gpu_hours"]
            peak = max(peak, got["memory"]["peak_gib"])
        total += hours
        print(f"  rung {p.rung.label}: {len(p.runs)} runs, peak {peak:.1f} GiB, {hours:,.2f} GPU-hours")
    print(f"  total: {total:,.2f} GPU-hours")
    return True


def submit_ladder(ns, args: LadderArgs, plans: list[RungPlan]) -> int:
    """Submit (or with --dry-run print) every run; branches wait on their stable run's job."""
    from slurm.cluster import SlurmError
    from slurm.render import Resources
    from slurm.submit import submit

    world = ns.nodes * (ns.gpus_per_node or 1)  # as planned (command.main)
    check_runs(plans, world)
    if ns.gpus_per_node and not plan_hours(plans, world, ns.gpu):
        return 2
    resources = Resources(nodes=ns.nodes, gpus_per_node=ns.gpus_per_node, time=ns.time, partition=ns.partition)
    jobs: dict[str, str | None] = {}
    first = True
    try:
        for r in (r for p in plans for r in p.runs):
            after = jobs.get(r.parent) if r.parent else None
            ov = [o for o in r.overrides if not o.startswith("run_dir=")]  # submit's own argument
            what = "stable" if r.budget is None else f"decay {r.budget:,.0f}"
            sub = submit(None, ov, run_dir=r.run_dir, resources=resources, after=after, dry_run=ns.dry_run,
                         job_name=f"ladder-{r.rung}-{r.cell}-{r.seed}-{'s' if r.budget is None else 'd'}")
            jobs[r.run_dir] = sub.job_id
            print(f"{r.name} rung {r.rung} seed {r.seed} {what}: " + (f"job {sub.job_id}" if sub.job_id else "dry run")
                  + (f" (afterok {after or 'its stable run'})" if r.parent else ""))
            if ns.dry_run and first:
                print(sub.script + "(the other jobs' scripts differ in their run directory and overrides)")
                first = False
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not ns.dry_run:
        print(f"when they have finished (archscale status {args.out}), fit and judge them: the same command "
              f"without --submit")
    return 0
