"""DeepSpeed presets (readable JSON in ``ds_configs/``) and how a run's `parallel` section
resolves against one: the ZeRO stage, offload, precision and preset name. train.config.derive
checks these; train/engine/ds_config.py builds the DeepSpeed JSON from them. Light: json only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent.parent.parent / "ds_configs"

# Keys a preset must not set: the config derives them.
_DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "optimizer", "scheduler")

# DeepSpeed prints a line every `steps_per_print` steps; the trainer logs itself (progress bar,
# JSONL, TensorBoard), so keep DeepSpeed quiet.


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


def resolve_parallel(p: Any, *, bf16_supported: bool = False) -> ResolvedParallel:
    """ZeRO stage, offload flags, precision and preset, from `p` (a train.config.ParallelConfig; not
    imported here, which would make an import circle) and a named preset."""
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
