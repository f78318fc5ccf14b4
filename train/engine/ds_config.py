"""What the DeepSpeed engine is built from: the DeepSpeed config dict, the client optimizer, the LR schedule.

    d = derive(cfg, world_size)                      # train/config/derived.py: the one place for numbers
    ds = build_ds_config(cfg, d)                     # preset from ds_configs/ + values the config sets
    opt = build_optimizer(param_groups(model.named_parameters(), cfg.optim.weight_decay), cfg.optim, d)
    sched = build_lr_scheduler(opt, cfg.schedule, d.max_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)

The optimizer is always a client torch optimizer (torch AdamW, transformers' Adafactor, or
DeepSpeed's CPU Adam under optimizer offload), never DeepSpeed's config ``"optimizer"``: nothing
to compile on a CPU, and the same optimizer code under every ZeRO stage.

Presets are readable JSON files in ``ds_configs/`` (keys starting with ``_`` are documentation and
are dropped). The config determines the batch numbers, clipping, ZeRO stage, offload devices and
precision; a preset provides the rest (bucket sizes, overlap, prefetching). A named preset that
states a value the config sets explicitly to something else is an error, and presets must not
state batch sizes, clipping, an optimizer or a scheduler (those are derived, never hand-copied).

Light at import (json and the standard library); torch / transformers / deepspeed are imported
inside the functions that need them.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from train.atomic import atomic_write_text
from train.config import Derived, OptimConfig, RunConfig, ScheduleConfig, decay_steps
from train.config.presets import load_preset

_QUIET_STEPS = 1_000_000_000


def optimizer_kind(optim: OptimConfig, derived: Derived) -> str:
    """"torch_adamw" | "ds_cpu_adam" | "adafactor": what build_optimizer builds."""
    if optim.name == "adafactor":
        return "adafactor"
    if derived.offload_optimizer and optim.offload_cpu_adam:
        return "ds_cpu_adam"
    return "torch_adamw"


def build_ds_config(cfg: RunConfig, derived: Derived, *, load_universal: bool = False) -> dict:
    """The DeepSpeed config dict: the preset merged with the values the run config determines.

    load_universal: resume from a universal checkpoint (a different number of processes).
    """
    ds = copy.deepcopy(load_preset(derived.ds_preset))
    ds["train_batch_size"] = derived.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = derived.micro_batch_size
    ds["gradient_accumulation_steps"] = derived.gradient_accumulation_steps
    ds["gradient_clipping"] = float(cfg.optim.grad_clip)
    ds["steps_per_print"] = _QUIET_STEPS
    ds.setdefault("wall_clock_breakdown", False)

    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = derived.zero_stage
    for key, on in (("offload_optimizer", derived.offload_optimizer), ("offload_param", derived.offload_param)):
        if on:
            section = zero.get(key) or {}
            zero[key] = {**section, "device": section.get("device", "cpu") if section.get("device") in ("cpu", "nvme") else "cpu",
                         "pin_memory": section.get("pin_memory", True)}
        else:
            zero.pop(key, None)

    if derived.precision == "bf16":
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
        if derived.zero_stage == 0 and ds.get("data_types", {}).get("grad_accum_dtype") == "fp32":
            # DeepSpeed has no bf16 + fp32-accumulation path without ZeRO (NotImplementedError).
            ds["data_types"].pop("grad_accum_dtype")
    else:
        ds.pop("bf16", None)
        ds.pop("data_types", None)
    ds.pop("fp16", None)

    # We always hand DeepSpeed a client optimizer; ZeRO only "tests" its own.
    ds["zero_allow_untested_optimizer"] = True
    if derived.offload_optimizer and optimizer_kind(cfg.optim, derived) != "ds_cpu_adam":
        ds["zero_force_ds_cpu_optimizer"] = False  # else DeepSpeed refuses a torch optimizer under offload

    if derived.pipeline_stages > 1:
        pipe = ds.setdefault("pipeline", {})
        # full checkpointing through DeepSpeed's pipeline; selective runs inside each block
        # (train.engine.runtime.prepare_blocks)
        full = cfg.parallel.activation_checkpointing and cfg.parallel.checkpoint_policy == "full"
        pipe["activation_checkpoint_interval"] = 1 if full else 0
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def write_ds_config(ds: dict, path: str | Path) -> None:
    """Write the DeepSpeed config as indented JSON (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(ds, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule
# ----------------------------------------------------------------------------------------------

def param_groups(named_parameters: Iterable[tuple[str, Any]], weight_decay: float) -> list[dict]:
    """Two groups: matrices (decayed) and vectors/scalars such as norms and biases (not decayed)."""
    decay, no_decay = [], []
    for _, p in named_parameters:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: Any, optim: OptimConfig, derived: Derived):
    """The client torch optimizer for ``deepspeed.initialize(optimizer=...)``."""
    kind = optimizer_kind(optim, derived)
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=None if optim.relative_step else optim.lr, eps=tuple(optim.adafactor_eps),
                         clip_threshold=optim.clip_threshold, decay_rate=optim.decay_rate, beta1=optim.beta1,
                         weight_decay=optim.weight_decay, scale_parameter=optim.scale_parameter,
                         relative_step=optim.relative_step, warmup_init=optim.warmup_init)
    if kind == "ds_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                weight_decay=optim.weight_decay, adamw_mode=True)
    import torch

    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay)


