"""`archscale plan`: will a run fit, how long will it take, what will it cost - before it is submitted.

    archscale plan run.yaml parallel.zero_stage=2 --gpus 64 --gpu h100-80gb [--json]
    archscale plan --reference [--gpus 64 --gpu h100-80gb] [--json]

Everything is analytic: parameters from the model config (model_zoo.num_params; no model is
built), memory from byte counts per parameter and per activation, time from a FLOPs count
(model_zoo.train_flops) and a model-FLOPs-utilisation figure. Light on purpose: no DeepSpeed
import and no model (the tests compare it with DeepSpeed's own estimators and with meta models).
The formulas are documented in docs/planning.md; every number below names its source.

Memory per GPU (GiB = 2**30 bytes), for the stage of the pipeline that needs the most:

    peak = persistent model states + buffers
           + max(activations of the in-flight micro-batches + backward working set,
                 the optimizer step's transient tensors)

Model states follow the DeepSpeed optimizer wrapper the engine picks for the configuration
(mirroring `DeepSpeedEngine._do_optimizer_sanity_check`), with P parameters on the stage,
N data-parallel ranks, w = 2 (bf16) or 4 (fp32) bytes:

    wrapper (when)                           weights   gradients              fp32 master  states
    none (fp32, ZeRO-0)                      4P        4P                     -            S
    FP16_UnfusedOptimizer (bf16, ZeRO-0)     2P        2P (+4P at the step)   4P           S
    BF16_Optimizer (bf16: ZeRO-1 with fp32   2P        gP, g = accumulation   4P/N         S_flat/N
      accumulation = the `bf16` preset;        dtype bytes (4 / 2)
      ZeRO-0 with pipeline stages)
    ZeRO-1 (DeepSpeedZeroOptimizer)          wP        wP (+4P/N at the step) 4P/N         S/N
    ZeRO-2                                   wP        wP/N (+4P/N at step)   4P/N         S/N
    ZeRO-3                                   wP/N      wP/N (+4 min(P/N, sub_group) at step)  4P/N  S/N
      + gathered layers: 2 x w x the largest layer (DeepSpeed's estimator allows 4 bytes x it)
    offload_optimizer: master, states and fp32 gradients live on the CPU (ZeRO-1/2 keep their
      16-bit gradients on the GPU as above; ZeRO-2/3 reduce straight into CPU buffers);
    offload_param (ZeRO-3): weights live on the CPU, the gathered layers stay.

S = optimizer state bytes: AdamW 8P (exp_avg, exp_avg_sq, fp32); Adafactor factored (per
parameter with its shape: a row and a column of the second moment per matrix, 4 bytes each,
a full vector for 1-D parameters; + 4P for a first moment when optim.beta1 is set); Adafactor flat
(whenever DeepSpeed hands it flat partitions: ZeRO >= 1 and BF16_Optimizer): 4P (+4P with beta1).

Modules: hardware (the GPUs, --gpu-spec), mfu (measured / assumed MFU, checkpointing's recompute), shapes
(parameter shapes per pipeline layer, over the registry's layer layout; stage boundaries),
memory (model states, buffers), activations, timing (step time, communication), planner
(plan_config, plan, find_fix), fix (the fix search), reference (the reference experiment),
report (the text and the command).
"""
from __future__ import annotations

from .activations import (activation_bytes, head_loss_bytes, layer_activation_bytes, layer_selective_bytes,
                          resolve_loss_impl)
from .fix import FIX_ORDER, _apply, _candidates, _fix_result, _overrides_of
from .hardware import (DEFAULT_CPU_ADAM_PARAMS_PER_S, DEFAULT_HEADROOM, DEFAULT_PCIE_GBS, GIB, GPU, GPU_ALIASES, GPUS,
                       REPO, SPEC_KEYS, get_gpu, normalise_device, parse_gpu_spec)
from .memory import (ModelStates, adafactor_is_flat, adafactor_state_bytes, buffer_bytes, model_state_bytes,
                     optimizer_wrapper, pipeline_buffer_bytes)
from .mfu import (CHECKPOINT_POLICIES, DEFAULT_MFU, SELECTIVE_RECOMPUTE, _bench_entries, _bench_policy, _float,
                  _from_bench_row, measured_mfu, recompute_factor)
from .planner import PlanError, _load, _warnings, find_fix, plan, plan_config
from .reference import (REFERENCE_CELLS, REFERENCE_COMMON, REFERENCE_TOKENS, _reference_runs, format_reference,
                        reference_plan)
from .report import _gib, format_plan, main
from .shapes import (_tied_layers, largest_layer_params, model_shapes, numel, param_shapes, partition_balanced,
                     pipeline_layout, pipeline_parts, stage_shapes)
from .timing import _comm_seconds, pipeline_bubble, ring_seconds, step_time

__all__ = [
    "CHECKPOINT_POLICIES", "DEFAULT_CPU_ADAM_PARAMS_PER_S", "DEFAULT_HEADROOM", "DEFAULT_MFU", "DEFAULT_PCIE_GBS",
    "FIX_ORDER", "GIB", "GPU", "GPUS", "GPU_ALIASES", "ModelStates", "PlanError", "REFERENCE_CELLS",
    "REFERENCE_COMMON", "REFERENCE_TOKENS", "REPO", "SELECTIVE_RECOMPUTE", "activation_bytes", "adafactor_is_flat",
    "adafactor_state_bytes", "buffer_bytes", "find_fix", "format_plan", "format_reference", "get_gpu",
    "head_loss_bytes", "largest_layer_params", "layer_activation_bytes", "layer_selective_bytes", "main",
    "measured_mfu", "model_shapes", "model_state_bytes", "normalise_device", "numel", "optimizer_wrapper",
    "param_shapes", "partition_balanced", "pipeline_bubble", "pipeline_buffer_bytes", "pipeline_layout",
    "pipeline_parts", "plan", "plan_config", "recompute_factor", "reference_plan", "resolve_loss_impl",
    "ring_seconds", "stage_shapes", "step_time", "parse_gpu_spec", "SPEC_KEYS",
]
