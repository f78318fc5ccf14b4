"""`python -m bench --profile DIR`: where each model's training step spends its time.

For every archscale row of the benchmark (or those `--models` names), after the warm-up steps,
torch.profiler records a few real training steps (DeepSpeed engine, optimizer step included)
and writes into DIR:
  profile_<name>.txt   the top kernels / ops by self device time (torch's key_averages table)
and prints one summary table: the share of device time in matmuls, attention, other (fused)
elementwise kernels, the optimizer, communication and memory copies, and how busy the device
was over the wall time of the recorded steps (idle time = host overhead, synchronisation or a
starving data loader). On CPU (--smoke) the same is done with CPU time.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

import torch

# kernel-name patterns -> category, first match wins (names of cuBLAS / CUTLASS / flash / flex /
# triton / DeepSpeed / NCCL kernels and of the matching CPU ops)
CATEGORIES = [
    ("communication", r"nccl|all_reduce|allreduce|reduce_scatter|all_gather|broadcast"),
    ("attention", r"flash|flex|attention|fmha|sdpa|_efficient_attention|triton_tem"),
    ("matmul", r"gemm|sm90_xmma|cutlass|nvjet|cublas|aten::mm|aten::addmm|aten::bmm|aten::linear|matmul"),
    ("optimizer", r"adam|multi_tensor|foreach|adafactor|_fused_"),
    ("memcpy", r"memcpy|memset|copy_|aten::to\b|aten::_to_copy"),
]


def categorise(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def _self_time(evt, cuda: bool) -> float:
    """Self time in microseconds on the device (CUDA) or CPU."""
    if cuda:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(evt, attr):
                return float(getattr(evt, attr))
        return 0.0
    return float(evt.self_cpu_time_total)


def profile_models(s, names: Optional[set], out_dir: str, steps: int = 3, when=None) -> list[dict]:
    """Profiles `steps` training steps of each model (suite.model_steps' selection: `names`, and
    `when(name)` asked before each is built), writes the tables, returns the summaries."""
    from torch.profiler import ProfilerActivity, profile

    from train.engine import runtime as eng

    from .suite import model_steps

    cuda = s.device == "cuda"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for spec, engine, batch, *_ in model_steps(s, names, when):
        for _ in range(s.warmup):
            eng.train_step(engine, [batch])
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                eng.train_step(engine, [batch])
            if cuda:
                torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
        events = prof.key_averages()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name)
        (out / f"profile_{slug}.txt").write_text(events.table(sort_by=sort, row_limit=40) + "\n")
        shares: dict[str, float] = {}
        if cuda:  # device kernels only: CPU ops and annotation ranges also carry device time
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                       and not getattr(e, "is_user_annotation", False)]
        else:  # CPU: leaf aten ops only (their self time), not the Python / module frames
            kernels = [e for e in events if e.key.startswith("aten::")]
        total = sum(_self_time(e, cuda) for e in kernels)
        for e in kernels:
            cat = categorise(e.key)
            shares[cat] = shares.get(cat, 0.0) + _self_time(e, cuda)
        summary = {"name": spec.name, "busy": total / wall_us if wall_us else None, "step_ms": wall_us / steps / 1e3}
        summary.update({k: v / total for k, v in shares.items()} if total else {})
        summaries.append(summary)
        del engine
    cats = [c for c, _ in CATEGORIES] + ["other"]
    head = f"{'model':<22} {'step ms':>9} {'busy':>6} " + " ".join(f"{c[:13]:>13}" for c in cats)
    lines = [head, "-" * len(head)]
    for sm in summaries:
        busy = "-" if sm["busy"] is None else f"{sm['busy']:.0%}"
        lines.append(f"{sm['name']:<22} {sm['step_ms']:>9.1f} {busy:>6} "
                     + " ".join(f"{sm.get(c, 0.0):>13.0%}" for c in cats))
    table = "\n".join(lines)
    print(f"# device time shares ({'CUDA kernels' if cuda else 'CPU aten ops'}); busy = that time / wall time")
    print(table)
    (out / "profile_summary.txt").write_text(table + "\n")
    return summaries
