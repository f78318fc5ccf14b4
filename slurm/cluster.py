"""The few Slurm client commands archscale uses (sinfo, sbatch, squeue, scontrol, sacct), and the
checks a submission must pass before anything is queued. Every failure is a SlurmError whose
message is one line a user can act on."""
from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import uuid


class SlurmError(Exception):
    """A submission or query that cannot go ahead; str() is one line for the user."""


def run(cmd: list[str], *, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: this is not a Slurm login node (or Slurm is not on PATH)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(cmd[:2])} did not answer in {timeout:.0f} s: is slurmctld up?") from None
    if check and p.returncode != 0:
        msg = (p.stderr.strip() or p.stdout.strip() or f"exit code {p.returncode}").splitlines()[-1]
        raise SlurmError(f"{cmd[0]} failed: {msg}")
    return p


# ---------------------------------------------------------------- partitions and their limits
@dataclasses.dataclass
class Partition:
    name: str
    default: bool
    nodes: int
    gpus_per_node: int  # the most any node of the partition has
    max_time_s: int | None  # None: no limit


def parse_time(s: str) -> int | None:
    """Slurm time -> seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; None for 'infinite'/'UNLIMITED'."""
    s = str(s).strip()
    if s.lower() in ("infinite", "unlimited", "none", ""):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise ValueError(f"not a Slurm time: {s!r} (use minutes, HH:MM:SS or D-HH:MM:SS)")
    d, a, b, c = m.groups()
    if d is not None:  # D-H[:M[:S]]
        return int(d) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # H:M:S
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:  # M:S
        return int(a) * 60 + int(b)
    return int(a) * 60  # M


def gpus_in(gres: str) -> int:
    """'gpu:4', 'gpu:a100:8(S:0-1)', 'gpu:a100:4,gpu:v100:2,shard:8' -> GPUs on one node."""
    n = 0
    for item in gres.split(","):
        item = re.sub(r"\(.*?\)", "", item)
        parts = item.split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            n += int(parts[-1])
    return n


def partitions() -> dict[str, Partition]:
    out = run(["sinfo", "-h", "-o", "%P|%D|%G|%l"]).stdout
    parts: dict[str, Partition] = {}
    for line in out.splitlines():
        name, nodes, gres, limit = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        p = parts.setdefault(name, Partition(name, default, 0, 0, parse_time(limit)))
        p.nodes += int(nodes)
        p.gpus_per_node = max(p.gpus_per_node, gpus_in(gres))
    return parts


def check_resources(res) -> Partition:
    """Refuse what the cluster cannot run: an unknown partition, more GPUs or nodes than it has,
    a time over its limit. Returns the partition the job would run in."""
    parts = partitions()
    if not parts:
        raise SlurmError("sinfo lists no partitions: is the cluster up?")
    if res.partition is None:
        defaults = [p for p in parts.values() if p.default]
        if not defaults:
            raise SlurmError(f"the cluster has no default partition; choose one of: {', '.join(parts)}")
        part = defaults[0]
    elif res.partition not in parts:
        raise SlurmError(f"partition {res.partition!r} does not exist; available: {', '.join(parts)}")
    else:
        part = parts[res.partition]
    if res.nodes > part.nodes:
        raise SlurmError(f"{res.nodes} nodes asked for, but partition {part.name!r} has {part.nodes}")
    if res.gpus_per_node > part.gpus_per_node:
        raise SlurmError(f"{res.gpus_per_node} GPUs per node asked for, but the nodes of partition "
                         f"{part.name!r} have at most {part.gpus_per_node}")
    if res.time is not None:
        try:
            t = parse_time(res.time)
        except ValueError as e:
            raise SlurmError(str(e)) from None
        if part.max_time_s is not None and t is not None and t > part.max_time_s:
            raise SlurmError(f"time {res.time} is over partition {part.name!r}'s limit of {part.max_time_s // 60} minutes")
        # slurmctld signals at its first limit check (every 30 s) that finds less than
        # signal_seconds + 30 s left: with a shorter limit that is as soon as the job starts
        if t is not None and t <= res.signal_seconds + 30:
            raise SlurmError(f"time {res.time} ({t} s) leaves no time before the USR1 that comes "
                             f"--signal-seconds {res.signal_seconds} (+ up to 30) s before the limit: the job "
                             f"would be signalled as it starts; use a longer --time or a smaller --signal-seconds")
    return part


