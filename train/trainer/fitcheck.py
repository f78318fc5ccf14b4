"""The start-up fit check: the planner's peak memory for this run against the memory there is.

Before any file is written or any tensor allocated, `fit_check` asks the planner
(train/commands/plan, `plan_config`) for the run's peak memory per device and compares it with

    CUDA: the device's total memory (torch.cuda.get_device_properties), less the planner's headroom
          (DEFAULT_HEADROOM = 10%: the CUDA context, NCCL, allocator fragmentation);
    CPU:  the host's available memory (/proc/meminfo MemAvailable, read after the imports, so what
          this process holds already is not counted again), shared by the processes of this machine
          (LOCAL_WORLD_SIZE), less the same 10% headroom.

On CPU the plan is made with device="cpu": fp32 (precision auto resolves to fp32 without bf16
hardware), no DeepSpeed GPU buffers apply (ZeRO-0), a dense loss, and SDPA's fp32 mask saved per
block (the term that grows as T^2: what made `objective.seq_length=100000` on the debug model grow
past 20 GB). The planner does not count the process's fixed cost (torch, the data, the tokenizer:
about 1 GB of RSS), which is why the check compares with MemAvailable after start-up; docs/planning.md
has the planned against the measured peaks.

A run that does not fit is refused in one line (ConfigError): the planned peak, the memory there is,
the biggest term, and the planner's fix search's change. `parallel.fit_check=false` skips the check
with a warning. The planned peak is kept and logged with the measured one in the first metrics line
(`memory_record`): on CUDA torch.cuda.max_memory_allocated, on CPU the peak RSS (getrusage), beside
the RSS at the check (`startup_rss_gib`), which the plan leaves out.

At submit time (`archscale submit`, slurm/submit.py's check_config), `submit_fit_check` makes the
same comparison for the job before anything is queued, on the job's world (nodes x tasks per node):
on GPUs (`--gpus-per-node` > 0) against the GPU kind `--gpu` names (the planner's table; default
h100-80gb, the planner's default: a bigger GPU needs --gpu, a smaller one is only caught at start-up);
on CPUs against `--mem` per node shared by its tasks. A CPU job without --mem (a `--local` rehearsal:
this machine) is left to the start-up check, which there costs nothing but the plan. The check imports
torch (the planner reads the model's config, a transformers config): a few seconds on a login node,
only in these cases (importing slurm/ stays light). `--no-fit-check` (or parallel.fit_check=false)
skips both checks.

Pitfalls: the vocabulary is the model size's own (the tokenizer is not loaded yet; the trainer pads
the tokenizer's); a config the planner cannot plan (a PlanError) is left to the trainer's own checks.
"""
from __future__ import annotations

import logging
import os
import re
import resource
from dataclasses import dataclass
from typing import Optional

from ..config import ConfigError, Derived, RunConfig

log = logging.getLogger("archscale.train")

GIB = 2 ** 30
TERMS = ("weights", "gradients", "optimizer_master", "optimizer_states", "zero3_gathered_layers", "buffers",
         "activations", "step_transient")


@dataclass
class MemoryPlan:
    """What the fit check found: the planned peak per device and the memory there was (bytes)."""

    planned_peak: float
    available: float
    device: str  # "cuda" | "cpu"
    startup_rss: float = 0.0  # CPU: this process's RSS at the check (not in the plan)


def available_memory(device: torch.device) -> tuple[float, str]:
    """(bytes, what they are) this process may use on `device`."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return float(props.total_memory), f"{props.name}'s total memory"
    avail = _meminfo("MemAvailable")
    if avail is None:
        avail = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = f" / {local} processes" if local > 1 else ""
    return avail / local, f"available RAM (MemAvailable{share})"


def _meminfo(key: str) -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _rss() -> float:
    """This process's resident set now (bytes; 0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0.0


def fit_check(cfg: RunConfig, derived: Derived, device: "torch.device", world_size: int) -> Optional[MemoryPlan]:
    """The planned peak against the memory there is; ConfigError (one line) when it does not fit.
    None when the check is off (parallel.fit_check=false) or the planner cannot plan the config."""
    if not cfg.parallel.fit_check:
        log.warning("parallel.fit_check=false: the run's memory is not checked against the device's")
        return None
    kind = "cuda" if device.type == "cuda" else "cpu"
    avail, what = available_memory(device)
    p = _plan(cfg, world_size, _here(what, avail, derived.precision == "bf16", world_size), kind)
    if p is None:
        return None
    plan = MemoryPlan(planned_peak=p["memory"]["peak_gib"] * GIB, available=avail, device=kind,
                      startup_rss=_rss() if kind == "cpu" else 0.0)
    if not p["memory"]["fits"]:
        raise ConfigError(_refusal(p, what, avail, p.get("fix")))
    return plan