def lr_multiplier(schedule: ScheduleConfig, step: int, max_steps: int) -> float:
    """lr(step) / optim.lr, for step = 0, 1, ... (the number of optimizer steps already taken).

    warmup: (step + 1) / warmup_steps for step < warmup_steps, so the first step is not at lr 0.
    cosine: min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * t)) / 2, t = progress after warmup in [0, 1].
    inverse_sqrt: sqrt(rsqrt_steps / max(step, rsqrt_steps)); with optim.lr = 0.01 and
    rsqrt_steps = 10^4 this is the reference's 1/sqrt(max(step, 10^4)).
    constant: 1.
    wsd: 1 up to step S = max_steps - D, D = round(decay_fraction * max_steps) (train/config/wsd.py),
    then linear: min_lr_ratio + (1 - min_lr_ratio) * (max_steps - step) / D, exactly 1 at step S and
    min_lr_ratio at max_steps (OLMo-core's WSD: linear, not 1-sqrt). The multiplier at S (the rate
    of step S + 1) is still the peak, as the stable run's there, so a decay branch resumed from the
    stable run's step-S checkpoint continues it exactly; decay_fraction = 0 never decays.
    """
    w = schedule.warmup_steps
    if step < w:
        return (step + 1) / w
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "wsd":
        d = decay_steps(max_steps, schedule.decay_fraction)
        if d == 0 or step <= max_steps - d:
            return 1.0
        r = schedule.min_lr_ratio
        return r + (1.0 - r) * max(0, max_steps - step) / d
    if schedule.name == "inverse_sqrt":
        n = schedule.rsqrt_steps
        return math.sqrt(n / max(step, n))
    t = min(1.0, (step - w) / max(1, max_steps - w))
    return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_lr_scheduler(optimizer, schedule: ScheduleConfig, max_steps: int, optim: Optional[OptimConfig] = None):
    """A torch LambdaLR over ``lr_multiplier``; None when Adafactor computes its own step size
    (``optim.relative_step``). DeepSpeed steps it once per optimizer step."""
    if optim is not None and optim.name == "adafactor" and optim.relative_step:
        return None
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(schedule, step, max_steps))


def sync_lr(scheduler) -> None:
    """Set every param group's lr to what ``scheduler`` (a LambdaLR) gives at its step now.

    After a load, the optimizer's groups hold the lr the *saving* run's schedule set, while the
    loaded scheduler state keeps only its step count (its lambda is this run's): without this, the
    first step after a resume would still run at the saver's rate. Equal to the saved value
    (bitwise: the same product base_lr * multiplier) when the schedule is unchanged; for a decay
    branch (another schedule.max_steps) it is the branch's rate from its first step on."""
    if scheduler is None:
        return
    lrs = [base * f(scheduler.last_epoch) for f, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
