"""The weight mapping between model_zoo state dicts (absolute layer indices, no wrapper prefixes)
and the pipeline's layers: per stage, and per layer as DeepSpeed saves them."""
from __future__ import annotations

import glob
import os
import re
from typing import Iterator, Mapping

import torch
from deepspeed.pipe import TiedLayerSpec
from torch import Tensor, nn

from .context import ContextCache
from .specs import Plan, make_plan


def _local_layers(module: nn.Module, start: int) -> list[tuple[int, nn.Module]]:
    """(absolute layer index, module) of each layer held here that owns parameters it saves:
    plain layers and the first occurrence of a tied one (later ones are forward_fn partials)."""
    out = []
    for local_idx, fn in enumerate(module.forward_funcs):
        if isinstance(fn, nn.Module):
            out.append((start + local_idx, fn))
    return out


def _tied_modules(module: nn.Module, plan: Plan) -> list[tuple[tuple, nn.Module]]:
    """(model prefixes, module) of each tied module held here (whichever occurrence built it)."""
    out = []
    for key, mod in getattr(module, "tied_modules", {}).items():
        idx = next(i for i, s in enumerate(plan.specs) if isinstance(s, TiedLayerSpec) and s.key == key)
        out.append((plan.prefixes[idx], mod))
    return out


def _load_into(targets: list[tuple[tuple, nn.Module]], state: Mapping[str, Tensor]) -> None:
    for prefixes, mod in targets:
        local = {}
        for k in mod.state_dict():
            model_key = prefixes[0] + k
            if model_key not in state:
                raise KeyError(f"model state dict lacks {model_key!r} (pipeline layer {type(mod).__name__})")
            local[k] = state[model_key]
        mod.load_state_dict(local, strict=True)


def _export(targets: list[tuple[tuple, nn.Module]]) -> dict[str, Tensor]:
    out = {}
    for prefixes, mod in targets:
        for k, v in mod.state_dict().items():
            for p in prefixes:
                out[p + k] = v
    return out


class _PipelineWeights:
    """Weight mapping shared by ArchscalePipeline (DeepSpeed) and LocalPipeline (one process)."""

    plan: Plan

    def _targets(self) -> list[tuple[tuple, nn.Module]]:
        targets = [(self.plan.prefixes[i], m) for i, m in _local_layers(self, self._local_start)
                   if not isinstance(self.plan.specs[i], TiedLayerSpec)]
        return targets + _tied_modules(self, self.plan)

    def load_model_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy this stage's parameters from a model_zoo state dict (model.state_dict())."""
        _load_into(self._targets(), state)

    def model_state_dict(self) -> dict[str, Tensor]:
        """This stage's parameters under model_zoo keys (absolute layer indices, no prefixes of
        any wrapper); the tied embedding appears under each of its model keys. The union over all
        stages is a full model_zoo state dict."""
        return _export(self._targets())

    def named_model_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(model_zoo name, parameter) of this stage's parameters, each once (for optimizer
        parameter groups written against model_zoo names, e.g. no weight decay on norms)."""
        seen = set()
        for prefixes, mod in self._targets():
            for k, p in mod.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield prefixes[0] + k, p



def pipeline_to_model_state_dict(config, layer_states: Mapping[int, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per-layer states {pipeline layer index: that layer's state dict} (DeepSpeed's
    layer_XX-model_states.pt files) -> a model_zoo state dict (tied embedding under each name)."""
    plan = make_plan(config)
    out = {}
    for idx, state in layer_states.items():
        if not 0 <= idx < len(plan.specs):
            raise KeyError(f"layer index {idx} is outside the {len(plan.specs)} layers of this {config.arch} pipeline")
        for k, v in state.items():
            for p in plan.prefixes[idx]:
                out[p + k] = v
    return out


def model_to_pipeline_state_dicts(config, state: Mapping[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    """A model_zoo state dict -> {pipeline layer index: layer state dict}, laid out as DeepSpeed
    saves them (a tied module under the index of its first occurrence only)."""
    plan = make_plan(config, ContextCache())
    out, seen_tied = {}, set()
    for idx, spec in enumerate(plan.specs):
        if isinstance(spec, TiedLayerSpec):
            if spec.key in seen_tied:
                continue
            seen_tied.add(spec.key)
        names = spec.build().state_dict().keys()
        out[idx] = {k: state[plan.prefixes[idx][0] + k] for k in names}
    return out


_LAYER_FILE = re.compile(r"layer_(\d+)-(?:.*-)?model_states\.pt$")


def layer_states_from_files(directory: str) -> dict[int, dict[str, Tensor]]:
    """{layer index: its state dict} of a DeepSpeed pipeline checkpoint directory (the
    `layer_XX-model_states.pt` files in CHECKPOINT/TAG/)."""
    layer_states = {}
    for path in sorted(glob.glob(os.path.join(directory, "layer_*-model_states.pt"))):
        m = _LAYER_FILE.search(os.path.basename(path))
        if m:
            layer_states[int(m.group(1))] = dict(torch.load(path, map_location="cpu", weights_only=True))
    if not layer_states:
        raise FileNotFoundError(f"no layer_XX-model_states.pt files in {directory}: not a pipeline checkpoint")
    return layer_states


def model_state_dict_from_layer_files(config, directory: str) -> dict[str, Tensor]:
    """The model_zoo state dict from a DeepSpeed pipeline checkpoint directory, e.g. for
    `archscale export`."""
    return pipeline_to_model_state_dict(config, layer_states_from_files(directory))

