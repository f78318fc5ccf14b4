"""Decay branches: a run that starts from *another* run's checkpoint and continues it under its own
schedule length (WSD-S, docs/resume.md "Decay branches"): one stable run gives several budgets.

    checkpoint.resume=STABLE/checkpoints/step-0000000S  schedule.name=wsd  schedule.max_steps=T
    schedule.decay_fraction=f    (T - round(f T) = S: train.config.branch_length(S, f))

`branch_of` decides at start-up. A checkpoint of this run's own checkpoints directory is an ordinary
resume (its state's `branch` record is carried on). A checkpoint of another run starts a branch:
the branch must be a continuation of its parent, so everything that shapes the steps must equal
the parent's saved config (model, objective, data, optimizer, the global batch, the schedule but
for its length) and its learning rate must equal the parent's on every step the parent already
took; anything else is refused in one line. The record {parent_run_dir, parent_checkpoint,
parent_step} goes to RUN/branch.json and into every checkpoint's trainer state.

The data stream needs nothing here: the parent's data position is resumed like any other
(the data section is equal, so the position means the same stream).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import yaml

from . import checkpointing as ckpt
from ..atomic import atomic_write_text
from ..config import ConfigError, Derived, RunConfig, config_to_yaml, from_dict
from ..config.sections import ScheduleConfig

BRANCH_FILE = "branch.json"
SCHEDULE_FREE = ("max_steps", "train_tokens", "decay_fraction")  # what a branch may change
DATA_FREE = ("cache_dir", "num_proc", "prefetch")  # how the data is read, not which stream
MODEL_KEYS = ("arch", "size", "overrides", "z_loss")
WHOLE = ("objective", "data", "optim", "schedule")


def branch_of(cfg: RunConfig, derived: Derived, layout: ckpt.RunLayout, resume_dir: Optional[Path],
              state: Optional[ckpt.TrainerState]) -> dict:
    """The run's branch record: {} for a run that is no branch; the saved one on a resume of its
    own checkpoint; a new one, after the continuation checks, for a start from another run's."""
    if state is None or resume_dir is None:
        return {}
    if Path(resume_dir).resolve().parent == layout.checkpoints.resolve():
        return dict(state.branch)
    check_continuation(cfg, derived, Path(resume_dir), state)
    parent_ckpts = Path(resume_dir).resolve().parent
    parent_run = parent_ckpts.parent if parent_ckpts.name == "checkpoints" else \
        Path(str((state.config or {}).get("run_dir", parent_ckpts.parent))).resolve()
    return {"parent_run_dir": str(parent_run), "parent_checkpoint": str(Path(resume_dir).resolve()),
            "parent_step": state.step}


def write_branch_file(root: Path, record: dict) -> None:
    """RUN/branch.json (rank 0, at start-up; rewritten with the same record on every resume)."""
    if record:
        atomic_write_text(Path(root) / BRANCH_FILE, json.dumps(record, indent=1) + "\n")


def check_continuation(cfg: RunConfig, derived: Derived, resume_dir: Path, state: ckpt.TrainerState) -> None:
    """Refuse, in one line, a branch that would not continue its parent's run step for step."""
    saved = state.config or {}
    now = yaml.safe_load(config_to_yaml(cfg))  # the same path the saved config took
    pairs = [("model", k) for k in MODEL_KEYS]
    for sec in WHOLE:
        free = SCHEDULE_FREE if sec == "schedule" else DATA_FREE if sec == "data" else ()
        pairs += [(sec, k) for k in sorted(set(now.get(sec) or {}) | set(saved.get(sec) or {})) if k not in free]
    for sec, key in pairs:
        before, after = (saved.get(sec) or {}).get(key), (now.get(sec) or {}).get(key)
        if before is not None and before != after:
            _refuse(resume_dir, f"{sec}.{key}={_show(before)}; this branch has {sec}.{key}={_show(after)}")
    glob = _global_batch(saved, state.world_size)
    if glob is not None and glob != derived.global_batch_size:
        _refuse(resume_dir, f"a global batch of {glob} rows; this branch has {derived.global_batch_size}")
    _same_rates(cfg, derived, resume_dir, state, saved)


def _refuse(resume_dir: Path, what: str) -> None:
    raise ConfigError(f"{resume_dir} is another run's checkpoint of {what}: a branch continues its parent "
                      f"(only schedule.{', schedule.'.join(SCHEDULE_FREE)} may differ); match the parent, "
                      f"or start a new run from its weights with init.from_checkpoint")


def _show(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _global_batch(saved: dict, world_size: int) -> Optional[int]:
    """The parent's global batch from its saved parallel section and world size (train.config.derive's rule)."""
    p = saved.get("parallel") or {}
    if not p:
        return None
    if p.get("global_batch_size"):
        return int(p["global_batch_size"])
    dp = max(1, world_size // int(p.get("pipeline_stages") or 1))
    return int(p.get("micro_batch_size") or 1) * int(p.get("gradient_accumulation_steps") or 1) * dp


def _same_rates(cfg: RunConfig, derived: Derived, resume_dir: Path, state: ckpt.TrainerState, saved: dict) -> None:
    """The branch's lr multiplier equals the parent's at every step the parent took (0 .. S-1):
    a wsd branch whose decay would start before S is refused, with the max_steps that fits."""
    from ..engine.ds_config import lr_multiplier

    parent = from_dict(ScheduleConfig, saved.get("schedule") or {}, where="schedule")
    parent_steps = parent.max_steps or math.ceil((parent.train_tokens or 0) / derived.tokens_per_step)
    for s in range(cfg.schedule.warmup_steps, state.step):  # the warmup is equal (checked above)
        mine, theirs = lr_multiplier(cfg.schedule, s, derived.max_steps), lr_multiplier(parent, s, parent_steps)
        if mine != theirs:
            fix = ""
            if cfg.schedule.name == "wsd":
                from ..config import branch_length

                fix = (f"; with schedule.decay_fraction={cfg.schedule.decay_fraction} use schedule.max_steps="
                       f"{branch_length(state.step, cfg.schedule.decay_fraction)} (decay from step {state.step})")
            raise ConfigError(f"{resume_dir} is at step {state.step}, but this branch's schedule gives step {s + 1} "
                              f"the lr multiplier {mine:.6g} where its parent trained it at {theirs:.6g}: a branch "
                              f"must agree with its parent on the steps the parent took{fix}")
