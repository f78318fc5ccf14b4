"""The GPUs the planner knows (datasheet figures, each with its source) and the defaults it
assumes about the machine."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

GIB = 2 ** 30
DEFAULT_HEADROOM = 0.10     # fraction of GPU memory kept free: CUDA context, NCCL, allocator fragmentation
DEFAULT_CPU_ADAM_PARAMS_PER_S = 1.0e9  # assumed CPU optimizer throughput per GPU's partition (offload)
DEFAULT_PCIE_GBS = 25.0     # assumed host<->GPU bandwidth per GPU for offload (PCIe 4/5 x16, effective)
REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class GPU:
    """One GPU kind: what the planner needs of it and where each number comes from.

    Peaks are dense (no 2:4 sparsity) tensor-core figures from the vendor's datasheet, the
    numbers MFU is measured against. `peak_tflops` is the bf16 peak; None = the GPU has no bf16
    (V100), and the plan then runs in fp32 at `fp32_tflops` (the trainer has bf16 and fp32 paths
    only: train/config/sections.py parallel.precision; TF32 is not enabled, so fp32 matmuls run at
    the non-tensor FP32 rate). `fp16_tflops` is recorded for the reader; no plan uses it.
    Pitfall: datasheets print "GB" for binary capacities; `memory_gib` is what nvidia-smi (or
    ROCm) reports, MiB / 1024, which is what the allocator can hand out before the headroom.
    """

    name: str
    memory_gib: float       # total memory as nvidia-smi reports it (MiB / 1024)
    peak_tflops: Optional[float]  # bf16 dense tensor peak (no sparsity); None = no bf16
    nvlink_gbs: float       # GPU-to-GPU bandwidth inside a node, one direction, GB/s
    network_gbs: Optional[float]  # bandwidth per GPU between nodes, GB/s; None = not given (--gpu-spec)
    gpus_per_node: int      # GPUs that reach each other at nvlink_gbs (GB200 NVL72: the 72 of a rack)
    source: str
    fp32_tflops: Optional[float] = None  # dense fp32 peak (non-tensor; the trainer leaves TF32 off)
    fp16_tflops: Optional[float] = None  # dense fp16 tensor peak (informative: no fp16 path in the trainer)
    spec: str = ""          # the --gpu-spec text this GPU was built or overridden from ("" = the table's)
    link: str = "NVLink"    # what carries nvlink_gbs (PCIe on cards without NVLink, Infinity Fabric on AMD)

    @property
    def has_bf16(self) -> bool:
        return self.peak_tflops is not None

    def peak_for(self, precision: str) -> float:
        """The dense peak TFLOP/s a run in `precision` (bf16 | fp32) computes at; ValueError with
        the fix when the GPU has no figure for it."""
        peak = self.peak_tflops if precision == "bf16" else self.fp32_tflops
        if peak is None:
            raise ValueError(f"{self.name} has no {precision} peak in the GPU table or --gpu-spec: add "
                             f"{'bf16_tflops' if precision == 'bf16' else 'fp32_tflops'}=... to --gpu-spec")
        return peak


_DGX_B200 = "DGX B200 user guide: 8 GPUs, 8 x 400 Gb/s ConnectX-7 = 50 GB/s per GPU"
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("h100-80gb", 79.6, 989.0, 450.0, 50.0, 8,
        "NVIDIA H100 SXM5 datasheet: 80 GB HBM3 (nvidia-smi 81559 MiB), 989 TFLOP/s bf16 dense, 67 fp32, NVLink 4 "
        "900 GB/s bidirectional; DGX H100: one 400 Gb/s ConnectX-7 per GPU", 67.0, 989.0),
    GPU("h200", 140.4, 989.0, 450.0, 50.0, 8,
        "NVIDIA H200 SXM datasheet: 141 GB HBM3e (nvidia-smi 143771 MiB), 989 TFLOP/s bf16 dense, 67 fp32 (same "
        "compute as H100), NVLink 900 GB/s bidirectional; one 400 Gb/s NIC per GPU", 67.0, 989.0),
    GPU("a100-80gb", 80.0, 312.0, 300.0, 25.0, 8,
        "NVIDIA A100 SXM4 datasheet: 80 GB HBM2e (nvidia-smi 81920 MiB), 312 TFLOP/s bf16 dense, 19.5 fp32, NVLink 3 "
        "600 GB/s bidirectional; DGX A100: one 200 Gb/s HDR NIC per GPU", 19.5, 312.0),
    GPU("a100-40gb", 40.0, 312.0, 300.0, 25.0, 8,
        "NVIDIA A100 SXM4 datasheet: 40 GB HBM2 (nvidia-smi 40960 MiB), 312 TFLOP/s bf16 dense, 19.5 fp32, NVLink 3 "
        "600 GB/s bidirectional; DGX A100: one 200 Gb/s HDR NIC per GPU", 19.5, 312.0),
    GPU("b200", 179.0, 2250.0, 900.0, 50.0, 8,
        "NVIDIA HGX B200 (1000 W): 180 GB HBM3e (nvidia-smi 179 GiB, Vultr's HGX B200 hardware overview; DGX B200: "
        "1440 GB for 8), 2250 TFLOP/s bf16 dense (4500 sparse), 80 fp32 (glennklockwood.com/garden/processors/B200 "
        "from NVIDIA's Blackwell datasheet), NVLink 5 1.8 TB/s bidirectional = 900 one way; " + _DGX_B200,
        80.0, 2250.0),
    GPU("gb200", 185.0, 2500.0, 900.0, 50.0, 72,
        "NVIDIA GB200 NVL72 (1200 W B200): 186 GB HBM3e per GPU (13.4 TB / 72; no nvidia-smi figure found: "
        "185 GiB assumed, 1 below the datasheet as for B200's 180 GB -> 179 GiB), 2500 TFLOP/s bf16 dense (5000 "
        "sparse), 90 fp32 (glennklockwood.com B200 page), NVLink 5 900 GB/s one way to all 72 GPUs of the rack "
        "(the NVLink domain, so gpus_per_node = 72; a compute tray holds 4); DGX GB200 user guide: 4 x 400 Gb/s "
        "ConnectX-7 per tray of 4 GPUs = 50 GB/s per GPU", 90.0, 2500.0),
    GPU("mi300x", 191.98, 1307.4, 448.0, 50.0, 8,
        "AMD Instinct MI300X: 192 GB HBM3 (ROCm: 25767706624 bytes per CPX partition x 8 = 191.98 GiB, "
        "ROCm/legacy-rocm-build#4750), 1307.4 TFLOP/s bf16 dense (2614.9 sparse; AMD's figures as quoted in "
        "alpharomercoma/MI300X-vs-H200), 163.4 fp32 (AMD datasheet; gpu.blog lists 164.6), Infinity Fabric: 7 links "
        "x 128 GB/s bidirectional to the other 7 GPUs of an 8-GPU OAM platform = 448 GB/s one way in all (a "
        "ring over one link gets 64; RCCL spreads a collective over the links); network: 400 Gb/s per GPU as on "
        "H100 platforms (an assumption: the MI300X datasheet names no NIC)", 163.4, 1307.4, link="Infinity Fabric"),
    GPU("l40s", 44.99, 362.05, 32.0, 6.25, 8,
        "NVIDIA L40S datasheet: 48 GB GDDR6 (nvidia-smi 46068 MiB, modal-labs/modal-client#2797), 362.05 TFLOP/s "
        "bf16 dense (733 sparse), 91.6 fp32, no NVLink: PCIe Gen4 x16 64 GB/s bidirectional = 32 one way; network: "
        "no reference system found, 400 Gb/s per 8-GPU node = 6.25 GB/s per GPU assumed (pass network_gbs in "
        "--gpu-spec for yours)", 91.6, 362.05, link="PCIe Gen4"),
    GPU("a10g", 22.49, 70.0, 32.0, 1.5625, 8,
        "AWS A10G (EC2 G5): 24 GB GDDR6 (nvidia-smi 23028 MiB, NVIDIA/DCGM#232); bf16 tensor peak NOT PUBLISHED by "
        "AWS or NVIDIA: 70 TFLOP/s assumed, the figure commonly quoted for the A10G and below the A10's datasheet "
        "125 (Baseten's A10 vs A10G comparison: the A10G has less tensor compute than the A10) - measure it with "
        "bench/ or give bf16_tflops in --gpu-spec; 31.2 fp32 (A10 datasheet; the A10G has at least the A10's CUDA-"
        "core rate); no NVLink: PCIe Gen4 x16 = 32 GB/s one way; g5.48xlarge: 8 GPUs, 100 Gb/s = 1.5625 GB/s per "
        "GPU (AWS accelerated-computing instance docs)", 31.2, 70.0, link="PCIe Gen4"),
    GPU("v100-16gb", 16.0, None, 150.0, 6.25, 8,
        "NVIDIA V100 SXM2 datasheet: 16 GB HBM2 (nvidia-smi 16384 MiB, 1CatAI/1Cat-vLLM#85), NO bf16 (Volta: fp16 "
        "tensor cores only, 125 TFLOP/s), 15.7 TFLOP/s fp32, NVLink 2 300 GB/s bidirectional = 150 one way; DGX-1: "
        "8 GPUs, 4 x 100 Gb/s EDR InfiniBand = 6.25 GB/s per GPU (DGX-1 with V100 architecture white paper)",
        15.7, 125.0),
    GPU("v100-32gb", 32.0, None, 150.0, 6.25, 8,
        "NVIDIA V100 SXM2 datasheet: 32 GB HBM2 (nvidia-smi 32768 MiB, Wan-Video/Wan2.1#5), NO bf16 (Volta: fp16 "
        "tensor cores only, 125 TFLOP/s), 15.7 TFLOP/s fp32, NVLink 2 300 GB/s bidirectional = 150 one way; DGX-1: "
        "8 GPUs, 4 x 100 Gb/s EDR InfiniBand = 6.25 GB/s per GPU", 15.7, 125.0),
)}
GPU_ALIASES = {"h100": "h100-80gb", "h100-sxm": "h100-80gb", "h200-141gb": "h200", "a100": "a100-80gb",
               "b200-180gb": "b200", "gb200-nvl72": "gb200", "mi300x-192gb": "mi300x", "l40s-48gb": "l40s",
               "a10g-24gb": "a10g"}
SPEC_KEYS = {"memory_gib": "memory_gib", "bf16_tflops": "peak_tflops", "bandwidth_gbs": "nvlink_gbs",
             "network_gbs": "network_gbs", "gpus_per_node": "gpus_per_node", "fp16_tflops": "fp16_tflops",
             "fp32_tflops": "fp32_tflops"}  # --gpu-spec key -> GPU field
SPEC_REQUIRED = ("memory_gib", "bandwidth_gbs")  # without --gpu; and bf16_tflops or fp32_tflops
SPEC_SYNTAX = "memory_gib=...,bf16_tflops=...,bandwidth_gbs=...[,network_gbs=...,gpus_per_node=...,fp16_tflops=...,fp32_tflops=...]"


def get_gpu(name) -> GPU:
    """The table's GPU called `name` (or an alias); a GPU passes through unchanged."""
    if isinstance(name, GPU):
        return name
    key = GPU_ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}, or describe yours with "
                         f"--gpu-spec {SPEC_SYNTAX}")
    return GPUS[key]


