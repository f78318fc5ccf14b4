"""What the DeepSpeed engine is built from: the DeepSpeed config dict, the client optimizer, the LR schedule.

    d = derive(cfg, world_size)                      # train/config.py: the one place for numbers
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from train.config import ConfigError, Derived, OptimConfig, ParallelConfig, RunConfig, ScheduleConfig

PRESET_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

# Keys a preset must not set: the config derives them.
_DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "optimizer", "scheduler")

# DeepSpeed prints a line every `steps_per_print` steps; the trainer logs itself (progress bar,
# JSONL, TensorBoard), so keep DeepSpeed quiet.
_QUIET_STEPS = 1_000_000_000


def list_presets() -> list[str]:
    """Names of the presets in ds_configs/."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _strip_docs(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _strip_docs(v) for k, v in d.items() if not str(k).startswith("_")}
    return d


def load_preset(name: str) -> dict:
    """A preset by name (``ds_configs/NAME.json``) or path, without its ``_doc`` keys."""
    path = Path(name) if (name.endswith(".json") or "/" in name) else PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"parallel.ds_preset={name!r}: no such preset; available: "
                          f"{', '.join(list_presets())} (or a path to a .json file)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed preset {path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed preset {path}: expected a JSON object")
    data = _strip_docs(data)
    bad = [k for k in _DERIVED_KEYS if k in data]
    if bad:
        raise ConfigError(f"DeepSpeed preset {name!r} sets {', '.join(bad)}: these are derived from the run "
                          f"config (parallel.*, optim.*), never hand-copied; remove them from the preset")
    if data.get("fp16", {}).get("enabled"):
        raise ConfigError(f"DeepSpeed preset {name!r} enables fp16: archscale trains in bf16 or fp32 "
                          f"(parallel.precision); remove the fp16 section")
    return data


@dataclass(frozen=True)
class ResolvedParallel:
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    precision: str       # "bf16" | "fp32"
    preset: str
    preset_named: bool


def _offload_stated(preset: dict, key: str) -> Optional[bool]:
    z = preset.get("zero_optimization", {})
    if key not in z:
        return None
    return (z[key] or {}).get("device", "none") in ("cpu", "nvme")


def _agree(name: str, what: str, explicit: Any, stated: Any, default: Any) -> Any:
    """The explicit config value, else the preset's, else the default; a contradiction is an error."""
    if explicit is not None and stated is not None and explicit != stated:
        raise ConfigError(f"parallel.ds_preset={name} sets {what}={stated} but parallel config says {explicit}: "
                          f"leave the parallel value unset (null) to follow the preset, or pick another preset")
    return explicit if explicit is not None else (stated if stated is not None else default)


def choose_preset(zero_stage: int, offload_optimizer: bool, offload_param: bool,
                  pipeline_stages: int, precision: str) -> str:
    """The preset whose settings match these values (the config then writes them explicitly anyway)."""
    if pipeline_stages > 1 and zero_stage == 1:
        return "pipeline"
    if zero_stage == 3 and offload_optimizer and offload_param:
        return "zero3_offload"
    if zero_stage == 2 and offload_optimizer:
        return "zero2_offload"
    if zero_stage == 1 and precision == "bf16" and not offload_optimizer:
        return "bf16"
    return f"zero{zero_stage}"


def resolve_parallel(p: ParallelConfig, *, bf16_supported: bool = False) -> ResolvedParallel:
    """ZeRO stage, offload flags, precision and preset, from the config and a named preset."""
    if p.ds_preset:
        preset = load_preset(p.ds_preset)
        name = p.ds_preset
        zero = _agree(name, "zero_optimization.stage", p.zero_stage,
                      preset.get("zero_optimization", {}).get("stage"), 0)
        off_opt = _agree(name, "offload_optimizer", p.offload_optimizer, _offload_stated(preset, "offload_optimizer"), False)
        off_par = _agree(name, "offload_param", p.offload_param, _offload_stated(preset, "offload_param"), False)
        stated_bf16 = preset.get("bf16", {}).get("enabled")
        explicit_bf16 = None if p.precision == "auto" else p.precision == "bf16"
        bf16 = _agree(name, "bf16.enabled", explicit_bf16, stated_bf16, bf16_supported)
        if zero not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.ds_preset={name} sets zero_optimization.stage={zero}: expected 0-3")
        return ResolvedParallel(int(zero), bool(off_opt), bool(off_par), "bf16" if bf16 else "fp32", name, True)
    zero = p.zero_stage or 0
    precision = p.precision if p.precision != "auto" else ("bf16" if bf16_supported else "fp32")
    off_opt, off_par = bool(p.offload_optimizer), bool(p.offload_param)
    return ResolvedParallel(zero, off_opt, off_par, precision,
                            choose_preset(zero, off_opt, off_par, p.pipeline_stages, precision), False)


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
        # (train.engine.prepare_blocks)
        full = cfg.parallel.activation_checkpointing and cfg.parallel.checkpoint_policy == "full"
        pipe["activation_checkpoint_interval"] = 1 if full else 0
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def write_ds_config(ds: dict, path: str | Path) -> None:
    """Write the DeepSpeed config as indented JSON (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ds, indent=2) + "\n")
    tmp.replace(path)


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
    """
    w = schedule.warmup_steps
    if step < w:
        return (step + 1) / w
    if schedule.name == "constant":
        return 1.0
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
