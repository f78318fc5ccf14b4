"""Model-FLOPs utilisation: measured in bench/ (JSON results, bench/RESULTS.md) or assumed, and
the step-time factor of activation checkpointing."""
from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path
from typing import Optional

from .hardware import GPUS, REPO, normalise_device

DEFAULT_MFU = 0.40          # assumed model-FLOPs utilisation when bench/ has no measurement for the GPU
CHECKPOINT_POLICIES = ("none", "full", "selective")
SELECTIVE_RECOMPUTE = 1.05  # assumed step-time factor of selective checkpointing (recompute_factor's docstring)


def _float(v) -> Optional[float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        m = re.match(r"\s*([0-9.]+)\s*(%?)", v)
        if m:
            try:
                x = float(m.group(1))
            except ValueError:
                return None
            return x / 100 if m.group(2) or x > 1 else x
    return None


def _bench_entries(bench_dir: Path) -> list[dict]:
    """Measurements with an MFU and a device: JSON objects (or lists of them) anywhere under
    bench/ with keys `mfu` and `gpu` or `device` (optional `arch`, `size`,
    `activation_checkpointing`), and rows of markdown tables in bench/RESULTS.md whose header
    has an `mfu` column and a `gpu` or `device` column."""
    out: list[dict] = []
    for path in sorted(glob.glob(str(bench_dir / "**" / "*.json"), recursive=True)):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("rows"), list) and isinstance(data.get("env"), dict):
            data = [_from_bench_row(r, data["env"]) for r in data["rows"]]  # `python -m bench --json`
        for e in data if isinstance(data, list) else [data]:
            if isinstance(e, dict) and _float(e.get("mfu")) and (e.get("gpu") or e.get("device")):
                out.append({**e, "_source": os.path.relpath(path, bench_dir.parent)})
    md = bench_dir / "RESULTS.md"
    if md.is_file():
        header: Optional[list[str]] = None
        for line in md.read_text().splitlines():
            if not line.strip().startswith("|"):
                header = None
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = [c.lower() for c in cells]
                continue
            if all(set(c) <= set("-: ") for c in cells):
                continue
            row = dict(zip(header, cells))
            dev = row.get("gpu") or row.get("device")
            if dev and _float(row.get("mfu")):
                out.append({**row, "_source": "bench/RESULTS.md"})
    return out


def _from_bench_row(row, env: dict) -> Optional[dict]:
    """A `python -m bench --json` archscale row as a measurement: MFU = its model TFLOP/s over the
    GPU's datasheet peak (the planner's unit; the bench's own "of peak" is over the measured matmul
    peak), arch from its name (CD:FLM ...), its `checkpointing`. None for other rows, CPU (smoke)
    runs and unknown devices."""
    if not isinstance(row, dict) or row.get("group") != "archscale" or not _float(row.get("tflops")) \
            or env.get("smoke"):
        return None
    gpu = normalise_device(str(env.get("device", "")))
    if gpu is None:
        return None
    peak = GPUS[gpu].peak_tflops or GPUS[gpu].fp32_tflops  # a GPU without bf16 (V100) ran in fp32
    return {"mfu": _float(row["tflops"]) / peak, "device": env["device"],
            "arch": str(row.get("name", "")).split(":")[0].lower(), "checkpointing": row.get("checkpointing") or "none",
            "bench_row": row.get("name")}


def measured_mfu(gpu: str, arch: str, size: str, bench_dir: Path = REPO / "bench") -> Optional[dict]:
    """The best-matching measured MFU for this GPU: same arch and size, else same arch, else any
    measurement on this GPU. None when bench/ has none for the GPU."""
    best, best_score = None, -1
    for e in _bench_entries(bench_dir):
        if normalise_device(str(e.get("gpu") or e.get("device"))) != gpu:
            continue
        score = (2 if str(e.get("arch", "")).lower() == arch else 0) + (1 if str(e.get("size", "")).lower() == size else 0)
        if score > best_score:
            best, best_score = e, score
    if best is None:
        return None
    policy = _bench_policy(best)
    return {"mfu": _float(best["mfu"]), "source": best["_source"], "activation_checkpointing": policy != "none",
            "checkpoint_policy": policy}


def _bench_policy(entry: dict) -> str:
    """The checkpointing a measurement ran with: `checkpoint_policy` or `checkpointing` (none /
    full / selective), else `activation_checkpointing` (true = full, or a policy name)."""
    for key in ("checkpoint_policy", "checkpointing", "activation_checkpointing"):
        v = str(entry.get(key, "")).strip().lower()
        if v in CHECKPOINT_POLICIES:
            return v
        if v in ("true", "yes", "1", "on"):
            return "full"
        if v in ("false", "no", "0", "off"):
            return "none"
    return "none"


def recompute_factor(policy: str) -> float:
    """Step time with activation checkpointing / without, at the same MFU (model FLOPs only).

    none: 1. full: 4/3 - the backward re-runs every block's forward (1 of the 3 forward-equivalents
    of a training step). selective: SELECTIVE_RECOMPUTE = 1.05, an estimate: the matmuls and the
    attention kernel are not re-run (their outputs are kept), only the block's pointwise work is
    (norms with their fp32 statistics, the MLP activation and gate product, RoPE, residual adds,
    dropout), which is memory-bound: eager bf16 kernels move about 84 D + 10 F (+ 40 I with RoPE)
    bytes per token and block (each RMSNorm ~36 D: upcast, square, mean, scale, downcast, weight;
    each residual add 6 D; GEGLU act + product 10 F), against 6 (4 D I + 3 D F) matmul FLOPs per
    token and block. For the 4.8B shape (D = I = 4096, F = 10240) on an H100 (3.35 TB/s, 989
    TFLOP/s at MFU 0.4): 0.13 us of pointwise work against 2.9 us of matmuls, about 4.5%, hence
    1.05. Narrower models pay relatively more (the pointwise work scales with D, matmuls with D^2),
    model.compile (fused pointwise kernels) less. Not measured here (no GPU lent so far)."""
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"activation checkpointing policy {policy!r} is not valid; choose one of "
                         f"{', '.join(CHECKPOINT_POLICIES)}")
    return {"none": 1.0, "full": 4 / 3, "selective": SELECTIVE_RECOMPUTE}[policy]