def parse_gpu_spec(text: str, base: Optional[GPU] = None) -> GPU:
    """A GPU from `--gpu-spec key=value,...` (keys: SPEC_KEYS). With `base` (--gpu NAME) the spec
    overrides those fields of the named GPU and keeps its name (so bench/ measurements of it still
    match); without, memory_gib and bandwidth_gbs are required and bf16_tflops or fp32_tflops (a
    GPU without bf16 gives fp32_tflops only), gpus_per_node defaults to 8 and network_gbs to none
    (a plan across nodes then asks for it). ValueError, one line naming the bad item and the valid keys."""
    valid = f"valid keys: {', '.join(SPEC_KEYS)}"
    given: dict[str, float] = {}
    for item in (i.strip() for i in text.split(",")):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not item or not eq:
            raise ValueError(f"--gpu-spec item {item!r} is not KEY=VALUE; write --gpu-spec {SPEC_SYNTAX}")
        if key not in SPEC_KEYS:
            raise ValueError(f"--gpu-spec: unknown key {key!r}; {valid}")
        if key in given:
            raise ValueError(f"--gpu-spec: {key} is given twice; give it once")
        try:
            value = int(raw) if key == "gpus_per_node" else float(raw)
        except ValueError:
            kind = "a whole number" if key == "gpus_per_node" else "a number"
            raise ValueError(f"--gpu-spec: {key}={raw.strip()!r} is not {kind}; e.g. {key}=8") from None
        if not value > 0 or value == float("inf"):
            raise ValueError(f"--gpu-spec: {key}={raw.strip()} must be a positive number")
        given[key] = value
    fields = {SPEC_KEYS[k]: v for k, v in given.items()}
    if base is not None:
        return replace(base, **fields, spec=text, source=f"{base.source}; overridden by --gpu-spec {text}")
    missing = [k for k in SPEC_REQUIRED if k not in given]
    if missing or not ({"bf16_tflops", "fp32_tflops"} & set(given)):
        need = missing + ([] if {"bf16_tflops", "fp32_tflops"} & set(given) else
                          ["bf16_tflops (or fp32_tflops for a GPU without bf16)"])
        raise ValueError(f"--gpu-spec without --gpu needs {', '.join(need)}; write --gpu-spec {SPEC_SYNTAX}, or "
                         f"name a GPU of the table with --gpu and override some of its fields")
    return GPU(name="custom", memory_gib=given["memory_gib"], peak_tflops=given.get("bf16_tflops"),
               nvlink_gbs=given["bandwidth_gbs"], network_gbs=given.get("network_gbs"),
               gpus_per_node=int(given.get("gpus_per_node", 8)), source=f"--gpu-spec {text}",
               fp32_tflops=given.get("fp32_tflops"), fp16_tflops=given.get("fp16_tflops"), spec=text,
               link="the GPU-to-GPU link of --gpu-spec")


def normalise_device(text: str) -> Optional[str]:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb' (for matching bench/ results); None if unknown.

    Order matters: 'gb200' contains 'b200', 'a100' contains 'a10'; an L40 (no S) is another GPU."""
    s = text.lower().replace(" ", "").replace("_", "-")
    if s in GPUS:
        return s
    for needle, name in (("gb200", "gb200"), ("b200", "b200"), ("h200", "h200"), ("h100", "h100-80gb"),
                         ("mi300x", "mi300x"), ("l40s", "l40s"), ("a10g", "a10g")):
        if needle in s:
            return name
    if "a100" in s:
        return "a100-40gb" if "40g" in s else "a100-80gb"
    if "v100" in s:
        return "v100-32gb" if "32g" in s else "v100-16gb"
    return None
