"""The PipelineModule (DeepSpeed) and its one-process twin, and building the pipeline engine."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from torch import nn

from .checks import PipelineConfigError, check_pipeline
from .context import ContextCache
from .loss import pipeline_loss
from .specs import make_plan
from .weights import _PipelineWeights

CHECKPOINTABLE_LAYERS = ["BlockLayer"]  # activation checkpointing recomputes blocks only


class ArchscalePipeline(_PipelineWeights, PipelineModule):
    """deepspeed.pipe.PipelineModule of a model_zoo config, with the model_zoo weight mapping.

    Use `build_pipeline_module` (which also copies a model's weights) or construct it from a
    config and load weights with `load_model_state_dict`.
    """

    def __init__(self, config, num_stages: Optional[int] = None, *, topology=None,
                 partition_method: str | Sequence[int] = "parameters", activation_checkpoint_interval: int = 0,
                 dynamic_shape: bool = False, **kwargs):
        if num_stages is None and topology is None:
            raise PipelineConfigError("give num_stages or a DeepSpeed topology")
        check_pipeline(config, num_stages if num_stages is not None else topology.get_dim("pipe"), 0,
                       partition_method, activation_checkpoint_interval)
        plan = make_plan(config, ContextCache())
        explicit = isinstance(partition_method, (list, tuple))
        object.__setattr__(self, "_explicit_parts", [int(b) for b in partition_method] if explicit else None)
        super().__init__(layers=plan.specs, num_stages=num_stages, topology=topology, loss_fn=pipeline_loss(config),
                         partition_method="uniform" if explicit else partition_method,
                         activation_checkpoint_interval=activation_checkpoint_interval,
                         checkpointable_layers=list(CHECKPOINTABLE_LAYERS), dynamic_shape=dynamic_shape, **kwargs)
        self.plan = plan
        self.model_config = config

    def _partition_layers(self, method="uniform"):
        """DeepSpeed's partitioning, plus explicit stage boundaries (a list of layer indices)."""
        if self._explicit_parts is None:
            return super()._partition_layers(method=method)
        self.parts = list(self._explicit_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


class LocalPipeline(_PipelineWeights, nn.Module):
    """All pipeline layers in one process, run in order as PipelineModule runs them, without
    DeepSpeed's engine or process groups: for tests and debugging of the layer chain.

    `forward(inputs)` runs every layer; `layers[i]` is layer i's callable (tied occurrences call
    the one shared module).
    """

    def __init__(self, config):
        super().__init__()
        self.plan = make_plan(config, ContextCache())
        self.cache = self.plan.cache
        self.model_config = config
        self._local_start = 0
        self.tied_modules = nn.ModuleDict()
        self.forward_funcs = []
        for idx, spec in enumerate(self.plan.specs):
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied_modules:
                    self.tied_modules[spec.key] = spec.build()
                mod = self.tied_modules[spec.key]
                self.forward_funcs.append(mod if spec.forward_fn is None else _Bound(spec.forward_fn, mod))
            else:
                mod = spec.build()
                self.add_module(str(idx), mod)
                self.forward_funcs.append(mod)

    def forward(self, inputs, start: int = 0, stop: Optional[int] = None):
        for fn in self.forward_funcs[start:stop]:
            inputs = fn(inputs)
        return inputs


class _Bound:
    """forward_fn bound to its tied module (a partial that is not an nn.Module, like DeepSpeed's)."""

    def __init__(self, fn, module):
        self.fn, self.module = fn, module

    def __call__(self, inputs):
        return self.fn(self.module, inputs)


# ========================================================================= building the engine
def build_pipeline_module(model: nn.Module, num_stages: Optional[int] = None, *, topology=None,
                          partition_method: str | Sequence[int] = "parameters", activation_checkpoint_interval: int = 0,
                          dynamic_shape: bool = False, **kwargs) -> ArchscalePipeline:
    """The PipelineModule of a model_zoo model (DecoderLM or EncoderDecoderLM) with its weights.

    Needs torch.distributed initialised (deepspeed.init_distributed) and LOCAL_RANK set (any
    launcher sets it). Every rank must pass the same weights (e.g. the same seed): each builds
    only its stage's layers and copies them from `model`. `partition_method`: parameters
    (default), uniform or type:REGEX. `activation_checkpoint_interval`: recompute every N layers
    (blocks only; a DeepSpeed config's pipeline.activation_checkpoint_interval > 0 overrides it).
    """
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model is on the meta device: build it with weights, or construct ArchscalePipeline "
                         "from its config and load a state dict with load_model_state_dict")
    module = ArchscalePipeline(model.config, num_stages, topology=topology, partition_method=partition_method,
                               activation_checkpoint_interval=activation_checkpoint_interval,
                               dynamic_shape=dynamic_shape, **kwargs)
    module.load_model_state_dict(model.state_dict())
    return module


def initialize_pipeline_engine(model: nn.Module, ds_config: dict, *, num_stages: int,
                               optimizer: Callable[[ArchscalePipeline], torch.optim.Optimizer],
                               lr_scheduler: Optional[Callable] = None, partition_method: str | Sequence[int] = "parameters",
                               activation_checkpoint_interval: int = 0, dynamic_shape: bool = False):
    """check_pipeline, build_pipeline_module, then deepspeed.initialize with a client optimizer.

    optimizer(module) -> torch optimizer over this stage's parameters (module.parameters(), or
    groups from module.named_model_parameters()); lr_scheduler(optimizer) -> scheduler or None.
    With ZeRO-1 and a client optimizer the DeepSpeed config needs
    "zero_allow_untested_optimizer": true. Returns DeepSpeed's PipelineEngine: train with
    `engine.train_batch(data_iter=pipeline_batches(batches, model.config))`.
    """
    import deepspeed

    zero = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    interval = ds_config.get("pipeline", {}).get("activation_checkpoint_interval") or activation_checkpoint_interval
    check_pipeline(model.config, num_stages, zero, partition_method, interval)
    module = build_pipeline_module(model, num_stages, partition_method=partition_method,
                                   activation_checkpoint_interval=activation_checkpoint_interval,
                                   dynamic_shape=dynamic_shape)
    opt = optimizer(module)
    sched = lr_scheduler(opt) if lr_scheduler is not None else None
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine
