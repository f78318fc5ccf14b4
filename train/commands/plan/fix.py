"""The fix search: the first change of the parallel layout (FIX_ORDER) under which a run that
does not fit would fit."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


FIX_ORDER = ("zero", "micro_batch", "activation_checkpointing", "zero3", "pipeline_stages",
             "offload_optimizer", "offload_param")
"""Changes tried in this fixed order, cheapest (in step time) first:
zero: ZeRO-1, then ZeRO-2 (partitions optimizer states, then gradients; costs about nothing over
  data-parallel all-reduce; not with pipeline stages);
micro_batch: halve the micro-batch, repeatedly down to 1, keeping the global batch (more accumulation);
activation_checkpointing: selective checkpointing first (keeps each block's matmul and attention
  outputs, recomputes its pointwise work: about +5% compute, recompute_factor), then full (keeps
  only each block's input, recomputes the whole block: +1/3 compute); from selective, full;
zero3: partition the weights too (about 1.5x the communication of ZeRO-2);
pipeline_stages: double the stages (ZeRO <= 1; a bubble of (S-1)/(M+S-1));
offload_optimizer: optimizer states and step on the CPU (ZeRO >= 1; slow step);
offload_param: ZeRO-3 weights on the CPU too (the slowest).
Each single change is tried first; then they are combined cumulatively in the same order (a later
change of the same kind - a smaller micro-batch, full after selective checkpointing - replaces
the earlier one).
Changes that would hand Adafactor flat partitions (ZeRO >= 1, or pipeline stages in bf16) are
skipped unless optim.allow_flat_adafactor=true: the config refuses them too."""


def _candidates(cfg, gpus: int, n_blocks: int, bf16_supported: bool = True) -> list[tuple[str, list[str], str]]:
    """(description, overrides, kind) for each single change of FIX_ORDER that applies to `cfg`
    (precision=auto resolved as on the GPU: bf16 where it has bf16, else fp32)."""
    from ...config.presets import resolve_parallel

    p = cfg.parallel
    par = resolve_parallel(p, bf16_supported=bf16_supported)
    base = ["parallel.ds_preset=null", f"parallel.zero_stage={par.zero_stage}",
            f"parallel.offload_optimizer={str(par.offload_optimizer).lower()}",
            f"parallel.offload_param={str(par.offload_param).lower()}", f"parallel.precision={par.precision}"]
    if p.global_batch_size is None:  # keep the global batch fixed while the micro-batch changes
        from ...config import derive

        d = derive(cfg, gpus, bf16_supported=bf16_supported)
        base += [f"parallel.global_batch_size={d.global_batch_size}", "parallel.gradient_accumulation_steps=null"]
    else:
        base += ["parallel.gradient_accumulation_steps=null"]
    out: list[tuple[str, list[str], str]] = []
    for kind in FIX_ORDER:
        n_before = len(out)
        if kind == "zero" and p.pipeline_stages == 1:
            for z in (1, 2):
                if z > par.zero_stage:
                    out.append((f"parallel.zero_stage={z}", [f"parallel.zero_stage={z}"]))
        elif kind == "micro_batch":
            mb = p.micro_batch_size // 2
            while mb >= 1:
                out.append((f"parallel.micro_batch_size={mb}", [f"parallel.micro_batch_size={mb}"]))
                mb //= 2
        elif kind == "activation_checkpointing":
            policies = ["selective", "full"] if not p.activation_checkpointing else \
                ["full"] if p.checkpoint_policy == "selective" else []
            for pol in policies:
                ov = ["parallel.activation_checkpointing=true", f"parallel.checkpoint_policy={pol}"]
                out.append((" ".join(ov), ov))
        elif kind == "zero3" and p.pipeline_stages == 1 and par.zero_stage < 3:
            out.append(("parallel.zero_stage=3", ["parallel.zero_stage=3"]))
        elif kind == "pipeline_stages" and par.zero_stage <= 1:
            s = p.pipeline_stages * 2
            while s <= min(gpus, n_blocks):
                if gpus % s == 0:
                    out.append((f"parallel.pipeline_stages={s}", [f"parallel.pipeline_stages={s}"]))
                s *= 2
        elif kind == "offload_optimizer" and not par.offload_optimizer:
            z = max(par.zero_stage, 2 if p.pipeline_stages == 1 else 1)
            out.append((f"parallel.zero_stage={z} parallel.offload_optimizer=true",
                        [f"parallel.zero_stage={z}", "parallel.offload_optimizer=true"]))
        elif kind == "offload_param" and not par.offload_param and p.pipeline_stages == 1:
            out.append(("parallel.zero_stage=3 parallel.offload_optimizer=true parallel.offload_param=true",
                        ["parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_param=true"]))
        out[n_before:] = [(desc, ov, kind) for desc, ov in out[n_before:]]
    return [(desc, base + ov, kind) for desc, ov, kind in out]



def search(cfg, plan_once: Callable[[Any], dict], *, gpus: int, vocab=None, bf16_supported: bool = True) -> dict:
    """find_fix's search (its docstring), planning each candidate with `plan_once(cfg) -> plan`."""
    from ... import registry
    from ...config import ConfigError

    spec = registry.get(cfg.model.arch)
    n_blocks = spec.num_layers(spec.make_config(cfg.model, vocab))
    keep_factored = cfg.optim.name == "adafactor" and not cfg.optim.allow_flat_adafactor

    def attempt(base, overrides: list[str]):
        try:
            new = _apply(base, overrides)
            p = plan_once(new)
        except (ConfigError, ValueError):  # PlanError is a ValueError
            return None, None
        if keep_factored and p["warnings"]:
            return None, None
        return new, p

    singles = _candidates(cfg, gpus, n_blocks, bf16_supported)
    tried = [desc for desc, _, _ in singles]
    for desc, ov, _ in singles:
        _, p = attempt(cfg, ov)
        if p is not None and p["memory"]["fits"]:
            return _fix_result(desc, ov, p)
    current, applied = cfg, {}  # kind -> description of the change of that kind kept so far
    for desc, ov, kind in singles:
        new, p = attempt(current, ov)
        if p is None:
            continue
        current = new
        applied.pop(kind, None)
        applied[kind] = desc
        if p["memory"]["fits"]:
            return _fix_result(" + ".join(applied.values()), _overrides_of(current), p)
    reason = "no change in the planner's list fits"
    if keep_factored:
        reason += (" while keeping Adafactor factored (ZeRO >= 1 and bf16 pipeline stages hand it flat "
                   "partitions): set optim.allow_flat_adafactor=true to let the planner use them, or use GPUs "
                   "with more memory")
    return {"change": None, "reason": reason, "tried": tried}


def _apply(cfg, overrides: list[str]):
    """A copy of `cfg` with `parallel.x=v` overrides (the only keys the fix search changes)
    applied and the section re-checked; cross-section rules are checked by `derive` in
    plan_config. (Not through YAML: pure-Python PyYAML made the search slow.)"""
    changes: dict[str, Any] = {}
    for text in overrides:
        key, _, raw = text.partition("=")
        section, _, name = key.partition(".")
        if section != "parallel" or not hasattr(cfg.parallel, name):
            raise ValueError(f"the fix search only changes parallel.*, got {text!r}")
        changes[name] = {"null": None, "true": True, "false": False}.get(raw, int(raw) if raw.isdigit() else raw)
    parallel = dataclasses.replace(cfg.parallel, **changes)
    parallel.check()
    return dataclasses.replace(cfg, parallel=parallel)


def _overrides_of(cfg) -> list[str]:
    p = cfg.parallel
    return [f"parallel.zero_stage={p.zero_stage}", f"parallel.offload_optimizer={str(bool(p.offload_optimizer)).lower()}",
            f"parallel.offload_param={str(bool(p.offload_param)).lower()}", f"parallel.pipeline_stages={p.pipeline_stages}",
            f"parallel.micro_batch_size={p.micro_batch_size}",
            f"parallel.activation_checkpointing={str(p.activation_checkpointing).lower()}",
            f"parallel.checkpoint_policy={p.checkpoint_policy}"]


def _fix_result(desc: str, overrides: list[str], p: dict) -> dict:
    return {"change": desc, "overrides": [o for o in overrides], "peak_gib": p["memory"]["peak_gib"],
            "step_seconds": p["time"]["step_seconds"], "gpu_hours": p["time"]["gpu_hours"],
            "warnings": p["warnings"]}

