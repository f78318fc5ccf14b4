"""The one engine object the trainer holds, plain or pipelined, behind the same calls.

A plain engine (every rank runs the whole model; data parallel, ZeRO) and a pipeline engine (each
rank runs one stage; data parallel across pipelines) answer the same calls with the same types,
so that the trainer (train/trainer/loop.py) and its callbacks never ask which kind they hold:

    train_batch(micro_batches) -> StepLosses   one optimizer step over this rank's micro-batches
    held_out_loss(batches) -> Optional[float]  the held-out loss of the model now, over every rank
                                               (None: no batch to score)
    save(step_dir), load(step_dir, ...)        DeepSpeed's files under step_dir/engine
    grad_norm() -> Optional[float]             the last step's global gradient norm, before clipping
    lr() -> float                              the learning rate of the last step
    module          the torch module this rank runs (the model, or its pipeline stage's layers)
    whole_model     the model_zoo model where this rank runs all of it, else None: what needs the
                    whole model in one forward (the non-finite guard's module locator, the
                    yardstick) asks for it and does without where it is None
    dp_rank, dp_size  this rank's data-parallel coordinates (the rows of the stream it reads)
    counts_rows     whether this rank counts the tokens and FLOPs of its rows (once per pipeline:
                    every stage reads the same rows)

`build_engine` is the one place that decides the kind (parallel.pipeline_stages > 1).

Pitfalls:
* A loss term a step does not measure is None on both kinds, never 0.0 (a 0.0 cross-entropy in
  metrics.jsonl would read as a perfect model): DeepSpeed's pipeline `train_batch` reports only
  the total loss, so a pipeline step's ce_loss and z_loss are None; a plain step's are the
  model's (its z_loss is 0.0 when config.z_loss is 0: the term is then measured, and zero).
* The held-out loss is the plain engine's mean cross-entropy per target token, but the pipeline
  engine's mean of its micro-batches' losses (DeepSpeed's eval_batch reports no token counts;
  its loss includes the z-loss term): equal only when every micro-batch has as many target
  tokens and z_loss is 0. Both are what the golden runs recorded (tests/test_golden.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from . import runtime as eng
from .runtime import StepLosses

__all__ = ["ENGINE_TAG", "UNIVERSAL_TAG", "Engine", "PipelineEngine", "PlainEngine", "StepLosses", "build_engine"]

ENGINE_TAG = "engine"  # DeepSpeed's tag: a checkpoint's engine files live in step-N/engine
UNIVERSAL_TAG = "engine_universal"  # the same files converted to DeepSpeed's universal checkpoint


class Engine:
    """What the two kinds share: a DeepSpeed engine (`ds`) with its checkpoint files, learning
    rate and gradient norm. Subclasses run the steps (module docstring)."""

    def __init__(self, ds: Any, device: torch.device, *, whole_model: Optional[torch.nn.Module], dp_rank: int,
                 dp_size: int, counts_rows: bool):
        self.ds, self.device, self.whole_model = ds, device, whole_model
        self.dp_rank, self.dp_size, self.counts_rows = dp_rank, dp_size, counts_rows

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def train_batch(self, micro_batches: list[dict]) -> StepLosses:
        raise NotImplementedError

    def held_out_loss(self, batches: list[dict]) -> Optional[float]:
        raise NotImplementedError

    def save(self, step_dir: Path) -> None:
        """This rank's engine files into step_dir/engine (collective: every rank calls it).
        save_latest=False: the trainer's checkpointing writes its own `latest`."""
        self.ds.save_checkpoint(str(step_dir), tag=ENGINE_TAG, save_latest=False)

    def load(self, step_dir: Path, *, universal: bool = False, schedule: bool = True) -> None:
        """Weights and optimizer state from step_dir/engine (strict: every key), or from its
        universal conversion (another number of processes); `schedule=False` keeps this run's
        learning-rate schedule (init.from_checkpoint with init.load_optimizer)."""
        self.ds.load_checkpoint(str(step_dir), tag=UNIVERSAL_TAG if universal else ENGINE_TAG,
                                load_module_strict=True, load_optimizer_states=True,
                                load_lr_scheduler_states=schedule)
        if schedule:  # the groups' lr as this run's schedule gives it at the loaded step (a decay branch's)
            from .ds_config import sync_lr

            sync_lr(self.ds.lr_scheduler)
        if universal:
            eng.untie_optimizer_steps(self.ds)  # DeepSpeed's ZeRO-3 universal load shares one step tensor

    def grad_norm(self) -> Optional[float]:
        return eng.grad_norm(self.ds)

    def lr(self) -> float:
        return self.ds.get_lr()[0]


