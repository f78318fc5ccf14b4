"""Model-state bytes per GPU (weights, gradients, optimizer master and states) under the
DeepSpeed optimizer wrapper a configuration gets, and DeepSpeed's buffers (the package
docstring has the table)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .shapes import numel


def adafactor_state_bytes(shapes, flat: bool, beta1: bool) -> float:
    """Adafactor's state in bytes (fp32). Factored (per parameter, transformers' Adafactor):
    a matrix r x c keeps exp_avg_sq_row (r) and exp_avg_sq_col (c); a vector keeps exp_avg_sq.
    Flat (a DeepSpeed partition): exp_avg_sq of every element. beta1: + exp_avg of every element."""
    n = numel(shapes)
    second = 4.0 * n if flat else sum(4.0 * (s[0] + math.prod(s[1:])) if len(s) >= 2 else 4.0 * s[0] for s in shapes)
    return second + (4.0 * n if beta1 else 0.0)


def optimizer_wrapper(precision: str, zero_stage: int, pipeline_stages: int, grad_accum_dtype: Optional[str],
                      offload_optimizer: bool) -> str:
    """The optimizer wrapper DeepSpeed 0.19's engine builds (engine._do_optimizer_sanity_check;
    ds_config.py drops fp32 accumulation at ZeRO-0, and our optimizers are never FusedAdam)."""
    if zero_stage >= 1:
        if precision == "bf16" and grad_accum_dtype == "fp32" and zero_stage == 1 and not offload_optimizer:
            return "BF16_Optimizer"
        return f"ZeRO-{zero_stage}"
    if precision == "fp32":
        return "none"
    return "BF16_Optimizer" if pipeline_stages > 1 else "FP16_UnfusedOptimizer"


def adafactor_is_flat(wrapper: str) -> bool:
    """Whether the inner optimizer sees flat 1-D partitions instead of each parameter."""
    return wrapper not in ("none", "FP16_UnfusedOptimizer")


@dataclass
class ModelStates:
    """Bytes per GPU. `*_step` are allocated only during the optimizer step."""

    weights: float
    gradients: float
    master: float
    optimizer_states: float
    gathered_layers: float       # ZeRO-3: gathered parameters of the layers in use
    gradients_step: float        # fp32 gradient copies made for the optimizer step
    host: float                  # bytes per GPU held in CPU memory (offload)
    wrapper: str
    adafactor_flat: bool

    @property
    def persistent(self) -> float:
        return self.weights + self.gradients + self.master + self.optimizer_states + self.gathered_layers

    @property
    def peak(self) -> float:
        """Model states at the optimizer step: what DeepSpeed's estimators count."""
        return self.persistent + self.gradients_step


def model_state_bytes(num_params: int, *, zero_stage: int, dp: int, precision: str = "bf16",
                      optimizer: str = "adamw", state_bytes: Optional[float] = None,
                      largest_layer: int = 0, offload_optimizer: bool = False, offload_param: bool = False,
                      pipeline_stages: int = 1, grad_accum_dtype: Optional[str] = None,
                      sub_group_size: float = 1e9) -> ModelStates:
    """Model-state bytes per GPU for P = `num_params` (this stage's) over `dp` data-parallel ranks.

    state_bytes: optimizer state bytes for the whole P as the optimizer keeps it on unpartitioned
    parameters (AdamW: 8P if None; Adafactor: give the factored or flat figure). Partitioned wrappers
    divide it by dp. See the module docstring for the table this implements.
    """
    P, N = float(num_params), dp
    w = 2.0 if precision == "bf16" else 4.0
    wrapper = optimizer_wrapper(precision, zero_stage, pipeline_stages, grad_accum_dtype, offload_optimizer)
    S = 8.0 * P if state_bytes is None else float(state_bytes)
    gathered = grads_step = host = 0.0
    if wrapper == "none":
        weights, grads, master, states = 4 * P, 4 * P, 0.0, S
    elif wrapper == "FP16_UnfusedOptimizer":
        weights, grads, master, states, grads_step = 2 * P, 2 * P, 4 * P, S, 4 * P
    elif wrapper == "BF16_Optimizer":
        g = 4.0 if grad_accum_dtype == "fp32" else 2.0
        weights, grads, master, states = 2 * P, g * P, 4 * P / N, S / N
    elif zero_stage in (1, 2):
        weights = w * P
        grads = w * P if zero_stage == 1 else (0.0 if offload_optimizer else w * P / N)
        master, states, grads_step = 4 * P / N, S / N, 4 * P / N
        if offload_optimizer:
            host = master + states + grads_step
            master = states = grads_step = 0.0
    else:  # ZeRO-3
        weights, grads = w * P / N, w * P / N
        gathered = 2 * w * largest_layer
        master, states, grads_step = 4 * P / N, S / N, 4 * min(P / N, sub_group_size)
        if offload_optimizer:
            host = master + states + grads + 4 * P / N
            master = states = grads = grads_step = 0.0
        if offload_param:
            host += weights
            weights = 0.0
    return ModelStates(weights, grads, master, states, gathered, grads_step, host, wrapper,
                       optimizer == "adafactor" and adafactor_is_flat(wrapper))


def buffer_bytes(zero_stage: int, precision: str, preset: dict, dp: int) -> float:
    """DeepSpeed's communication buckets on the GPU (element counts from the preset, DeepSpeed's
    defaults of 5e8 when absent): ZeRO-2's contiguous reduce bucket, ZeRO-3's reduce bucket and
    prefetch bucket. ZeRO-1/2 all-gather the updated weights straight into the 16-bit weights'
    storage (no extra buffer counted)."""
    w = 2.0 if precision == "bf16" else 4.0
    z = preset.get("zero_optimization", {}) if preset else {}
    if zero_stage == 2:
        return w * float(z.get("reduce_bucket_size", 5e8))
    if zero_stage == 3:
        return w * (float(z.get("reduce_bucket_size", 5e8)) + float(z.get("stage3_prefetch_bucket_size", 5e7)))
    return 0.0



def pipeline_buffer_bytes(precision: str, micro_batch: int, carry_tokens: int, d_model: int, in_flight: int) -> int:
    """DeepSpeed's pipeline buffers on a stage: max(2, in flight) inputs and outputs, each
    `carry_tokens` (the registry's pipeline_carry_tokens of a row) x d_model activations per row."""
    a = 2 if precision == "bf16" else 4
    carried = a * micro_batch * carry_tokens * d_model
    return 2 * max(2, in_flight) * carried
