"""Render the sbatch scripts: a single run (job.sh.tmpl) and a sweep's array task (array.sh.tmpl).

Pure string work: no Slurm command runs here, nothing is written. The scripts stay thin (see
the templates); everything a run needs arrives as the trainer's command line.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex
import sys

HERE = pathlib.Path(__file__).resolve().parent

# The trainer's command: ENTRY CONFIG [a.b=c ...] RUN_DIR_KEY=RUN_DIR. One place to change if the
# trainer names its run-directory setting differently.
ENTRY = ("-m", "train", "train")
RUN_DIR_KEY = "run_dir"
# The trainer writes this file into the run directory when training has ended; a script that
# finds it exits at once, and a sweep does not resubmit the cell.
FINISHED = "FINISHED"


@dataclasses.dataclass
class Resources:
    """What one job asks of Slurm. Times use Slurm's formats (minutes, HH:MM:SS, D-HH:MM...)."""
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one task per GPU, one task without GPUs
    cpus_per_task: int | None = None
    mem: str | None = None  # per node, e.g. "64G"
    time: str | None = None
    partition: str | None = None  # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    signal_seconds: int = 300  # USR1 this long before the time limit (Slurm checks every ~30 s)
    max_restarts: int = 10  # requeues in all (time limits, preemptions, crashes) before giving up
    sbatch_args: tuple[str, ...] = ()  # anything else, verbatim: ("--reservation=x",)

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Resources":
        d = {k.replace("-", "_"): v for k, v in (d or {}).items()}  # gpus-per-node as on sbatch
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown slurm setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        if "sbatch_args" in d:
            d["sbatch_args"] = tuple(d["sbatch_args"])
        return cls(**d)

    def replace(self, **changes) -> "Resources":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def trainer_command(config: str | None, overrides=(), run_dir: str | pathlib.Path = "", *,
                    python: str | None = None, entry=ENTRY) -> list[str]:
    """`python -m train train CONFIG a.b=c ... run_dir=RUN_DIR` as an argument list (no CONFIG
    when it is None: the defaults and the overrides). `entry` replaces `-m train train`, e.g. with
    a script path (tests use a stand-in trainer)."""
    cmd = [python or sys.executable, *entry, *([str(config)] if config is not None else []), *overrides]
    if run_dir:
        cmd.append(f"{RUN_DIR_KEY}={run_dir}")
    return cmd


def sbatch_lines(res: Resources, *, job_name: str, output: str, array: str | None = None,
                 after: str | None = None, workdir: str | pathlib.Path | None = None) -> list[str]:
    opts = [f"--job-name={job_name}", f"--output={output}", "--open-mode=append", "--requeue",
            f"--signal=B:USR1@{res.signal_seconds}", f"--nodes={res.nodes}",
            f"--ntasks-per-node={res.ntasks_per_node}"]
    if res.gpus_per_node:
        opts.append(f"--gpus-per-node={res.gpus_per_node}")
    for flag, value in [("cpus-per-task", res.cpus_per_task), ("mem", res.mem), ("time", res.time),
                        ("partition", res.partition), ("account", res.account), ("qos", res.qos),
                        ("constraint", res.constraint), ("array", array)]:
        if value is not None:
            opts.append(f"--{flag}={value}")
    if res.exclusive:
        opts.append("--exclusive")
    if after:  # a failed parent cancels this job instead of leaving it pending forever
        opts += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    # the job starts where it was submitted from, also when the script is resubmitted by hand
    workdir = workdir or pathlib.Path.cwd()
    check_path(workdir, "working directory")
    opts.append(f"--chdir={workdir}")
    opts += list(res.sbatch_args)
    for o in opts:  # a line break would end the #SBATCH comment: what follows would run as a command
        if re.search(r"[\n\r\x00]", str(o)):
            raise ValueError(f"sbatch option {str(o)!r} contains a line break or NUL, which would inject lines into "
                             f"the batch script: remove it")
    return [f"#SBATCH {o}" for o in opts]


