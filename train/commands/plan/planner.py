"""The plan of one run config: memory stage by stage, step time, the warnings, and the fix when
it does not fit."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from . import fix as _fix
from .activations import activation_bytes, resolve_loss_impl
from .hardware import DEFAULT_HEADROOM, GIB, GPU, REPO, get_gpu
from .memory import (adafactor_is_flat, adafactor_state_bytes, buffer_bytes, model_state_bytes, optimizer_wrapper,
                     pipeline_buffer_bytes)
from .mfu import CHECKPOINT_POLICIES
from .shapes import largest_layer_params, numel, pipeline_parts, stage_shapes
from .timing import step_time

if TYPE_CHECKING:
    from ...registry import ArchSpec, Lengths


class PlanError(ValueError):
    """A configuration the planner (or the config machinery) cannot plan; one line."""


def _load(config_path, overrides):
    from ...config import load_config_with_origins

    cfg, _ = load_config_with_origins(config_path, list(overrides))
    return cfg


@dataclass
class _Run:
    """What a run config resolves to before anything is counted."""

    spec: "ArchSpec"        # its registry entry
    model_config: Any       # the model_zoo config
    n_blocks: int           # blocks a pipeline splits
    d: Any                  # train.config.derive's numbers
    preset: dict            # the DeepSpeed preset ({} when its path is not here)
    grad_accum: Optional[str]  # the gradient accumulation dtype DeepSpeed runs with
    sub_group: float        # ZeRO-3 sub_group_size
    lengths: "Lengths"      # the row shape
    policy: str             # activation checkpointing: none / full / selective
    loss_impl: str          # the loss implementation the model resolves on CUDA


def _resolve(cfg, gpus: int, vocab: Optional[int], g: GPU, device: str = "cuda") -> _Run:
    """The registry entry, model config, derived numbers and preset of `cfg` on GPUs `g`
    (precision=auto resolves to bf16 where `g` has it, else fp32); PlanError for a config that
    cannot run at all."""
    from ... import registry
    from ...config import ConfigError, derive
    from ...config.presets import load_preset

    spec = registry.get(cfg.model.arch)
    model_config = spec.make_config(cfg.model, vocab)
    n_blocks = spec.num_layers(model_config)
    try:
        d = derive(cfg, gpus, num_layers=n_blocks, bf16_supported=g.has_bf16)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    if d.pipeline_stages > 1 and spec.pipeline_refusal(model_config):  # what the trainer refuses (check_pipeline)
        raise PlanError(spec.pipeline_refusal(model_config))
    _check_precision(cfg, d.precision, g)
    try:
        preset = load_preset(d.ds_preset)
    except Exception:  # a preset path that is not here: plan with DeepSpeed's defaults
        preset = {}
    grad_accum = (preset.get("data_types") or {}).get("grad_accum_dtype")
    if d.zero_stage == 0:
        grad_accum = None  # ds_config.py drops it: DeepSpeed has no bf16 + fp32 accumulation without ZeRO
    sub_group = float((preset.get("zero_optimization") or {}).get("sub_group_size", 1e9))
    lengths = spec.row_lengths(cfg.objective)
    policy = cfg.parallel.checkpoint_policy if cfg.parallel.activation_checkpointing else "none"
    try:
        loss_impl = resolve_loss_impl(model_config.loss_impl, device, d.micro_batch_size * lengths.decoder,
                                      model_config.d_model)
    except ValueError as e:
        raise PlanError(str(e)) from None
    if policy not in CHECKPOINT_POLICIES:
        raise PlanError(f"parallel.checkpoint_policy={cfg.parallel.checkpoint_policy!r} is not valid; choose one of "
                        f"full, selective")
    return _Run(spec, model_config, n_blocks, d, preset, grad_accum, sub_group, lengths, policy, loss_impl)


def _check_precision(cfg, precision: str, g: GPU) -> None:
    """bf16 asked for (parallel.precision or the named preset's bf16.enabled) on a GPU without
    it: PlanError with the fix. The trainer has bf16 and fp32 paths only (no fp16 loss scaling),
    so there is nothing narrower than fp32 to fall back to on a V100."""
    if precision != "bf16" or g.has_bf16:
        return
    asked = "parallel.precision=bf16" if cfg.parallel.precision == "bf16" else \
        f"parallel.ds_preset={cfg.parallel.ds_preset} (bf16.enabled)"
    fix = "set parallel.precision=fp32 (or leave it auto: fp32 on this GPU)" if cfg.parallel.precision == "bf16" \
        else "name a preset without bf16 (zero0-zero3) or none, with parallel.precision=auto or fp32"
    raise PlanError(f"{asked} on {g.name}, which has no bf16 (the trainer has no fp16 path): {fix}")


def _precision_note(g: GPU, precision: str, peak: float) -> Optional[str]:
    """One line saying which precision the plan assumed, for a GPU without bf16; None otherwise."""
    if g.has_bf16:
        return None
    fp16 = f"; its {g.fp16_tflops:g} TFLOP/s fp16 tensor peak goes unused" if g.fp16_tflops else ""
    return (f"{g.name} has no bf16: planned in {precision} at {peak:g} TFLOP/s dense, {precision} sizes for weights, "
            f"gradients and activations (the trainer has no fp16 path{fp16})")


def _stage(cfg, run: _Run, s: int, parts: list[int], wrapper: str, largest: int, device: str = "cuda") -> dict:
    """Bytes per GPU of pipeline stage `s` (the layers parts[s]:parts[s + 1]): model states,
    buffers, activations of the micro-batches in flight, and the peak (package docstring)."""
    d, o, mc = run.d, cfg.optim, run.model_config
    S, N, M = d.pipeline_stages, d.data_parallel_size, d.gradient_accumulation_steps
    layers = list(range(parts[s], parts[s + 1]))
    shapes = stage_shapes(mc, layers)
    P = numel(shapes)
    if o.name == "adafactor":
        sb = adafactor_state_bytes(shapes, flat=adafactor_is_flat(wrapper), beta1=o.beta1 is not None)
    else:
        sb = 8.0 * P
    ms = model_state_bytes(P, zero_stage=d.zero_stage, dp=N, precision=d.precision, optimizer=o.name,
                           state_bytes=sb, largest_layer=largest, offload_optimizer=d.offload_optimizer,
                           offload_param=d.offload_param, pipeline_stages=S, grad_accum_dtype=run.grad_accum,
                           sub_group_size=run.sub_group)
    act = activation_bytes(mc, run.lengths, d.micro_batch_size, d.precision, run.policy, layers, cfg.model.attn_impl,
                           device, cpu_mask=device == "cpu")
    in_flight = min(S - s, M) if S > 1 else 1
    buffers = buffer_bytes(d.zero_stage, d.precision, run.preset, N)
    if S > 1:  # DeepSpeed's pipeline buffers: max(2, in flight) inputs and outputs of the stage
        buffers += pipeline_buffer_bytes(d.precision, d.micro_batch_size, run.spec.pipeline_carry_tokens(run.lengths),
                                         mc.d_model, in_flight)
    activations = in_flight * act["saved"] + act["working"]
    peak = ms.persistent + buffers + max(activations, ms.gradients_step)
    return {
        "stage": s, "layers": [parts[s], parts[s + 1]], "parameters": P,
        "weights": ms.weights, "gradients": ms.gradients, "optimizer_master": ms.master,
        "optimizer_states": ms.optimizer_states, "zero3_gathered_layers": ms.gathered_layers,
        "buffers": buffers, "activations_saved_per_micro_batch": act["saved"], "micro_batches_in_flight": in_flight,
        "activations_working": act["working"], "activations": activations,
        "step_transient": ms.gradients_step, "peak": peak, "host_offload": ms.host,
    }


def plan_config(cfg, *, gpus: int = 1, gpu: "str | GPU" = "h100-80gb", headroom: float = DEFAULT_HEADROOM,
                mfu: Optional[float] = None, bandwidth_gbs: Optional[float] = None, vocab: Optional[int] = None,
                bench_dir: Path = REPO / "bench", fix: bool = True, device: str = "cuda") -> dict:
    """The plan of one run config on `gpus` GPUs of kind `gpu` (a name of the GPU table or a
    hardware.GPU, e.g. from --gpu-spec), as a JSON-ready dict.

    device="cpu" plans the memory of a run on CPUs (the trainer's start-up fit check, with `gpu`
    standing for the host's memory): the loss and attention as they run there (dense loss, SDPA's
    fp32 mask per block: activations.layer_activation_bytes).

    Raises PlanError (with the config machinery's message) for a config that cannot run at all.
    """
    g = get_gpu(gpu)
    run = _resolve(cfg, gpus, vocab, g, device)
    d, mc = run.d, run.model_config
    parts = pipeline_parts(mc, d.pipeline_stages, cfg.parallel.pipeline_partition)
    largest = largest_layer_params(mc)
    wrapper = optimizer_wrapper(d.precision, d.zero_stage, d.pipeline_stages, run.grad_accum, d.offload_optimizer)
    usable = g.memory_gib * GIB * (1 - headroom)
    stages = [_stage(cfg, run, s, parts, wrapper, largest, device) for s in range(d.pipeline_stages)]
    worst = max(stages, key=lambda x: x["peak"])
    fits = worst["peak"] <= usable
    multi_node = gpus > g.gpus_per_node
    bw = bandwidth_gbs or (g.network_gbs if multi_node else g.nvlink_gbs)
    if bw is None:
        raise PlanError(f"{gpus} GPUs span nodes of {g.gpus_per_node} and --gpu-spec gives no network_gbs: add "
                        f"network_gbs=... (GB/s per GPU between nodes) to --gpu-spec, or pass --bandwidth")
    try:
        peak = g.peak_for(d.precision)
    except ValueError as e:
        raise PlanError(str(e)) from None
    flops = (run.spec.row_flops(mc, cfg.objective), run.spec.step_flops(mc, cfg.objective, d.global_batch_size))
    time = step_time(cfg, d, mc, run.lengths, flops, run.policy, g, gpus, worst["parameters"], bw, run.grad_accum,
                     mfu, bench_dir)
    interconnect = "network (per GPU, between nodes)" if multi_node and not bandwidth_gbs else \
        ("given" if bandwidth_gbs else f"{g.link} (one node)")
    plan = {
        "schema": 1,
        "model": _model_section(cfg, run, largest),
        "objective": {"name": cfg.objective.name, "encoder_tokens": run.lengths.encoder,
                      "decoder_tokens": run.lengths.decoder, "tokens_per_row": d.tokens_per_sequence},
        "hardware": {"gpu": g.name, "gpus": gpus, "memory_gib": g.memory_gib, "peak_tflops": peak,
                     "precision": d.precision, "precision_note": _precision_note(g, d.precision, peak),
                     "bf16_tflops": g.peak_tflops, "fp32_tflops": g.fp32_tflops, "fp16_tflops": g.fp16_tflops,
                     "headroom": headroom, "usable_gib": usable / GIB, "interconnect_gbs": bw,
                     "interconnect": interconnect, "gpu_spec": g.spec or None, "source": g.source},
        "parallel": _parallel_section(cfg, run, wrapper),
        "memory": {"stages": [{k: (v / GIB if isinstance(v, float) else v) for k, v in st.items()} for st in stages],
                   "binding_stage": worst["stage"], "peak_gib": worst["peak"] / GIB, "usable_gib": usable / GIB,
                   "fits": fits, "margin_gib": (usable - worst["peak"]) / GIB, "unit": "GiB"},
        "time": time,
        "warnings": _warnings(cfg, d, wrapper, adafactor_is_flat(wrapper)),
        "fix": None,
    }
    if not fits and fix:
        plan["fix"] = find_fix(cfg, gpus=gpus, gpu=g, headroom=headroom, vocab=vocab, bench_dir=bench_dir,
                               mfu=mfu, bandwidth_gbs=bandwidth_gbs, device=device)
    return plan


def _model_section(cfg, run: _Run, largest: int) -> dict:
    mc = run.model_config
    return {"arch": cfg.model.arch, "size": cfg.model.size, "parameters": run.spec.num_params(mc),
            "vocab_size": mc.vocab_size, "layers": run.n_blocks, "largest_layer_parameters": largest,
            "loss_impl": mc.loss_impl, "loss_impl_resolved": run.loss_impl, "loss_chunk_size": mc.loss_chunk_size}


def _parallel_section(cfg, run: _Run, wrapper: str) -> dict:
    d = run.d
    return {"zero_stage": d.zero_stage, "offload_optimizer": d.offload_optimizer,
            "offload_param": d.offload_param, "pipeline_stages": d.pipeline_stages, "data_parallel": d.data_parallel_size,
            "micro_batch_size": d.micro_batch_size, "gradient_accumulation_steps": d.gradient_accumulation_steps,
            "global_batch_size": d.global_batch_size, "precision": d.precision, "ds_preset": d.ds_preset,
            "activation_checkpointing": cfg.parallel.activation_checkpointing,
            "checkpoint_policy": run.policy, "optimizer": cfg.optim.name, "optimizer_wrapper": wrapper,
            "grad_accum_dtype": run.grad_accum}


def _warnings(cfg, d, wrapper: str, flat: bool) -> list[str]:
    out = []
    if cfg.optim.name == "adafactor" and flat:
        out.append(f"Adafactor runs on flat partitions under {wrapper}: its second moment is NOT factored "
                   f"(4 bytes/parameter, counted so) and parameter scaling uses a partition's RMS - not the "
                   f"reference optimizer" + (" (train/config/derived.py refuses ZeRO>=1 without optim.allow_flat_adafactor, "
                                             "but not this pipeline/bf16 case)" if d.zero_stage == 0 else ""))
    return out



def find_fix(cfg, *, gpus: int, gpu: "str | GPU", headroom: float = DEFAULT_HEADROOM, vocab: Optional[int] = None,
             bench_dir: Path = REPO / "bench", mfu: Optional[float] = None,
             bandwidth_gbs: Optional[float] = None, device: str = "cuda") -> dict:
    """The first change (fix.FIX_ORDER) under which the run fits: {"change", "overrides", "peak_gib",
    "step_seconds", "gpu_hours", "warnings"}, or {"change": None, "reason", "tried"}.

    Single changes first, in order; then cumulatively: each change in order is kept when the
    config still validates with it, until the run fits."""
    def plan_once(new) -> dict:
        return plan_config(new, gpus=gpus, gpu=gpu, headroom=headroom, vocab=vocab, bench_dir=bench_dir,
                           mfu=mfu, bandwidth_gbs=bandwidth_gbs, fix=False, device=device)

    return _fix.search(cfg, plan_once, gpus=gpus, vocab=vocab, bf16_supported=get_gpu(gpu).has_bf16)


def plan(config_path: Optional[str] = None, overrides: Sequence[str] = (), **kwargs) -> dict:
    """`plan_config` of a YAML file + `a.b=c` overrides (the command line's arguments)."""
    from ...config import ConfigError

    try:
        cfg = _load(config_path, overrides)
    except (ConfigError, ValueError) as e:
        raise PlanError(str(e)) from None
    return plan_config(cfg, **kwargs)
