"""Submit one run, a sweep (one job array over a grid) or a chain (afterok dependencies).

Every submission is checked before anything is queued (the run config, partition, GPUs, nodes,
time limit, a writable run directory) and recorded in RUN/slurm/submissions.jsonl, which `status`
reads. `dry_run=True` renders the script and returns it (after the config check): no Slurm command
runs, no file is written.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import re
import time

from . import cluster
from .cluster import SlurmError
from .render import FINISHED, RUN_DIR_KEY, Resources, render_array, render_job, trainer_command, check_path


@dataclasses.dataclass
class Submission:
    job_id: str | None  # None for a dry run, or a sweep with nothing left to run
    script: str  # the rendered script's text
    script_path: pathlib.Path | None  # where it was written (None for a dry run)
    run_dir: pathlib.Path


def _record(run_dir: pathlib.Path, **fields) -> None:
    with open(run_dir / "slurm" / "submissions.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}) + "\n")


def submissions(run_dir) -> list[dict]:
    p = pathlib.Path(run_dir) / "slurm" / "submissions.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _check_not_active(run_dir: pathlib.Path) -> None:
    """Two jobs writing one run directory would corrupt it: refuse while one is queued or running."""
    subs = submissions(run_dir)
    if not subs:
        return
    active = cluster.active_jobs()
    for s in reversed(subs):
        jid = s.get("job_id")
        if jid and jid in active:
            raise SlurmError(f"run directory {run_dir} already has job {jid} {active[jid][0].lower()}; "
                             f"cancel it (scancel {jid}) or choose another run directory")


def check_config(config: str | None, overrides=(), *, run_dir=None,
                 resources: Resources = Resources(), what: str = "", fit: bool = False,
                 gpu: str | None = None) -> None:
    """Load the run config as the trainer will (train.config: defaults < CONFIG < a.b=c) and derive
    its numbers for the job's world size, so a bad key or value is refused here with the
    trainer's one-line message instead of failing in the queue. `fit`: also the trainer's start-up
    memory fit check, planned for the job's world and GPUs (`gpu`: their kind in the planner's table;
    train/trainer/fitcheck.py, submit_fit_check), unless parallel.fit_check=false. Light: no torch,
    no model code."""
    from train.config import ConfigError, derive, load_config  # light (yaml and dataclasses)

    overrides = list(overrides)
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key == RUN_DIR_KEY and run_dir is not None:
            raise SlurmError(f"{what}{o} among the overrides: the run directory is given once, "
                             f"as --run-dir (run_dir=...); drop the override")
    if run_dir is not None:
        overrides.append(f"{RUN_DIR_KEY}={run_dir}")
    try:
        cfg = load_config(config, overrides)
        cfg.data.check_training_source()  # a reference preset without its data: refused before queueing
        derive(cfg, resources.nodes * resources.ntasks_per_node, bf16_supported=resources.gpus_per_node > 0)
    except FileNotFoundError as e:
        raise SlurmError(f"{what}config file {e.filename or config} does not exist") from None
    except OSError as e:
        raise SlurmError(f"{what}cannot read config file {config}: {e.strerror or e}") from None
    except (ConfigError, ValueError, TypeError) as e:
        raise SlurmError(f"{what}bad config: {' '.join(str(e).split())}") from None
    if fit:
        from train.trainer.fitcheck import submit_fit_check  # light: the planner, no torch

        try:
            submit_fit_check(cfg, nodes=resources.nodes, tasks_per_node=resources.ntasks_per_node,
                             gpus_per_node=resources.gpus_per_node, gpu=gpu, mem=resources.mem)
        except ConfigError as e:
            raise SlurmError(f"{what}{e}") from None


def submit(config: str | None, overrides=(), *, run_dir, resources: Resources = Resources(),
           after: str | None = None, dry_run: bool = False, command: list[str] | None = None,
           entry=None, env: dict | None = None, job_name: str | None = None,
           python: str | None = None, fit_check: bool = True, gpu: str | None = None) -> Submission:
    """Render RUN_DIR/slurm/job.sh for `python -m train train CONFIG OVERRIDES run_dir=RUN_DIR`
    and submit it (after job `after` succeeds, if given). `command` replaces the whole trainer
    command line; `entry` only the `-m train train` part. The config (None: the defaults and the
    overrides) is checked with train.config first, unless `command` or `entry` replaces the trainer,
    and so is its memory (`fit_check`, for the job's GPUs of kind `gpu`: check_config)."""
    run_dir = pathlib.Path(run_dir).absolute()
    try:
        check_path(run_dir)
    except ValueError as e:
        raise SlurmError(str(e)) from None
    if command is None and entry is None:
        check_config(config, overrides, run_dir=run_dir, resources=resources, fit=fit_check, gpu=gpu)
    if config is not None and pathlib.Path(config).is_file():  # the job may start elsewhere (a cell, a resubmission)
        config = str(pathlib.Path(config).absolute())
    if command is None:
        command = trainer_command(config, overrides, run_dir, python=python,
                                  **({"entry": entry} if entry is not None else {}))
    script = render_job(command, run_dir, resources, job_name=job_name, after=after, env=env)
    if dry_run:
        return Submission(None, script, None, run_dir)
    if is_finished(run_dir):
        raise SlurmError(f"run directory {run_dir} is finished ({FINISHED} is there); "
                         f"choose another run directory, or delete {FINISHED} to train on")
    cluster.check_resources(resources)
    cluster.check_writable(run_dir)
    _check_not_active(run_dir)
    path = run_dir / "slurm" / "job.sh"
    path.write_text(script)
    job_id = cluster.sbatch(path)
    _record(run_dir, job_id=job_id, script=str(path), command=command, after=after)
    return Submission(job_id, script, path, run_dir)


# ---------------------------------------------------------------- sweeps
@dataclasses.dataclass
class Sweep:
    """A grid of overrides (the product of every key's values), one run directory per cell."""
    dir: pathlib.Path
    config: str
    grid: dict[str, list]
    overrides: list[str] = dataclasses.field(default_factory=list)  # common to every cell
    resources: Resources = dataclasses.field(default_factory=Resources)
    concurrency: int | None = None  # at most this many cells at once (--array=...%K)
    entry: list[str] | None = None  # replaces `-m train train` (tests: a stand-in trainer)
    name: str | None = None
    seeds: int = 1  # runs per grid point: seed i adds i to `seed` (init) and `data.seed` (data order)

    @classmethod
    def from_yaml(cls, path) -> "Sweep":
        """config, grid {key: [values]}, and optionally dir, overrides, concurrency, slurm {...},
        entry, name. Relative paths are relative to the YAML file's folder."""
        path = pathlib.Path(path)
        d = _read_yaml(path, "sweep file")
        known = {"config", "grid", "dir", "overrides", "concurrency", "slurm", "entry", "name", "seeds"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SlurmError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        for key in ("config", "grid"):
            if key not in d:
                raise SlurmError(f"{path}: missing {key!r}")
        base = path.parent
        name = d.get("name") or path.stem
        try:
            res = Resources.from_dict(d.get("slurm"))
        except (TypeError, ValueError) as e:
            raise SlurmError(f"{path}: {e}") from None
        config = d["config"]
        if not pathlib.Path(config).is_absolute() and (base / config).exists():
            config = str((base / config).resolve())
        return cls(dir=(base / d.get("dir", f"runs/{name}")).absolute(), config=str(config),
                   grid=d["grid"], overrides=list(d.get("overrides") or []), resources=res,
                   concurrency=d.get("concurrency"), entry=d.get("entry"), name=name, seeds=d.get("seeds", 1))

    def cells(self) -> list[dict]:
        """[{index, name, run_dir, overrides}] in a fixed order (the grid's key order)."""
        if not isinstance(self.grid, dict) or not self.grid:
            raise SlurmError("the grid must map override keys to lists of values")
        if not isinstance(self.seeds, int) or isinstance(self.seeds, bool) or self.seeds < 1:
            raise SlurmError(f"seeds={self.seeds!r} must be an integer >= 1 (runs per grid point)")
        keys = list(self.grid)
        values = [v if isinstance(v, list) else [v] for v in self.grid.values()]
        cells, seen = [], set()
        for i, combo in enumerate(itertools.product(*values)):
            name = "-".join(_label(k, v) for k, v in zip(keys, combo))
            if name in seen:
                name = f"{i:03d}-{name}"
            seen.add(name)
            overrides = [*self.overrides, *(f"{k}={_yaml_value(v)}" for k, v in zip(keys, combo))]
            if self.seeds == 1:
                cells.append({"index": len(cells), "name": name, "run_dir": str(self.dir / name), "overrides": overrides})
                continue
            seed, data_seed = _base_seeds(self.config, overrides)
            for k in range(self.seeds):  # NAME/seed-K: `archscale report` groups them into one cell
                cells.append({"index": len(cells), "name": f"{name}-seed-{k}", "run_dir": str(self.dir / name / f"seed-{k}"),
                              "overrides": [*overrides, f"seed={seed + k}", f"data.seed={data_seed + k}"]})
        return cells

    def wandb_overrides(self, cell: dict) -> list[str]:
        """Before a cell's own overrides on its command line: logging.wandb's group (the sweep
        directory's name, unless the base config sets one) and run name (the cell's directory below it)."""
        from train.trainer.wandb_log import grouping_overrides  # light: no wandb, no torch

        return grouping_overrides(self.dir.name, str(pathlib.Path(cell["run_dir"]).relative_to(self.dir)), self.config)


def _read_yaml(path: pathlib.Path, what: str) -> dict:
    """A sweep or chain file through the run config's YAML reader (train/yamlfile.py: safe tags only,
    no key given twice, one line naming the file and the line); a mapping at the top."""
    from train.yamlfile import load_yaml  # light: PyYAML

    try:
        d = load_yaml(path, what)
    except ValueError as e:  # ConfigError
        raise SlurmError(str(e)) from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise SlurmError(f"{path}: expected a mapping at the top (config, grid, ...), got {type(d).__name__}")
    return d


def _base_seeds(config: str, overrides: list[str]) -> tuple[int, int]:
    """(seed, data.seed) of a grid point's config: what seed 0 of `seeds` runs with."""
    from train.config import ConfigError, load_config  # light (yaml and dataclasses)

    try:
        cfg = load_config(config, overrides)
    except (ConfigError, ValueError, TypeError, OSError) as e:
        raise SlurmError(f"seeds: cannot read the grid point's config: {' '.join(str(e).split())}") from None
    return cfg.seed, cfg.data.seed


def _label(key: str, value) -> str:
    """A short, path-safe label: the value, prefixed by the key's last part when it is a number."""
    v = re.sub(r"[^A-Za-z0-9._+-]", "_", _yaml_value(value))
    return f"{key.split('.')[-1]}{v}" if isinstance(value, (int, float)) and not isinstance(value, bool) else v


def _yaml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def is_finished(run_dir) -> bool:
    return (pathlib.Path(run_dir) / FINISHED).exists()


def submit_sweep(sweep: Sweep, *, dry_run: bool = False, after: str | None = None,
                 python: str | None = None) -> Submission:
    """One job array over the cells that are not finished. Writes SWEEP/sweep.json (the manifest
    the array tasks read by SLURM_ARRAY_TASK_ID) and each cell's RUN/slurm/job.sh."""
    cells = sweep.cells()
    todo = [c for c in cells if not is_finished(c["run_dir"])]
    if not sweep.entry:  # the real trainer: refuse a bad cell before anything is written or queued
        for c in todo:
            check_config(sweep.config, c["overrides"], run_dir=c["run_dir"], resources=sweep.resources,
                         what=f"cell {c['name']}: ")
    manifest = sweep.dir / "sweep.json"
    scripts = {}
    for c in cells:
        command = trainer_command(sweep.config, [*sweep.wandb_overrides(c), *c["overrides"]], c["run_dir"], python=python,
                                  **({"entry": sweep.entry} if sweep.entry else {}))
        c["command"] = command
        scripts[c["index"]] = render_job(command, c["run_dir"], sweep.resources,
                                         job_name=f"archscale-{c['name']}")
    indices = [c["index"] for c in todo]
    array = render_array(manifest, indices or [0], sweep.resources, concurrency=sweep.concurrency,
                         job_name=f"archscale-{sweep.name or sweep.dir.name}", after=after, python=python)
    if dry_run:
        return Submission(None, array, None, sweep.dir)
    cluster.check_writable(sweep.dir)
    manifest.write_text(json.dumps({"name": sweep.name, "config": sweep.config, "grid": sweep.grid,
                                    "cells": cells}, indent=1) + "\n")
    for c in cells:
        run_dir = pathlib.Path(c["run_dir"])
        cluster.check_writable(run_dir)
        (run_dir / "slurm" / "job.sh").write_text(scripts[c["index"]])
    if not todo:
        return Submission(None, array, None, sweep.dir)
    cluster.check_resources(sweep.resources)
    active = cluster.active_jobs()
    for c in todo:
        for s in reversed(submissions(c["run_dir"])):
            if s.get("job_id") in active:
                raise SlurmError(f"cell {c['name']} already has job {s['job_id']} queued or running; "
                                 f"cancel it or wait")
    path = sweep.dir / "slurm" / "array.sh"
    path.write_text(array)
    job_id = cluster.sbatch(path)
    _record(sweep.dir, job_id=job_id, script=str(path), indices=indices, after=after)
    for c in todo:
        _record(pathlib.Path(c["run_dir"]), job_id=f"{job_id}_{c['index']}", script=str(path), sweep=str(manifest))
    return Submission(job_id, array, path, sweep.dir)


# ---------------------------------------------------------------- chains
@dataclasses.dataclass
class Stage:
    """One step of a chain (e.g. pretrain -> adapt -> finetune -> evaluate): its own run."""
    config: str
    run_dir: pathlib.Path
    overrides: list[str] = dataclasses.field(default_factory=list)
    resources: Resources = dataclasses.field(default_factory=Resources)
    entry: list[str] | None = None
    name: str | None = None


def load_chain(path) -> list[Stage]:
    """YAML: `slurm: {...}` defaults for every stage, `stages: [{name, config, run_dir,
    overrides, slurm, entry}, ...]` in order. Relative paths are relative to the file's folder."""
    path = pathlib.Path(path)
    d = _read_yaml(path, "chain file")
    if not d.get("stages"):
        raise SlurmError(f"{path}: no stages")
    base = path.parent
    stages = []
    for i, s in enumerate(d["stages"]):
        missing = [k for k in ("config", "run_dir") if k not in s]
        if missing:
            raise SlurmError(f"{path}: stage {i} lacks {', '.join(missing)}")
        try:
            res = Resources.from_dict({**(d.get("slurm") or {}), **(s.get("slurm") or {})})
        except (TypeError, ValueError) as e:
            raise SlurmError(f"{path}: stage {i}: {e}") from None
        config = str(s["config"])
        if not pathlib.Path(config).is_absolute() and (base / config).exists():
            config = str((base / config).resolve())
        stages.append(Stage(config=config, run_dir=(base / s["run_dir"]).absolute(),
                            overrides=list(s.get("overrides") or []), resources=res,
                            entry=s.get("entry") or d.get("entry"), name=s.get("name")))
    return stages


def submit_chain(stages: list[Stage], *, after: str | None = None, dry_run: bool = False,
                 python: str | None = None) -> list[Submission]:
    """Each stage waits for the previous one to succeed (afterok); if one fails, Slurm cancels
    the rest (--kill-on-invalid-dep=yes) instead of leaving them pending forever. All stages are
    checked before the first is submitted. Finished stages are skipped, so submitting a chain
    again continues it."""
    if not dry_run:
        stages = [s for s in stages if not is_finished(s.run_dir)]
    for i, s in enumerate(stages):  # every stage's config, before the first is submitted
        if not s.entry:
            check_config(s.config, s.overrides, run_dir=pathlib.Path(s.run_dir).absolute(),
                         resources=s.resources, what=f"stage {s.name or i}: ")
    if not dry_run:
        for s in stages:
            cluster.check_resources(s.resources)
            cluster.check_writable(pathlib.Path(s.run_dir).absolute())
    subs, parent = [], after
    for s in stages:
        sub = submit(s.config, s.overrides, run_dir=s.run_dir, resources=s.resources, after=parent,
                     dry_run=dry_run, entry=s.entry, python=python,
                     job_name=f"archscale-{s.name}" if s.name else None)
        subs.append(sub)
        parent = sub.job_id or f"<job of {s.name or s.run_dir}>"
    return subs
