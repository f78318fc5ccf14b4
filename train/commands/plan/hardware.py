"""The GPUs the planner knows (datasheet figures, each with its source) and the defaults it
assumes about the machine."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GIB = 2 ** 30
DEFAULT_HEADROOM = 0.10     # fraction of GPU memory kept free: CUDA context, NCCL, allocator fragmentation
DEFAULT_CPU_ADAM_PARAMS_PER_S = 1.0e9  # assumed CPU optimizer throughput per GPU's partition (offload)
DEFAULT_PCIE_GBS = 25.0     # assumed host<->GPU bandwidth per GPU for offload (PCIe 4/5 x16, effective)
REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float       # total memory as nvidia-smi reports it (MiB / 1024)
    peak_tflops: float      # bf16 dense tensor-core peak (no sparsity)
    nvlink_gbs: float       # GPU-to-GPU bandwidth inside a node, one direction, GB/s
    network_gbs: float      # bandwidth per GPU between nodes, GB/s (one NIC per GPU)
    gpus_per_node: int
    source: str


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("h100-80gb", 79.6, 989.0, 450.0, 50.0, 8,
        "NVIDIA H100 SXM5 datasheet: 80 GB HBM3 (nvidia-smi 81559 MiB), 989 TFLOP/s bf16 dense, NVLink 4 "
        "900 GB/s bidirectional; DGX H100: one 400 Gb/s ConnectX-7 per GPU"),
    GPU("h200", 140.4, 989.0, 450.0, 50.0, 8,
        "NVIDIA H200 SXM datasheet: 141 GB HBM3e (nvidia-smi 143771 MiB), 989 TFLOP/s bf16 dense (same "
        "compute as H100), NVLink 900 GB/s bidirectional; one 400 Gb/s NIC per GPU"),
    GPU("a100-80gb", 80.0, 312.0, 300.0, 25.0, 8,
        "NVIDIA A100 SXM4 datasheet: 80 GB HBM2e (nvidia-smi 81920 MiB), 312 TFLOP/s bf16 dense, NVLink 3 "
        "600 GB/s bidirectional; DGX A100: one 200 Gb/s HDR NIC per GPU"),
    GPU("a100-40gb", 40.0, 312.0, 300.0, 25.0, 8,
        "NVIDIA A100 SXM4 datasheet: 40 GB HBM2 (nvidia-smi 40960 MiB), 312 TFLOP/s bf16 dense, NVLink 3 "
        "600 GB/s bidirectional; DGX A100: one 200 Gb/s HDR NIC per GPU"),
)}
GPU_ALIASES = {"h100": "h100-80gb", "h100-sxm": "h100-80gb", "h200-141gb": "h200", "a100": "a100-80gb"}


def get_gpu(name: str) -> GPU:
    key = GPU_ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}")
    return GPUS[key]


def normalise_device(text: str) -> Optional[str]:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb' (for matching bench/ results); None if unknown."""
    s = text.lower().replace(" ", "").replace("_", "-")
    if s in GPUS:
        return s
    if "h200" in s:
        return "h200"
    if "h100" in s:
        return "h100-80gb"
    if "a100" in s:
        return "a100-40gb" if "40g" in s else "a100-80gb"
    return None