def _here(what: str, avail: float, bf16: bool, world_size: int):
    """A planner GPU standing for memory that is not a table GPU's (this host's RAM, a node's --mem)."""
    from ..commands.plan import GPU

    return GPU(name=what, memory_gib=avail / GIB, peak_tflops=1.0 if bf16 else None, nvlink_gbs=1.0,
               network_gbs=1.0, gpus_per_node=world_size, source="this machine", fp32_tflops=1.0)


def _plan(cfg: RunConfig, world_size: int, gpu, kind: str) -> Optional[dict]:
    from ..commands.plan import PlanError, plan_config

    try:
        return plan_config(cfg, gpus=world_size, gpu=gpu, device=kind)
    except PlanError as e:
        log.warning("fit check skipped: the planner cannot plan this config (%s)", e)
        return None


def submit_fit_check(cfg: RunConfig, *, nodes: int, tasks_per_node: int, gpus_per_node: int,
                     gpu: Optional[str] = None, mem: Optional[str] = None) -> Optional[dict]:
    """`archscale submit`'s check (the module docstring): ConfigError (one line) when the job's run
    does not fit; else its plan (None when off, unplannable, or a CPU job without --mem, or --mem=0: a
    node's whole memory, which the submitting machine cannot know)."""
    if not cfg.parallel.fit_check or (gpus_per_node <= 0 and not _mem_bytes(mem or "0")):
        return None
    from ..commands.plan import get_gpu
    from ..config import derive

    world = nodes * tasks_per_node
    if gpus_per_node > 0:
        try:
            g = get_gpu(gpu or "h100-80gb")
        except ValueError as e:
            raise ConfigError(f"--gpu: {e}") from None
        p = _plan(cfg, world, g, "cuda")
        what, avail = f"the memory of the job's GPU kind {g.name} (--gpu {gpu or 'h100-80gb'})", g.memory_gib * GIB
    else:
        avail = _mem_bytes(mem) / max(1, tasks_per_node)
        what = f"--mem={mem} per node" + (f" / {tasks_per_node} tasks" if tasks_per_node > 1 else "")
        bf16 = derive(cfg, world).precision == "bf16"
        p = _plan(cfg, world, _here(what, avail, bf16, world), "cpu")
    if p is not None and not p["memory"]["fits"]:
        raise ConfigError(_refusal(p, what, avail, p.get("fix"), escape="pass --no-fit-check (parallel.fit_check=false)"))
    return p


def _mem_bytes(text: str) -> Optional[float]:
    """Slurm's --mem (a number of MB, or with a K/M/G/T suffix) in bytes; None when it cannot be read."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        return None
    return float(m.group(1)) * 1024 ** "KMGT".index((m.group(2) or "M").upper() or "M") * 1024


def _refusal(p: dict, what: str, avail: float, fix: Optional[dict], escape: str = "set parallel.fit_check=false") -> str:
    """One line: the planned peak, the memory, the biggest term, the fix (or why there is none)."""
    mem = p["memory"]
    stage = mem["stages"][mem["binding_stage"]]
    term = max(TERMS, key=lambda k: stage.get(k) or 0.0)
    if fix and fix.get("change"):
        knobs = f"set {fix['change']} (planned {fix['peak_gib']:.2f} GiB)"
    else:
        knobs = "shorten objective.seq_length or lower parallel.micro_batch_size (the planner's fix search " \
                f"found none: {(fix or {}).get('reason', 'not run')})"
    return (f"this run does not fit: the planner's peak is {mem['peak_gib']:.2f} GiB per device "
            f"(largest term: {term} {stage[term]:.2f} GiB) and {what} is {avail / GIB:.2f} GiB "
            f"({mem['usable_gib']:.2f} GiB usable after {p['hardware']['headroom']:.0%} headroom): {knobs}; "
            f"or {escape} to run anyway")


def memory_record(plan: Optional[MemoryPlan], device: torch.device) -> dict:
    """The first metrics line's memory keys: the planned peak against the measured one (GiB)."""
    if plan is None:
        return {}
    if plan.device == "cuda":
        import torch

        return {"planned_peak_gib": plan.planned_peak / GIB,
                "measured_peak_gib": torch.cuda.max_memory_allocated(device) / GIB}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"planned_peak_gib": plan.planned_peak / GIB, "measured_peak_gib": peak / GIB,
            "startup_rss_gib": plan.startup_rss / GIB}