class PlainEngine(Engine):
    """deepspeed.initialize over the whole model: every process is a data-parallel rank."""

    def train_batch(self, micro_batches: list[dict]) -> StepLosses:
        return eng.train_step(self.ds, micro_batches)

    def held_out_loss(self, batches: list[dict]) -> Optional[float]:
        """Sum of per-token cross-entropy / target tokens, both summed over every rank."""
        total, count = eng.all_sum(list(eng.eval_loss(self.ds.module, batches, self.device)), self.device)
        return total / count if count else None


class PipelineEngine(Engine):
    """DeepSpeed's PipelineEngine over train.engine.pipeline's stages of the model; `config` is
    the model_zoo config (pipeline_batches lays a batch out for the first and last stages)."""

    def __init__(self, ds: Any, device: torch.device, config):
        super().__init__(ds, device, whole_model=None, dp_rank=ds.grid.get_data_parallel_rank(),
                         dp_size=ds.grid.get_data_parallel_world_size(), counts_rows=ds.is_first_stage())
        self.config = config

    def train_batch(self, micro_batches: list[dict]) -> StepLosses:
        """The loss (cross-entropy + z-loss, averaged over micro-batches and data-parallel ranks)
        is known on every stage; its parts are not (None)."""
        from .pipeline import pipeline_batches

        loss = self.ds.train_batch(data_iter=iter(pipeline_batches(micro_batches, self.config)))
        return StepLosses(loss=float(loss), ce_loss=None, z_loss=None)

    @torch.no_grad()
    def held_out_loss(self, batches: list[dict]) -> Optional[float]:
        """The mean loss per micro-batch, already averaged over data-parallel ranks by DeepSpeed."""
        from .pipeline import pipeline_batches

        if not batches:
            return None
        loss = self.ds.eval_batch(data_iter=iter(pipeline_batches(batches, self.config)),
                                  num_micro_batches=len(batches))
        return float(loss) * len(batches) / float(len(batches))  # the arithmetic the golden runs recorded


def build_engine(cfg, model, derived, ds_config: dict, dist) -> Engine:
    """The engine of a run: a pipeline of parallel.pipeline_stages stages (weights copied from
    `model`), or the plain engine over `model`; activation checkpointing and compilation applied
    to the blocks this rank runs (prepare_blocks)."""
    par = cfg.parallel
    if derived.pipeline_stages > 1:
        return PipelineEngine(_initialize_pipeline(model, cfg, derived, ds_config), dist.device, model.config)
    eng.prepare_blocks(model, par.checkpoint_policy if par.activation_checkpointing else "none",
                       compile=cfg.model.compile)
    return PlainEngine(eng.initialize(model, cfg, derived, ds_config), dist.device, whole_model=model,
                       dp_rank=dist.rank, dp_size=dist.world_size, counts_rows=True)


def _initialize_pipeline(model, cfg, derived, ds_config: dict):
    """The DeepSpeed PipelineEngine over train.engine.pipeline's stages of `model` (weights copied)."""
    from . import pipeline
    from .ds_config import build_lr_scheduler, build_optimizer, param_groups

    def optimizer(module):
        return build_optimizer(param_groups(module.named_model_parameters(), cfg.optim.weight_decay), cfg.optim,
                               derived)

    par = cfg.parallel
    ds = pipeline.initialize_pipeline_engine(
        model, ds_config, num_stages=derived.pipeline_stages, optimizer=optimizer,
        lr_scheduler=lambda opt: build_lr_scheduler(opt, cfg.schedule, derived.max_steps, cfg.optim),
        partition_method=par.pipeline_partition,
        activation_checkpoint_interval=1 if par.activation_checkpointing and par.checkpoint_policy == "full" else 0)
    # selective checkpointing and compilation run inside each block of this stage
    selective = par.activation_checkpointing and par.checkpoint_policy == "selective"
    eng.prepare_blocks(ds.module, "selective" if selective else "none", compile=cfg.model.compile)
    return ds
