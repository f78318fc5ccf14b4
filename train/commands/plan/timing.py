"""Step time: compute at a model-FLOPs utilisation, the pipeline bubble, communication (ring
collectives, not overlapped) and optimizer offload."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .hardware import DEFAULT_CPU_ADAM_PARAMS_PER_S, DEFAULT_PCIE_GBS, GPU
from .mfu import DEFAULT_MFU, measured_mfu, recompute_factor

if TYPE_CHECKING:
    from ...registry import Lengths


def pipeline_bubble(stages: int, micro_batches: int) -> float:
    """Idle fraction of a synchronous 1F1B / GPipe pipeline: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def ring_seconds(nbytes: float, ranks: int, gbs: float) -> float:
    """One ring all-gather or reduce-scatter of a `nbytes` buffer over `ranks` ranks at `gbs`
    GB/s per rank: (ranks - 1) / ranks x nbytes / bandwidth. An all-reduce is two of these."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / (gbs * 1e9)



def _comm_seconds(d, model_config, lengths: "Lengths", stage_params: int, bw: float, grad_accum) -> dict:
    """Bytes each GPU sends per optimizer step and their time at `bw` GB/s, not overlapped with
    compute (an upper bound: ZeRO-2/3 overlap much of it). Ring collectives over the N data-parallel
    ranks of this stage's P parameters, w bytes per element:
      ZeRO-0/1: one all-reduce of the gradients at the accumulation boundary (2 rings; fp32 with
        BF16_Optimizer's fp32 accumulation), ZeRO-1 then all-gathers the updated weights instead of
        the all-reduce's second half;
      ZeRO-2: a reduce-scatter of the gradients every micro-batch + one all-gather of the weights;
      ZeRO-3: per micro-batch two all-gathers of the weights (forward, backward) + a reduce-scatter;
      pipeline: each stage boundary sends the activations forward and their gradients back
        (a B T D per micro-batch each way; ED: the encoder output too).
    """
    N, M, P = d.data_parallel_size, d.gradient_accumulation_steps, float(stage_params)
    w = 2.0 if d.precision == "bf16" else 4.0
    g = 4.0 if grad_accum == "fp32" else w
    if d.zero_stage <= 1:
        rings = [("gradient all-reduce", 2, g * P, 1)]
    elif d.zero_stage == 2:
        rings = [("gradient reduce-scatter per micro-batch", 1, w * P, M), ("weight all-gather", 1, w * P, 1)]
    else:
        rings = [("weight all-gathers per micro-batch", 2, w * P, M), ("gradient reduce-scatter per micro-batch", 1, w * P, M)]
    total_bytes = total_s = 0.0
    detail = []
    for name, n_rings, nbytes, times in rings:
        s = n_rings * times * ring_seconds(nbytes, N, bw)
        b = n_rings * times * (N - 1) / N * nbytes if N > 1 else 0.0
        total_s += s
        total_bytes += b
        detail.append(f"{name}: {b / 1e9:.2f} GB")
    if d.pipeline_stages > 1:
        act = w * d.micro_batch_size * (lengths.decoder + lengths.encoder) * model_config.d_model
        b = 2 * M * act
        total_bytes += b
        total_s += b / (bw * 1e9)
        detail.append(f"pipeline activations and gradients: {b / 1e9:.2f} GB")
    return {"bytes": total_bytes, "seconds": total_s, "detail": detail}



def step_time(cfg, d, model_config, lengths: "Lengths", flops: tuple[float, float], policy: str, g: GPU, gpus: int,
              stage_params: int, bw: float, grad_accum, mfu: Optional[float], bench_dir: Path) -> dict:
    """The plan's "time" section: one optimizer step of `d` (train.config.derive's numbers) on
    `gpus` x `g`; `flops`: per row and per step (the registry's row_flops / step_flops). Compute
    at the given, measured (bench/) or default MFU, scaled by the checkpointing policy's
    recompute and the pipeline bubble, + communication of the binding stage's `stage_params` at
    `bw` GB/s + optimizer offload; and the run's hours."""
    S, N, M = d.pipeline_stages, d.data_parallel_size, d.gradient_accumulation_steps
    flops_row, flops_step = flops
    bench = measured_mfu(g.name, cfg.model.arch, cfg.model.size, bench_dir) if mfu is None else None
    if mfu is not None:
        mfu_used, mfu_source = mfu, "given on the command line"
    elif bench is not None:
        mfu_used, mfu_source = bench["mfu"], f"measured ({bench['source']})"
    else:
        mfu_used, mfu_source = DEFAULT_MFU, f"assumed default {DEFAULT_MFU} (no bench/ measurement for {g.name})"
    # a measured MFU already includes the recompute of the policy it was measured with
    recompute = recompute_factor(policy) / recompute_factor(bench["checkpoint_policy"] if bench else "none")
    compute_s = flops_step / gpus / (mfu_used * g.peak_for(d.precision) * 1e12) * recompute  # bf16 or fp32 peak
    bubble = pipeline_bubble(S, M)
    compute_s /= (1 - bubble)
    comm = _comm_seconds(d, model_config, lengths, stage_params, bw, grad_accum)
    offload_s = 0.0
    if d.offload_optimizer:
        share = stage_params / N
        offload_s = share / DEFAULT_CPU_ADAM_PARAMS_PER_S + (2 + 4) * share / (DEFAULT_PCIE_GBS * 1e9)
        if d.offload_param:
            offload_s += 3 * 2 * share / (DEFAULT_PCIE_GBS * 1e9) * M
    step_s = compute_s + comm["seconds"] + offload_s
    step_overlapped_s = max(compute_s, comm["seconds"]) + offload_s  # the bound if communication hid fully
    tokens_step = d.tokens_per_step
    wall_s = d.max_steps * step_s
    return {"flops_per_row": flops_row, "flops_per_step": flops_step, "mfu": mfu_used, "mfu_source": mfu_source,
            "recompute_factor": recompute,
            "mfu_checkpoint_policy": bench["checkpoint_policy"] if bench else "none",
            "pipeline_bubble": bubble, "compute_seconds": compute_s,
            "comm_bytes_per_gpu": comm["bytes"], "comm_seconds": comm["seconds"], "comm_detail": comm["detail"],
            "offload_seconds": offload_s, "step_seconds": step_s, "tokens_per_step": tokens_step,
            "tokens_per_second": tokens_step / step_s, "max_steps": d.max_steps, "train_tokens": d.train_tokens,
            "wall_hours": wall_s / 3600, "gpu_hours": wall_s * gpus / 3600,
            "step_seconds_overlapped": step_overlapped_s,
            "gpu_hours_overlapped": d.max_steps * step_overlapped_s * gpus / 3600}