def _fill(template: str, values: dict[str, str]) -> str:
    def sub(m):
        if m.group(1) not in values:
            raise KeyError(f"template placeholder {m.group(1)} has no value")
        return values[m.group(1)]
    return re.sub(r"\{\{(\w+)\}\}", sub, template)


def check_path(path: str | pathlib.Path, what: str = "run directory") -> None:
    """#SBATCH lines cannot quote, and % starts an --output pattern: refuse such paths early."""
    s = str(path)
    if re.search(r"[\s%\"'\\]", s):
        raise ValueError(f"{what} {s!r} contains whitespace, a quote, a backslash or %, which sbatch cannot take")


def render_job(command: list[str], run_dir: str | pathlib.Path, res: Resources = Resources(), *,
               job_name: str | None = None, after: str | None = None, env: dict | None = None,
               output: str | None = None) -> str:
    """The batch script for one run. `command` is what every task runs (see trainer_command)."""
    run_dir = pathlib.Path(run_dir).absolute()
    check_path(run_dir)
    lines = sbatch_lines(res, job_name=job_name or f"archscale-{run_dir.name}",
                         output=output or f"{run_dir}/slurm/job-%j.out", after=after)
    bad = [k for k in (env or {}) if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k))]
    if bad:
        raise ValueError(f"environment variable name(s) {bad} are not shell identifiers (letters, digits, _): rename them")
    env_lines = "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in (env or {}).items())
    return _fill((HERE / "job.sh.tmpl").read_text(), {
        "sbatch": "\n".join(lines), "run_dir": shlex.quote(str(run_dir)),
        "max_restarts": str(int(res.max_restarts)), "env": env_lines.rstrip("\n"),
        "command": shlex.join(str(c) for c in command)})


def render_array(manifest: str | pathlib.Path, indices: list[int], res: Resources = Resources(), *,
                 concurrency: int | None = None, job_name: str = "archscale-sweep",
                 after: str | None = None, python: str | None = None) -> str:
    """The batch script for a sweep: one array task per cell index, each becoming that cell's job.sh."""
    manifest = pathlib.Path(manifest).absolute()
    check_path(manifest, "sweep directory")
    array = ",".join(str(i) for i in compress(indices)) + (f"%{concurrency}" if concurrency else "")
    lines = sbatch_lines(res, job_name=job_name, output=f"{manifest.parent}/slurm/array-%A_%a.out",
                         array=array, after=after)
    return _fill((HERE / "array.sh.tmpl").read_text(), {
        "sbatch": "\n".join(lines), "manifest": shlex.quote(str(manifest)),
        "python": shlex.quote(python or sys.executable)})


def render_tokenize(command: list[str], tasks: int, shards_per_task: int, res: Resources = Resources(), *,
                    log_dir: str | pathlib.Path, job_name: str = "archscale-tokenize",
                    concurrency: int | None = None, after: str | None = None) -> str:
    """The batch script of a tokenization job array (tokenize.sh.tmpl): task T runs `command
    --shard-range T*K:(T+1)*K` (train/commands/tokenize.py)."""
    log_dir = pathlib.Path(log_dir).absolute()
    check_path(log_dir, "log directory")
    array = f"0-{tasks - 1}" + (f"%{concurrency}" if concurrency else "")
    lines = sbatch_lines(res, job_name=job_name, output=f"{log_dir}/tokenize-%A_%a.out", array=array, after=after)
    return _fill((HERE / "tokenize.sh.tmpl").read_text(), {
        "sbatch": "\n".join(lines), "shards_per_task": str(int(shards_per_task)),
        "command": shlex.join(str(c) for c in command)})


def compress(indices) -> list[str]:
    """[0, 1, 2, 5, 7, 8] -> ['0-2', '5', '7-8'] (Slurm's --array syntax)."""
    out, idx = [], sorted(set(indices))
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return out
