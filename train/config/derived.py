"""Derived numbers: the one place. ``derive`` computes and checks every number that follows from
the config and the world (data-parallel size, accumulation, steps, ZeRO stage, ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..errors import ConfigError
from .sections import ParallelConfig, RunConfig, ScheduleConfig

if TYPE_CHECKING:  # at run time derive imports it, with the registry, when called
    from train.config.presets import ResolvedParallel


@dataclass(frozen=True)
class Derived:
    """Numbers that follow from the config and the world; computed once by ``derive``."""

    world_size: int
    pipeline_stages: int
    data_parallel_size: int          # world_size / pipeline_stages
    micro_batch_size: int            # sequences per process per forward/backward
    gradient_accumulation_steps: int
    global_batch_size: int           # micro x accumulation x data-parallel
    tokens_per_sequence: int
    tokens_per_step: int             # global batch x tokens per sequence
    max_steps: int
    train_tokens: int                # tokens planned: max_steps x tokens_per_step (>= the budget); rows
                                     # carry tokens_per_sequence but for their padding
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    precision: str                   # "bf16" | "fp32"
    ds_preset: str                   # the preset name or path used for the DeepSpeed JSON
    ds_preset_named: bool            # True: named by the config; False: chosen from it


def derive(cfg: RunConfig, world_size: int, *, num_layers: Optional[int] = None,
           tokens_per_sequence: Optional[int] = None, bf16_supported: bool = False) -> Derived:
    """Compute and check every derived number before any work starts.

    world_size: processes in the job. num_layers: blocks the pipeline splits (for ED: encoder +
    decoder), from the model's size; None skips that check. tokens_per_sequence: tokens per
    row for the token budget; None = the registry's ``tokens_per_row(cfg.objective)``, the row
    shape's (train/objectives/rows.py), which is also the packer's total per row.
    bf16_supported: whether ``precision=auto`` may choose bf16 (a GPU that has it).
    Raises ConfigError naming the numbers and the fix.
    """
    from train.config import presets as ds_presets
    from train import registry  # light: json and dataclasses only at import

    try:  # the architecture and the objective fit each other (the registry says which do)
        registry.get(cfg.model.arch).check_objective(cfg.objective.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    p = cfg.parallel
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    stages = p.pipeline_stages
    # Problems of the config itself first: launching on another number of processes (the world
    # size check below) would not fix these.
    if num_layers is not None and stages > num_layers:
        raise ConfigError(f"parallel.pipeline_stages={stages} is more than the model's {num_layers} layers: "
                          f"use at most {num_layers} stages")
    par = ds_presets.resolve_parallel(p, bf16_supported=bf16_supported)
    _check_engine(cfg, par, stages)
    if world_size % stages:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.pipeline_stages={stages}: "
                          f"use a number of processes that is a multiple of {stages}")
    dp = world_size // stages
    acc, glob = _batch_sizes(p, dp)

    if tokens_per_sequence is None:  # the row shape's (train/objectives/rows.py): what the packer fills
        try:
            tokens_per_sequence = int(registry.get(cfg.model.arch).tokens_per_row(cfg.objective))
        except ValueError as e:  # lengths that do not fit each other (decoder mlm: seq_length)
            raise ConfigError(str(e)) from None
    tokens_per_step = glob * tokens_per_sequence
    steps = _max_steps(cfg.schedule, tokens_per_step)
    if cfg.schedule.name == "wsd":
        from .wsd import check_wsd

        check_wsd(cfg.schedule.warmup_steps, steps, cfg.schedule.decay_fraction)
    _check_offload(par)
    _check_optimizer(cfg, par, stages)
    return Derived(world_size=world_size, pipeline_stages=stages, data_parallel_size=dp,
                   micro_batch_size=p.micro_batch_size, gradient_accumulation_steps=acc, global_batch_size=glob,
                   tokens_per_sequence=tokens_per_sequence, tokens_per_step=tokens_per_step,
                   max_steps=steps, train_tokens=steps * tokens_per_step,
                   zero_stage=par.zero_stage, offload_optimizer=par.offload_optimizer,
                   offload_param=par.offload_param, precision=par.precision,
                   ds_preset=par.preset, ds_preset_named=par.preset_named)


def _check_engine(cfg: RunConfig, par: ResolvedParallel, stages: int) -> None:
    """What DeepSpeed's engines refuse: ZeRO-2/3 with pipeline stages, a compiled model under
    ZeRO-3. ``par``: the parallel section resolved against its preset (ds_presets.resolve_parallel)."""
    if par.zero_stage >= 2 and stages > 1:
        raise ConfigError(f"ZeRO stage {par.zero_stage} with parallel.pipeline_stages={stages}: DeepSpeed's "
                          f"pipeline engine refuses ZeRO-2 and ZeRO-3; use parallel.zero_stage=1 (or 0)")
    if cfg.model.compile and par.zero_stage == 3:
        raise ConfigError("model.compile=true with ZeRO-3: DeepSpeed gathers ZeRO-3 parameters in module hooks "
                          "that a compiled block would trace through; use parallel.zero_stage=1 or 2, or "
                          "model.compile=false")


def _batch_sizes(p: ParallelConfig, dp: int) -> tuple[int, int]:
    """(gradient accumulation steps, global batch size) from the parallel section ``p`` and the
    data-parallel size ``dp``: the one not given is derived, both given must agree."""
    micro, acc, glob = p.micro_batch_size, p.gradient_accumulation_steps, p.global_batch_size
    per_acc = micro * dp  # sequences per accumulation step over all data-parallel ranks
    if glob is None:
        acc = acc or 1
        glob = per_acc * acc
    elif acc is None:
        if glob % per_acc:
            raise ConfigError(
                f"parallel.global_batch_size={glob} is not divisible by micro_batch_size x data-parallel size "
                f"= {micro} x {dp} = {per_acc}: set global_batch_size to a multiple of {per_acc} "
                f"(e.g. {max(per_acc, glob // per_acc * per_acc)}) or change micro_batch_size")
        acc = glob // per_acc
    elif glob != per_acc * acc:
        raise ConfigError(
            f"parallel.global_batch_size={glob} != micro_batch_size x gradient_accumulation_steps x "
            f"data-parallel size = {micro} x {acc} x {dp} = {per_acc * acc}: give only one of "
            f"global_batch_size and gradient_accumulation_steps (set the other to null)")
    return acc, glob


def _max_steps(s: ScheduleConfig, tokens_per_step: int) -> int:
    """Optimizer steps from the schedule section ``s``: max_steps, or the token budget rounded up."""
    if s.max_steps is not None:
        return s.max_steps
    if s.train_tokens is not None:
        return math.ceil(s.train_tokens / tokens_per_step)
    raise ConfigError("no training length: set schedule.max_steps or schedule.train_tokens")


def _check_offload(par: ResolvedParallel) -> None:
    """Each offload needs its ZeRO stage (parameters: 3; optimizer states: >= 1)."""
    if par.offload_param and par.zero_stage != 3:
        raise ConfigError(f"parallel.offload_param needs ZeRO stage 3 (got {par.zero_stage}): set parallel.zero_stage=3")
    if par.offload_optimizer and par.zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer needs ZeRO stage >= 1: set parallel.zero_stage=1, 2 or 3")


def _check_optimizer(cfg: RunConfig, par: ResolvedParallel, stages: int) -> None:
    """Adafactor is refused where DeepSpeed hands it flat partitions (unless
    optim.allow_flat_adafactor), and with relative_step under a schedule other than constant."""
    o, s = cfg.optim, cfg.schedule
    flat_wrapper = None
    if par.zero_stage >= 1:
        flat_wrapper = f"ZeRO stage {par.zero_stage}"
    elif stages > 1 and par.precision == "bf16":
        flat_wrapper = "bf16 with pipeline stages (DeepSpeed's BF16_Optimizer, used by the pipeline engine)"
    if o.name == "adafactor" and flat_wrapper and not o.allow_flat_adafactor:
        raise ConfigError(
            f"optim.name=adafactor with {flat_wrapper}: DeepSpeed hands the optimizer flat 1-D "
            f"partitions, so Adafactor's second moment is not factored (a full exp_avg_sq, 4 bytes/parameter) "
            f"and its parameter scaling uses the RMS of a whole partition, not of each matrix - not the "
            f"reference optimizer. Use parallel.zero_stage=0 without pipeline stages (or in fp32), or accept it "
            f"with optim.allow_flat_adafactor=true")
    if o.name == "adafactor" and o.relative_step and s.name != "constant":
        raise ConfigError(f"optim.relative_step=true makes Adafactor ignore lr and schedule.name={s.name}: "
                          f"set schedule.name=constant, or relative_step=false with lr=0.01 and "
                          f"schedule.name=inverse_sqrt (the same math)")
