"""The text report of a plan and the `archscale plan` command."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from .hardware import DEFAULT_HEADROOM, GPUS, SPEC_SYNTAX, get_gpu, parse_gpu_spec
from .mfu import DEFAULT_MFU
from .planner import PlanError, plan
from .reference import format_reference, reference_plan
from ...config import split_config_args


def _gib(x: float) -> str:
    return f"{x:8.2f}"


def format_plan(p: dict) -> str:
    """The human-readable plan (what `archscale plan` prints without --json): the run, the memory
    table with its verdict and fix, then the time."""
    return "\n".join(_run_lines(p) + [""] + _memory_lines(p) + [""] + _time_lines(p))


def _run_lines(p: dict) -> list[str]:
    """model, hardware, layout and engine: what the plan is of."""
    m, h, par, t, ob = p["model"], p["hardware"], p["parallel"], p["time"], p["objective"]
    toks = (f"encoder {ob['encoder_tokens']} / decoder {ob['decoder_tokens']} tokens" if ob["encoder_tokens"]
            else f"{ob['decoder_tokens']} tokens")
    lines = [
        f"model      {m['arch'].upper()} {m['size']}: {m['parameters']:,} parameters (vocab {m['vocab_size']}, "
        f"{m['layers']} blocks); objective {ob['name']} ({toks} per row); loss {m['loss_impl_resolved']}"
        + (" (auto on CUDA)" if m["loss_impl"] == "auto" else "")
        + (f", chunks of {m['loss_chunk_size']} rows" if m["loss_impl_resolved"] == "chunked" else ""),
        f"hardware   {h['gpus']} x {h['gpu']}" + (f" (--gpu-spec {h['gpu_spec']})" if h.get("gpu_spec") else "")
        + f": {h['memory_gib']} GiB, {h['peak_tflops']:g} TFLOP/s {h.get('precision', 'bf16')} dense, "
        f"{h['interconnect_gbs']:g} GB/s {h['interconnect']}",
        f"layout     {par['pipeline_stages']} pipeline stage(s) x {par['data_parallel']} data-parallel; micro-batch "
        f"{par['micro_batch_size']} x accumulation {par['gradient_accumulation_steps']} = global "
        f"{par['global_batch_size']} rows ({t['tokens_per_step']:,} tokens/step)",
        f"engine     {par['precision']}, ZeRO-{par['zero_stage']}"
        + (" + optimizer offload" if par["offload_optimizer"] else "") + (" + param offload" if par["offload_param"] else "")
        + f", optimizer {par['optimizer']} under {par['optimizer_wrapper']}, activation checkpointing "
        + (par["checkpoint_policy"] if par["activation_checkpointing"] else "off") + f" (preset {par['ds_preset']})",
    ]
    if h.get("precision_note"):  # a GPU without bf16: which precision the plan assumed
        lines.insert(2, f"precision  {h['precision_note']}")
    return lines


_MEMORY_ROWS = [("parameters on the GPU's stage", "parameters"), ("weights", "weights"), ("gradients", "gradients"),
                ("optimizer: fp32 master", "optimizer_master"), ("optimizer: states", "optimizer_states"),
                ("ZeRO-3 gathered layers", "zero3_gathered_layers"), ("DeepSpeed buffers", "buffers"),
                ("activations / micro-batch", "activations_saved_per_micro_batch"),
                ("micro-batches in flight", "micro_batches_in_flight"), ("backward working set", "activations_working"),
                ("activations in all", "activations"), ("optimizer-step transient", "step_transient"),
                ("peak", "peak"), ("on the host (offload)", "host_offload")]


def _memory_lines(p: dict) -> list[str]:
    """The memory table (a column per pipeline stage), the verdict, the warnings and the fix."""
    h, mem = p["hardware"], p["memory"]
    lines = [f"{'memory per GPU (GiB)':<32}" + "".join(f"{'stage ' + str(s['stage']):>10}" for s in mem["stages"])]
    for label, key in _MEMORY_ROWS:
        vals = []
        for s in mem["stages"]:
            v = s[key]
            vals.append(f"{v / 1e9:9.3f}B" if key == "parameters" else f"{v:>10}" if isinstance(v, int) else f"{v:10.2f}")
        lines.append(f"  {label:<30}" + "".join(vals))
    verdict = "FITS" if mem["fits"] else "DOES NOT FIT"
    lines += [f"  usable: {h['memory_gib']} GiB - {h['headroom']:.0%} headroom = {mem['usable_gib']:.2f} GiB; "
              f"peak {mem['peak_gib']:.2f} GiB (stage {mem['binding_stage']}): {verdict} "
              f"({'margin' if mem['fits'] else 'short by'} {abs(mem['margin_gib']):.2f} GiB)"]
    lines += [f"  warning: {w}" for w in p["warnings"]]
    fix = p.get("fix")
    if fix is not None:
        if fix["change"]:
            lines.append(f"  fix: {fix['change']}  -> peak {fix['peak_gib']:.2f} GiB, step {fix['step_seconds']:.2f} s, "
                         f"{fix['gpu_hours']:,.0f} GPU-hours")
            lines += [f"  warning (with the fix): {w}" for w in fix.get("warnings", [])]
        else:
            lines.append(f"  fix: none found: {fix['reason']}")
    return lines


def _time_lines(p: dict) -> list[str]:
    """FLOPs per row, MFU, the step's compute / communication / offload seconds, wall time and GPU-hours."""
    par, t = p["parallel"], p["time"]
    return [
        f"time       {t['flops_per_row'] / 1e12:.2f} TFLOP per row (model_zoo.train_flops), MFU {t['mfu']:.2f} "
        f"[{t['mfu_source']}]" + (f", x{t['recompute_factor']:.3f} recompute ({par['checkpoint_policy']} checkpointing"
                                  + (f"; the MFU was measured with {t['mfu_checkpoint_policy']}"
                                     if t["mfu_checkpoint_policy"] != "none" else "") + ")"
                                  if t["recompute_factor"] != 1 else ""),
        f"           compute {t['compute_seconds']:.2f} s/step (incl. pipeline bubble {t['pipeline_bubble']:.1%}) + "
        f"communication {t['comm_seconds']:.2f} s ({t['comm_bytes_per_gpu'] / 1e9:.1f} GB/GPU, not overlapped: "
        + "; ".join(t["comm_detail"]) + ")" + (f" + offload {t['offload_seconds']:.2f} s" if t["offload_seconds"] else ""),
        f"           step {t['step_seconds']:.2f} s = {t['tokens_per_second']:,.0f} tokens/s; {t['max_steps']:,} steps "
        f"for {t['train_tokens']:,} tokens: {t['wall_hours']:,.1f} h wall, {t['gpu_hours']:,.0f} GPU-hours "
        f"({t['gpu_hours_overlapped']:,.0f} if communication overlapped compute fully)",
    ]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="archscale plan", description="Will a run fit, how long, how many GPU-hours "
                                 "(analytic; no GPU, no DeepSpeed, no model built). See docs/planning.md.")
    ap.add_argument("args", nargs="*", help="[CONFIG.yaml] then overrides a.b=c (defaults < file < overrides)")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs in the job (default 1; --reference: 64)")
    ap.add_argument("--gpu", default=None, help=f"GPU kind: {', '.join(GPUS)} (default h100-80gb; the table "
                    "with its sources: docs/planning.md)")
    ap.add_argument("--gpu-spec", default=None, metavar="K=V,...", help=f"a GPU the table lacks: {SPEC_SYNTAX} "
                    "(GiB, dense TFLOP/s, GB/s one way); with --gpu, overrides those fields of the named GPU")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--mfu", type=float, default=None, help="model-FLOPs utilisation to assume (default: measured "
                    f"in bench/ for this GPU, else {DEFAULT_MFU})")
    ap.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                    help=f"fraction of GPU memory kept free (default {DEFAULT_HEADROOM})")
    ap.add_argument("--bandwidth", type=float, default=None, help="interconnect GB/s per GPU (default: the GPU table)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the model size's, 32128 for "
                    "the reference sizes; the trainer takes it from the tokenizer)")
    ap.add_argument("--reference", action="store_true", help="the reference experiment's plan (docs/planning.md)")
    a = ap.parse_intermixed_args(argv)  # overrides may follow the options: CONFIG --gpu G a.b=c
    try:
        g = get_gpu(a.gpu or "h100-80gb") if a.gpu or not a.gpu_spec else None
        if a.gpu_spec is not None:
            g = parse_gpu_spec(a.gpu_spec, g)
        if a.reference:
            ref = reference_plan(a.gpus or 64, g if g.spec else g.name, mfu=a.mfu, headroom=a.headroom)
            ref["gpu"] = g.name + (f" (--gpu-spec {g.spec})" if g.spec else "")
            print(json.dumps(ref, indent=1) if a.json else format_reference(ref))
            return 0
        path, overrides = split_config_args(a.args)
        p = plan(path, overrides, gpus=a.gpus or 1, gpu=g, mfu=a.mfu, headroom=a.headroom,
                 bandwidth_gbs=a.bandwidth, vocab=a.vocab)
    except (PlanError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=1) if a.json else format_plan(p))
    return 0 if p["memory"]["fits"] else 1