def check_writable(run_dir: pathlib.Path) -> None:
    """Create the run directory's slurm/ folder and write a file in it, or say why not."""
    d = pathlib.Path(run_dir) / "slurm"
    probe = d / f".probe-{uuid.uuid4().hex}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SlurmError(f"run directory {run_dir} is not writable: {e.strerror or e}") from None


# ---------------------------------------------------------------- submitting and asking about jobs
def sbatch(script: pathlib.Path, args=()) -> str:
    """Submit; returns the job id ('123', or for arrays the array's id)."""
    out = run(["sbatch", "--parsable", *args, str(script)]).stdout.strip()
    job_id = out.splitlines()[-1].split(";")[0] if out else ""
    if not re.fullmatch(r"\d+", job_id):
        raise SlurmError(f"sbatch printed no job id: {out!r}")
    return job_id


def active_jobs() -> dict[str, tuple[str, str]]:
    """Every queued or running job (array tasks one by one): id -> (STATE, reason)."""
    out = run(["squeue", "-h", "-r", "-o", "%i|%T|%r"]).stdout
    jobs = {}
    for line in out.splitlines():
        jid, state, reason = line.split("|", 2)
        jobs[jid] = (state, "" if reason == "None" else reason)  # squeue says None for no reason
    return jobs


def _scontrol_jobs() -> dict[str, dict[str, str]]:
    """Every job slurmctld still holds in memory (finished ones for MinJobAge seconds)."""
    p = run(["scontrol", "-o", "show", "job"], check=False)
    jobs = {}
    for line in p.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" not in fields:
            continue
        jid = fields["JobId"]
        if fields.get("ArrayTaskId") and fields.get("ArrayJobId"):
            jobs[f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"] = fields
        jobs[jid] = fields
    return jobs


def _sacct(ids: list[str]) -> dict[str, tuple[str, str]]:
    """Finished jobs from accounting (slurmdbd), else from the job completion file (`sacct -c`)."""
    if not ids:
        return {}
    fmt = ["-n", "-P", "-o", "JobID,State,ExitCode"]
    p = run(["sacct", "-X", "-j", ",".join(ids), *fmt], check=False)
    if p.returncode != 0:
        p = run(["sacct", "-c", "-j", ",".join(i.split("_")[0] for i in ids), *fmt], check=False)
    jobs = {}
    for line in p.stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 3:
            jobs[parts[0]] = (parts[1].split()[0], parts[2])  # later lines (restarts) win
    return jobs


def job_states(ids) -> dict[str, tuple[str, str]]:
    """id -> (STATE, detail) for the given job ids ('123' or array tasks '123_4'): the queue
    first, then slurmctld's memory, then accounting. Unknown ids are left out."""
    ids = [str(i) for i in ids]
    if not ids:
        return {}
    found = {}
    queued = active_jobs()
    for i in ids:
        if i in queued:
            found[i] = queued[i]
    rest = [i for i in ids if i not in found]
    if rest:
        mem = _scontrol_jobs()
        for i in rest:
            if i in mem:
                f = mem[i]
                found[i] = (f.get("JobState", "UNKNOWN"), f"exit {f.get('ExitCode', '?')}"
                            + (f", {f['Reason']}" if f.get("Reason", "None") != "None" else ""))
    rest = [i for i in ids if i not in found]
    if rest:
        acct = _sacct(rest)
        for i in rest:
            if i in acct:
                found[i] = (acct[i][0], f"exit {acct[i][1]}")
    return found
