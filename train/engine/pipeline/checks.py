"""Settings DeepSpeed's pipeline engine cannot run, refused before any process group or model exists."""
from __future__ import annotations

from typing import Sequence

from .specs import arch_spec, layer_names, make_plan, num_blocks


class PipelineConfigError(ValueError):
    """A pipeline setting that cannot work, found before any process group or model is built."""


def check_pipeline(config, num_stages: int, zero_stage: int = 0, partition_method: str | Sequence[int] = "parameters",
                   activation_checkpoint_interval: int = 0) -> None:
    """Fail early, with a message that says what to change, on settings DeepSpeed's pipeline
    engine cannot run (it would fail later, after process groups and models exist): ZeRO 2/3,
    more stages than transformer blocks, an unknown partition method, bad explicit boundaries.

    partition_method: "parameters" (balance parameter counts), "uniform" (layer counts),
    "type:REGEX" (balance the layers whose class name matches, e.g. type:BlockLayer), or the
    stage boundaries as num_stages + 1 layer indices [0, ..., len(layers)] (see `layer_names`).
    """
    if not isinstance(num_stages, int) or num_stages < 1:
        raise PipelineConfigError(f"pipeline stages must be a positive integer, got {num_stages!r}")
    if zero_stage not in (0, 1):
        raise PipelineConfigError(
            f"ZeRO stage {zero_stage} cannot be combined with pipeline parallelism: DeepSpeed's pipeline engine "
            f"accepts ZeRO 0 or 1 only (it asserts 'ZeRO-2 and ZeRO-3 are incompatible with pipeline "
            f"parallelism'); use ZeRO stage 1 with the pipeline, or no pipeline with ZeRO {zero_stage}")
    refusal = arch_spec(config).pipeline_refusal(config)
    if refusal:
        raise PipelineConfigError(refusal)
    blocks = num_blocks(config)
    if num_stages > blocks:
        what = arch_spec(config).describe_blocks(config)
        raise PipelineConfigError(f"{num_stages} pipeline stages for a model of {what}: use at most {blocks} stages")
    if isinstance(partition_method, (list, tuple)):
        n = len(make_plan(config).specs)
        b = list(partition_method)
        if len(b) != num_stages + 1 or b[0] != 0 or b[-1] != n or any(x >= y for x, y in zip(b, b[1:])):
            raise PipelineConfigError(f"explicit stage boundaries {b} must be {num_stages + 1} increasing layer "
                                      f"indices from 0 to {n} (the {config.arch} pipeline has {n} layers: "
                                      f"{', '.join(layer_names(config))})")
    elif not (isinstance(partition_method, str) and (partition_method.lower() in ("parameters", "uniform")
                                                     or partition_method.lower().startswith("type:"))):
        raise PipelineConfigError(f"partition method {partition_method!r} is not valid; choose parameters, uniform, "
                                  f"type:REGEX (a layer class name, e.g. type:BlockLayer) or a list of stage "
                                  f"boundaries")
    if activation_checkpoint_interval < 0:
        raise PipelineConfigError(f"activation checkpoint interval must be >= 0, got {activation_checkpoint_interval}")
