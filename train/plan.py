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
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from .registry import Lengths

GIB = 2 ** 30
DEFAULT_MFU = 0.40          # assumed model-FLOPs utilisation when bench/ has no measurement for the GPU
DEFAULT_HEADROOM = 0.10     # fraction of GPU memory kept free: CUDA context, NCCL, allocator fragmentation
DEFAULT_CPU_ADAM_PARAMS_PER_S = 1.0e9  # assumed CPU optimizer throughput per GPU's partition (offload)
DEFAULT_PCIE_GBS = 25.0     # assumed host<->GPU bandwidth per GPU for offload (PCIe 4/5 x16, effective)
CHECKPOINT_POLICIES = ("none", "full", "selective")
SELECTIVE_RECOMPUTE = 1.05  # assumed step-time factor of selective checkpointing (recompute_factor's docstring)
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- GPUs
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


# ------------------------------------------------------------------------ MFU from bench/
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
    return {"mfu": _float(row["tflops"]) / GPUS[gpu].peak_tflops, "device": env["device"],
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


# ------------------------------------------------------------------ parameters and shapes
def param_shapes(config) -> list[list[tuple[int, ...]]]:
    """Parameter shapes of each pipeline layer, in train/pipeline.py's order (the tied
    embedding appears at each layer that uses it). Flattened and deduplicated (`model_shapes`)
    it is the whole model; the analytic twin of model_zoo.sizes.num_params."""
    c = config
    d, inner, f = c.d_model, c.n_heads * c.head_dim, c.d_ff
    norm = [(d,)] if c.norm == "rmsnorm" else [(d,), (d,)]
    attn = [(inner, d), (inner, d), (inner, d), (d, inner)]
    mlp = [(f, d), (f, d), (d, f)] if c.mlp in ("geglu", "swiglu") else [(f, d), (d, f)]
    stack_in = {"t5_bias": [(c.rel_buckets, c.n_heads)],
                "learned": [(c.max_position_embeddings, d)]}.get(c.position, [])
    embed = [(c.vocab_size, d)]
    head = embed if c.tie_embeddings else [(c.vocab_size, d)]

    def block(cross: bool):
        return norm + attn + (norm + attn if cross else []) + norm + mlp

    if c.arch != "ed":
        return [embed, stack_in] + [block(False) for _ in range(c.n_layers)] + [norm, head]
    return ([embed, stack_in] + [block(False) for _ in range(c.n_layers)] + [norm]
            + [embed, stack_in] + [block(True) for _ in range(c.n_layers)] + [norm, head])


def _tied_layers(config) -> set[int]:
    """Indices of pipeline layers holding the shared embedding (train/pipeline.py)."""
    n = len(param_shapes(config))
    if config.arch == "ed":
        return {0, config.n_layers + 3} | ({n - 1} if config.tie_embeddings else set())
    return {0, n - 1} if config.tie_embeddings else {0}


def stage_shapes(config, layers: Sequence[int]) -> list[tuple[int, ...]]:
    """Unique parameter shapes held by the pipeline layers `layers` (a tied matrix once)."""
    per_layer, tied = param_shapes(config), _tied_layers(config)
    out, seen_tied = [], False
    for i in layers:
        if i in tied:
            if seen_tied:
                continue
            seen_tied = True
        out += per_layer[i]
    return out


def model_shapes(config) -> list[tuple[int, ...]]:
    return stage_shapes(config, range(len(param_shapes(config))))


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def largest_layer_params(config) -> int:
    """Largest single module's own parameters (what DeepSpeed's ZeRO-3 estimator calls the
    largest layer): the embedding for the reference shapes. LayerNorm's weight + bias count together."""
    biggest = max(math.prod(s) for s in model_shapes(config))
    return max(biggest, 2 * config.d_model if config.norm == "layernorm" else 0)


def partition_balanced(weights: Sequence[int], num_parts: int) -> list[int]:
    """DeepSpeed's `runtime.utils.partition_balanced` (pipeline partition_method="parameters"),
    re-implemented without numpy: contiguous parts minimising (max part - min part); returns
    the boundaries [0, ..., len(weights)]."""
    n, m = len(weights), num_parts
    if n <= m:
        return [min(p, n) for p in range(m + 1)]
    inf = float("inf")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    pos = [[0] * (m + 1) for _ in range(n + 1)]
    dp_max[0][0] = 0
    cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                s = prefix[i] - prefix[k]
                hi, lo = max(dp_max[k][j - 1], s), min(dp_min[k][j - 1], s)
                if cost[i][j] >= hi - lo:
                    cost[i][j], dp_max[i][j], dp_min[i][j], pos[i][j] = hi - lo, hi, lo, k
    parts = [n]
    for j in range(m, 0, -1):
        parts.append(pos[parts[-1]][j])
    return parts[::-1]


def pipeline_parts(config, stages: int, method: str = "parameters") -> list[int]:
    """Stage boundaries over the pipeline layers, as DeepSpeed's PipelineModule computes them
    for "parameters" (balanced parameter counts, tied layers counted at each use) and "uniform"
    (DeepSpeed's partition_uniform over all layers). type:REGEX falls back to "parameters"."""
    counts = [numel(s) for s in param_shapes(config)]
    if stages == 1:
        return [0, len(counts)]
    if method == "uniform":
        n = len(counts)
        if n <= stages:
            return [min(p, n) for p in range(stages + 1)]
        size, rest = divmod(n, stages)
        parts = [i * size for i in range(stages + 1)]
        for i in range(rest):
            parts = parts[:i + 1] + [p + 1 for p in parts[i + 1:]]
        return parts
    return partition_balanced(counts, stages)


# --------------------------------------------------------------------------- model states
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


# ---------------------------------------------------------------------------- activations
def layer_activation_bytes(config, tokens: int, batch: int, a: float, *, cross_tokens: int = 0,
                           dense_attention: bool = False) -> float:
    """Bytes one block saves for its backward pass, for `batch` rows of `tokens` tokens.

    Per block (B rows, T tokens, D = d_model, I = heads x head_dim, F = d_ff, H heads, a = 2 bf16
    or 4 fp32 activation bytes; the whole model runs in the training precision, no autocast):
      each RMSNorm: (4 + 2a) B T D + 4 B T    its fp32 upcast of the input (which is also the
                                       stored residual stream), the normalised x in the model dtype,
                                       the weighted output (the matmul input), the fp32 1/rms
      self-attention: 4 a B T I + 4 B H T   q, k, v, the kernel output (flash / flex keep no T x T
                                       matrix; the output is laid out (B, T, H, hd), so o_proj's input
                                       is a view of it), the fp32 log-sum-exp
      cross-attention (ED decoder): 2 a B T I + 2 a B Tk I + 4 B H T    q, out; k, v over the encoder
      GEGLU / SwiGLU MLP: 4 a B T F    gate, act(gate), up, and their product (the down_proj input)
      GELU MLP: 2 a B T F
      dropout > 0: 1 byte per element of each dropout mask (2 or 3 of B T D)
      attn_impl=reference: + (4 + a) B H T Tk per attention (fp32 scores -> probabilities, their copy)
    """
    B, T, D, I, F, H = batch, tokens, config.d_model, config.n_heads * config.head_dim, config.d_ff, config.n_heads
    cross = cross_tokens > 0
    norm = ((4 + 2 * a) * B * T * D + 4 * B * T) * (3 if cross else 2)
    attn = 4 * a * B * T * I + 4 * B * H * T
    if cross:
        attn += 2 * a * B * T * I + 2 * a * B * cross_tokens * I + 4 * B * H * T
    mlp = (4 if config.mlp in ("geglu", "swiglu") else 2) * a * B * T * F
    drop = (3 if cross else 2) * B * T * D if config.dropout > 0 else 0
    dense = 0.0
    if dense_attention:
        dense = (4 + a) * B * H * T * T + ((4 + a) * B * H * T * cross_tokens if cross else 0)
    return norm + attn + mlp + drop + dense


def layer_selective_bytes(config, tokens: int, batch: int, a: float, *, cross_tokens: int = 0,
                          dense_attention: bool = False) -> tuple[float, float]:
    """(kept, shared): bytes one block keeps under selective activation checkpointing, besides
    its input, and how many of layer_activation_bytes' bytes are those same tensors.

    train/engine.py `_selective_policy` runs each block under non-reentrant torch.utils.checkpoint
    with a policy that MUST_SAVEs the outputs of aten mm / addmm / bmm and of the SDPA / flex
    attention kernels and recomputes everything else; autograd's own saved tensors are dropped
    (recomputed in the backward), and the block's input is kept by the checkpoint to re-run it.
    nn.Linear on a [B, T, *] input is one aten.mm on [B T, *], so per block:
      self-attention: q, k, v, o_proj outputs a B T (3 I + D) + the kernel output a B T I and its
        fp32 log-sum-exp 4 B H T (flash / flex; the kernel's other outputs are scalars);
        attn_impl=reference: the two bmm outputs instead, q k^T a B H T Tk and probs v a B T I;
      cross-attention (ED decoder): q a B T I, k, v a B Tk I each, o_proj a B T D, kernel output
        a B T I + 4 B H T;
      GEGLU / SwiGLU MLP: gate, up a B T F each, down a B T D; GELU MLP: up a B T F, down a B T D.
    Not kept: norms (and their fp32 copies), RoPE'd q and k, the activation and gate product,
    residual sums, dropout masks (their RNG state is replayed).
    shared: v, the kernel output, the log-sum-exp, q and k unless RoPE rotates them (RoPE makes
      new tensors), the cross-attention's q, k, v, output, log-sum-exp, and the MLP's gate and up
      (GELU: up): in the backward, recomputing the block re-creates only the rest.
    tests/test_plan.py measures what stays alive after a selective forward on CPU."""
    B, T, D, I, F, H = batch, tokens, config.d_model, config.n_heads * config.head_dim, config.d_ff, config.n_heads
    gated = config.mlp in ("geglu", "swiglu")
    lse = 4 * B * H * T
    kernel = a * B * T * I + (a * B * H * T * T if dense_attention else lse)
    kept = a * B * T * (3 * I + D) + kernel
    shared = a * B * T * I * (1 if config.position == "rope" else 3) + a * B * T * I + (0 if dense_attention else lse)
    if cross_tokens:
        Tk = cross_tokens
        cross = a * B * T * I + 2 * a * B * Tk * I + a * B * T * D + a * B * T * I \
            + (a * B * H * T * Tk if dense_attention else lse)
        kept += cross
        shared += cross - a * B * T * D - (a * B * H * T * Tk if dense_attention else 0)
    kept += a * B * T * ((2 if gated else 1) * F + D)
    shared += a * B * T * (2 if gated else 1) * F
    return kept, shared


def resolve_loss_impl(loss_impl: str, device: str = "cuda", tokens: Optional[int] = None,
                      d_model: Optional[int] = None) -> str:
    """The loss implementation a model runs for `loss_impl` on `device`, as the model resolves it
    (model_zoo.loss.resolve_impl): auto = liger on CUDA when liger-kernel imports (here, where the
    planner runs: install the `gpu` extra here too, or set model.loss_impl), else chunked on
    CUDA, or dense for fewer tokens per micro-batch than d_model; dense on CPU."""
    from model_zoo.loss import resolve_impl

    return resolve_impl(loss_impl, device, tokens, d_model)


def head_loss_bytes(config, tokens: int, a: float, impl: str) -> dict:
    """Bytes of the LM head + loss for `tokens` = B x T positions (model_zoo/loss.py), by the
    resolved loss implementation `impl`, V = vocab, D = d_model, a = activation / weight bytes:

    dense: the logits [N, V] a N V kept by the model output + their fp32 log-softmax 4 N V
      (F.cross_entropy) + with z-loss 4 N V: logsumexp saves its fp32 input (a copy made by the
      upcast, or by the decoder's shifted reshape; an fp32 ED model's own logits, counted already);
      working: the logits' gradient, (4 + a) N V. Norm before it: as a block's norm (its output
      is the head matmul's saved input).
    chunked / liger (training; fused head + loss, the gradients computed in the forward): saved
      = grad_hidden a N D + grad_weight a V D (ChunkedLinearCrossEntropy / liger's function save
      only these; no logits, no head input); the norm before it keeps (4 + a) N D + 4 N (its
      output is not saved). working, during the loss's forward, over what is saved afterwards:
        the head input, alive but not saved: a N D (+ a N D more for its t5x rescaled copy when
          the head is the tied embedding with scale_tied_logits),
        + (4 - a) V D: the fp32 grad_weight accumulator beside the a V D copy that is kept
          (fp32: the accumulator is that copy),
        + the largest of the loss's own transients, C = min(loss_chunk_size, N) rows per chunk,
          c = 4 + a bytes per logit (fp32 logits, then the softmax gradient cast to the dtype;
          fp32: c = 4, one tensor):
          chunked: one chunk alive at a time (the loop frees each chunk's logits before the
            next matmul); while the chunk's gradient is multiplied out, c C V + max(a C D, a V D)
            (a V D: bf16's g^T h product before it is added to the fp32 accumulator; fp32 adds in
            place); at the final cast of grad_weight to the dtype, a V D + c C_last V.
          liger (read from liger-kernel's fused_linear_cross_entropy_forward, accum_dtype fp32
            as model_zoo asks for it): chunks of C = min(N, next_pow2(ceil(N / ceil(V / D)))) rows,
            one chunk's logits in the dtype (its gradient written in place) + a C D, or the cast
            copy a V D. Not measured here (CUDA only).
    Returns {"saved", "working", "norm"}: norm = the bytes the norm before the head keeps."""
    c = config
    N, D, V = float(tokens), c.d_model, c.vocab_size
    full_norm = (4 + 2 * a) * N * D + 4 * N
    if impl == "dense":
        z = 4 * N * V if c.z_loss > 0 and not (a == 4 and c.arch == "ed") else 0.0
        return {"saved": (a + 4) * N * V + z, "working": (4 + a) * N * V, "norm": full_norm}
    if impl not in ("chunked", "liger"):
        raise ValueError(f"loss_impl {impl!r} is not valid here; choose one of dense, chunked, liger "
                         f"(resolve auto with resolve_loss_impl)")
    head_in = a * N * D * (2 if c.tie_embeddings and c.scale_tied_logits else 1)
    low = a < 4  # bf16: a separate fp32 accumulator and a cast copy
    if impl == "chunked":
        C = min(int(c.loss_chunk_size), int(N))
        last = int(N) - (math.ceil(N / C) - 1) * C
        per = (4 + a) if low else 4.0
        loss = max(per * C * V + max(a * C * D, a * V * D if low else 0.0),
                   (a * V * D + per * last * V) if low else 0.0)
    else:
        rows = math.ceil(N / math.ceil(V / D))
        C = min(int(N), 1 << (rows - 1).bit_length())  # triton.next_power_of_2(rows), at most N
        loss = max(a * C * V + a * C * D, a * V * D if low else 0.0)
    return {"saved": a * N * D + a * V * D, "working": head_in + (4 - a) * V * D + loss,
            "norm": (4 + a) * N * D + 4 * N}


def activation_bytes(config, lengths: "Lengths", batch: int, precision: str, checkpointing,
                     layers: Sequence[int], attn_impl: str = "auto", device: str = "cuda") -> dict:
    """Activation bytes of one micro-batch on the pipeline layers `layers` (all: no pipeline).

    checkpointing: "none" / False, "full" / True, or "selective" (parallel.checkpoint_policy).
    saved: what the forward pass leaves for the backward. Without checkpointing: every block's
      saved tensors (layer_activation_bytes). Full checkpointing (every block): each block's input
      (a B T D); the block is recomputed in the backward. Selective: each block's input + what
      layer_selective_bytes keeps (matmul and attention-kernel outputs).
    working: the largest transient of the backward pass: one block's activation gradients (about
      its saved size), plus its recomputed activations under checkpointing (full: all of them;
      selective: those not kept, layer_activation_bytes - shared); or the loss: the logits'
      gradient, (4 + a) B T V.
    Stack-level tensors: nothing for the embedding (the first norm keeps its own fp32 copy); the
    ED encoder's final norm as a block's norm ((4 + 2a) B T D + 4 B T: its output is what every
    decoder layer reads); the head, its loss and the norm before it: head_loss_bytes, by
    config.loss_impl as the model resolves it on `device` (the plan's: "cuda"; "cpu" for what a CPU
    run does): dense keeps the logits and their fp32 log-softmax, chunked / liger keep the two
    gradients they compute in the forward.
    tests/test_plan.py checks all of this against the tensors autograd saves on CPU.
    """
    if checkpointing is True or checkpointing is False:
        checkpointing = "full" if checkpointing else "none"
    if checkpointing not in CHECKPOINT_POLICIES:
        raise ValueError(f"activation checkpointing {checkpointing!r} is not valid; choose one of "
                         f"{', '.join(CHECKPOINT_POLICIES)}")
    a = 2.0 if precision == "bf16" else 4.0
    c, B, D = config, batch, config.d_model
    L = c.n_layers
    dense = attn_impl == "reference"
    layers = set(layers)
    saved = working = 0.0
    head = head_loss_bytes(c, B * lengths.decoder, a, resolve_loss_impl(getattr(c, "loss_impl", "dense"), device,
                                                                       B * lengths.decoder, c.d_model))
    if c.arch == "ed":
        Ti, To = lengths.encoder, lengths.decoder
        # pipeline layer index -> (kind, tokens)
        kinds = {0: ("embed", Ti), 1: ("input", Ti), L + 2: ("norm", Ti), L + 3: ("embed", To), L + 4: ("input", To),
                 2 * L + 5: ("head_norm", To), 2 * L + 6: ("head", To)}
        kinds.update({2 + i: ("enc", Ti) for i in range(L)})
        kinds.update({L + 5 + i: ("dec", To) for i in range(L)})
    else:
        T = lengths.decoder
        kinds = {0: ("embed", T), 1: ("input", T), L + 2: ("head_norm", T), L + 3: ("head", T)}
        kinds.update({2 + i: ("dec_only", T) for i in range(L)})
    for i in sorted(layers):
        kind, T = kinds[i]
        if kind in ("enc", "dec", "dec_only"):
            cross_tokens = lengths.encoder if kind == "dec" else 0
            full = layer_activation_bytes(c, T, B, a, cross_tokens=cross_tokens, dense_attention=dense)
            if checkpointing == "full":
                saved += a * B * T * D
                working = max(working, 2 * full)
            elif checkpointing == "selective":
                kept, shared = layer_selective_bytes(c, T, B, a, cross_tokens=cross_tokens, dense_attention=dense)
                saved += a * B * T * D + kept
                working = max(working, 2 * full - shared)
            else:
                saved += full
                working = max(working, full)
        elif kind == "norm":
            saved += (4 + 2 * a) * B * T * D + 4 * B * T
        elif kind == "head_norm":
            saved += head["norm"]
        elif kind == "head":
            saved += head["saved"]
            working = max(working, head["working"])
    return {"saved": saved, "working": working}


def pipeline_bubble(stages: int, micro_batches: int) -> float:
    """Idle fraction of a synchronous 1F1B / GPipe pipeline: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def ring_seconds(nbytes: float, ranks: int, gbs: float) -> float:
    """One ring all-gather or reduce-scatter of a `nbytes` buffer over `ranks` ranks at `gbs`
    GB/s per rank: (ranks - 1) / ranks x nbytes / bandwidth. An all-reduce is two of these."""
    if ranks <= 1:
        return 0.0
    return (ranks - 1) / ranks * nbytes / (gbs * 1e9)


# ------------------------------------------------------------------------------ the plan
class PlanError(ValueError):
    """A configuration the planner (or the config machinery) cannot plan; one line."""


def _load(config_path, overrides):
    from .config import load_config_with_origins

    cfg, _ = load_config_with_origins(config_path, list(overrides))
    return cfg


def plan_config(cfg, *, gpus: int = 1, gpu: str = "h100-80gb", headroom: float = DEFAULT_HEADROOM,
                mfu: Optional[float] = None, bandwidth_gbs: Optional[float] = None, vocab: Optional[int] = None,
                bench_dir: Path = REPO / "bench", fix: bool = True) -> dict:
    """The plan of one run config on `gpus` GPUs of kind `gpu`, as a JSON-ready dict.

    Raises PlanError (with the config machinery's message) for a config that cannot run at all.
    """
    from . import registry
    from .config import ConfigError, derive
    from .ds_config import load_preset

    g = get_gpu(gpu)
    spec = registry.get(cfg.model.arch)
    model_config = spec.make_config(cfg.model, vocab)
    n_blocks = spec.num_layers(model_config)
    try:
        d = derive(cfg, gpus, num_layers=n_blocks, bf16_supported=True)
    except ConfigError as e:
        raise PlanError(str(e)) from None
    try:
        preset = load_preset(d.ds_preset)
    except Exception:  # a preset path that is not here: plan with DeepSpeed's defaults
        preset = {}
    grad_accum = (preset.get("data_types") or {}).get("grad_accum_dtype")
    if d.zero_stage == 0:
        grad_accum = None  # ds_config.py drops it: DeepSpeed has no bf16 + fp32 accumulation without ZeRO
    sub_group = float((preset.get("zero_optimization") or {}).get("sub_group_size", 1e9))
    lengths = spec.row_lengths(cfg.objective)
    P_total = registry.get(cfg.model.arch).num_params(model_config)
    o = cfg.optim

    # ---- memory, stage by stage
    S, N, M = d.pipeline_stages, d.data_parallel_size, d.gradient_accumulation_steps
    parts = pipeline_parts(model_config, S, cfg.parallel.pipeline_partition)
    largest = largest_layer_params(model_config)
    wrapper = optimizer_wrapper(d.precision, d.zero_stage, S, grad_accum, d.offload_optimizer)
    flat = adafactor_is_flat(wrapper)
    usable = g.memory_gib * GIB * (1 - headroom)
    policy = cfg.parallel.checkpoint_policy if cfg.parallel.activation_checkpointing else "none"
    try:
        loss_impl = resolve_loss_impl(model_config.loss_impl, "cuda", d.micro_batch_size * lengths.decoder,
                                      model_config.d_model)
    except ValueError as e:
        raise PlanError(str(e)) from None
    if policy not in CHECKPOINT_POLICIES:
        raise PlanError(f"parallel.checkpoint_policy={cfg.parallel.checkpoint_policy!r} is not valid; choose one of "
                        f"full, selective")
    stages = []
    for s in range(S):
        layers = list(range(parts[s], parts[s + 1]))
        shapes = stage_shapes(model_config, layers)
        P = numel(shapes)
        if o.name == "adafactor":
            sb = adafactor_state_bytes(shapes, flat=flat, beta1=o.beta1 is not None)
        else:
            sb = 8.0 * P
        ms = model_state_bytes(P, zero_stage=d.zero_stage, dp=N, precision=d.precision, optimizer=o.name,
                               state_bytes=sb, largest_layer=largest, offload_optimizer=d.offload_optimizer,
                               offload_param=d.offload_param, pipeline_stages=S, grad_accum_dtype=grad_accum,
                               sub_group_size=sub_group)
        act = activation_bytes(model_config, lengths, d.micro_batch_size, d.precision, policy, layers,
                               cfg.model.attn_impl)
        in_flight = min(S - s, M) if S > 1 else 1
        buffers = buffer_bytes(d.zero_stage, d.precision, preset, N)
        if S > 1:  # DeepSpeed's pipeline buffers: max(2, in flight) inputs and outputs of the stage
            a = 2 if d.precision == "bf16" else 4
            carried = a * d.micro_batch_size * lengths.decoder * model_config.d_model
            if model_config.arch == "ed":
                carried = a * d.micro_batch_size * max(lengths.encoder, lengths.decoder) * model_config.d_model * 2
            buffers += 2 * max(2, in_flight) * carried
        activations = in_flight * act["saved"] + act["working"]
        peak = ms.persistent + buffers + max(activations, ms.gradients_step)
        stages.append({
            "stage": s, "layers": [parts[s], parts[s + 1]], "parameters": P,
            "weights": ms.weights, "gradients": ms.gradients, "optimizer_master": ms.master,
            "optimizer_states": ms.optimizer_states, "zero3_gathered_layers": ms.gathered_layers,
            "buffers": buffers, "activations_saved_per_micro_batch": act["saved"], "micro_batches_in_flight": in_flight,
            "activations_working": act["working"], "activations": activations,
            "step_transient": ms.gradients_step, "peak": peak, "host_offload": ms.host,
        })
    worst = max(stages, key=lambda x: x["peak"])
    fits = worst["peak"] <= usable

    # ---- time
    flops_row = spec.row_flops(model_config, cfg.objective)
    flops_step = flops_row * d.global_batch_size
    bench = measured_mfu(g.name, cfg.model.arch, cfg.model.size, bench_dir) if mfu is None else None
    if mfu is not None:
        mfu_used, mfu_source = mfu, "given on the command line"
    elif bench is not None:
        mfu_used, mfu_source = bench["mfu"], f"measured ({bench['source']})"
    else:
        mfu_used, mfu_source = DEFAULT_MFU, f"assumed default {DEFAULT_MFU} (no bench/ measurement for {g.name})"
    # a measured MFU already includes the recompute of the policy it was measured with
    recompute = recompute_factor(policy) / recompute_factor(bench["checkpoint_policy"] if bench else "none")
    compute_s = flops_step / gpus / (mfu_used * g.peak_tflops * 1e12) * recompute
    bubble = pipeline_bubble(S, M)
    compute_s /= (1 - bubble)
    multi_node = gpus > g.gpus_per_node
    bw = bandwidth_gbs or (g.network_gbs if multi_node else g.nvlink_gbs)
    comm = _comm_seconds(d, model_config, lengths, worst["parameters"], bw, grad_accum)
    offload_s = 0.0
    if d.offload_optimizer:
        share = worst["parameters"] / N
        offload_s = share / DEFAULT_CPU_ADAM_PARAMS_PER_S + (2 + 4) * share / (DEFAULT_PCIE_GBS * 1e9)
        if d.offload_param:
            offload_s += 3 * 2 * share / (DEFAULT_PCIE_GBS * 1e9) * M
    step_s = compute_s + comm["seconds"] + offload_s
    step_overlapped_s = max(compute_s, comm["seconds"]) + offload_s  # the bound if communication hid fully
    tokens_step = d.tokens_per_step
    wall_s = d.max_steps * step_s

    plan = {
        "schema": 1,
        "model": {"arch": cfg.model.arch, "size": cfg.model.size, "parameters": P_total,
                  "vocab_size": model_config.vocab_size, "layers": n_blocks, "largest_layer_parameters": largest,
                  "loss_impl": model_config.loss_impl, "loss_impl_resolved": loss_impl,
                  "loss_chunk_size": model_config.loss_chunk_size},
        "objective": {"name": cfg.objective.name, "encoder_tokens": lengths.encoder, "decoder_tokens": lengths.decoder,
                      "tokens_per_row": d.tokens_per_sequence},
        "hardware": {"gpu": g.name, "gpus": gpus, "memory_gib": g.memory_gib, "peak_tflops": g.peak_tflops,
                     "headroom": headroom, "usable_gib": usable / GIB, "interconnect_gbs": bw,
                     "interconnect": "network (per GPU, between nodes)" if multi_node and not bandwidth_gbs else
                     ("given" if bandwidth_gbs else "NVLink (one node)"), "source": g.source},
        "parallel": {"zero_stage": d.zero_stage, "offload_optimizer": d.offload_optimizer,
                     "offload_param": d.offload_param, "pipeline_stages": S, "data_parallel": N,
                     "micro_batch_size": d.micro_batch_size, "gradient_accumulation_steps": M,
                     "global_batch_size": d.global_batch_size, "precision": d.precision, "ds_preset": d.ds_preset,
                     "activation_checkpointing": cfg.parallel.activation_checkpointing,
                     "checkpoint_policy": policy, "optimizer": o.name, "optimizer_wrapper": wrapper,
                     "grad_accum_dtype": grad_accum},
        "memory": {"stages": [{k: (v / GIB if isinstance(v, float) else v) for k, v in st.items()} for st in stages],
                   "binding_stage": worst["stage"], "peak_gib": worst["peak"] / GIB, "usable_gib": usable / GIB,
                   "fits": fits, "margin_gib": (usable - worst["peak"]) / GIB, "unit": "GiB"},
        "time": {"flops_per_row": flops_row, "flops_per_step": flops_step, "mfu": mfu_used, "mfu_source": mfu_source,
                 "recompute_factor": recompute,
                 "mfu_checkpoint_policy": bench["checkpoint_policy"] if bench else "none",
                 "pipeline_bubble": bubble, "compute_seconds": compute_s,
                 "comm_bytes_per_gpu": comm["bytes"], "comm_seconds": comm["seconds"], "comm_detail": comm["detail"],
                 "offload_seconds": offload_s, "step_seconds": step_s, "tokens_per_step": tokens_step,
                 "tokens_per_second": tokens_step / step_s, "max_steps": d.max_steps, "train_tokens": d.train_tokens,
                 "wall_hours": wall_s / 3600, "gpu_hours": wall_s * gpus / 3600,
                 "step_seconds_overlapped": step_overlapped_s,
                 "gpu_hours_overlapped": d.max_steps * step_overlapped_s * gpus / 3600},
        "warnings": _warnings(cfg, d, wrapper, flat),
        "fix": None,
    }
    if not fits and fix:
        plan["fix"] = find_fix(cfg, gpus=gpus, gpu=gpu, headroom=headroom, vocab=vocab, bench_dir=bench_dir,
                               mfu=mfu, bandwidth_gbs=bandwidth_gbs)
    return plan


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


def _warnings(cfg, d, wrapper: str, flat: bool) -> list[str]:
    out = []
    if cfg.optim.name == "adafactor" and flat:
        out.append(f"Adafactor runs on flat partitions under {wrapper}: its second moment is NOT factored "
                   f"(4 bytes/parameter, counted so) and parameter scaling uses a partition's RMS - not the "
                   f"reference optimizer" + (" (train/config.py refuses ZeRO>=1 without optim.allow_flat_adafactor, "
                                             "but not this pipeline/bf16 case)" if d.zero_stage == 0 else ""))
    return out


# ------------------------------------------------------------------------------- the fix
FIX_ORDER = ("zero", "micro_batch", "activation_checkpointing", "zero3", "pipeline_stages",
             "offload_optimizer", "offload_param")
"""Changes tried in this fixed order, cheapest (in step time) first:
zero: ZeRO-1, then ZeRO-2 (partitions optimizer states, then gradients; costs about nothing over
  data-parallel all-reduce; not with pipeline stages);
micro_batch: halve the micro-batch, repeatedly down to 1, keeping the global batch (more accumulation);
activation_checkpointing: selective checkpointing first (keeps each block's matmul and attention
  outputs, recomputes its pointwise work: about +5% compute, recompute_factor), then full (keeps
  only each block's input, recomputes the whole block: +1/3 compute); from selective, full;
zero3: partition the weights too (about 1.5x the communication of ZeRO-2);
pipeline_stages: double the stages (ZeRO <= 1; a bubble of (S-1)/(M+S-1));
offload_optimizer: optimizer states and step on the CPU (ZeRO >= 1; slow step);
offload_param: ZeRO-3 weights on the CPU too (the slowest).
Each single change is tried first; then they are combined cumulatively in the same order (a later
change of the same kind - a smaller micro-batch, full after selective checkpointing - replaces
the earlier one).
Changes that would hand Adafactor flat partitions (ZeRO >= 1, or pipeline stages in bf16) are
skipped unless optim.allow_flat_adafactor=true: the config refuses them too."""


def _candidates(cfg, gpus: int, n_blocks: int) -> list[tuple[str, list[str], str]]:
    """(description, overrides, kind) for each single change of FIX_ORDER that applies to `cfg`."""
    from .ds_config import resolve_parallel

    p = cfg.parallel
    par = resolve_parallel(p, bf16_supported=True)
    base = ["parallel.ds_preset=null", f"parallel.zero_stage={par.zero_stage}",
            f"parallel.offload_optimizer={str(par.offload_optimizer).lower()}",
            f"parallel.offload_param={str(par.offload_param).lower()}", f"parallel.precision={par.precision}"]
    if p.global_batch_size is None:  # keep the global batch fixed while the micro-batch changes
        from .config import derive

        d = derive(cfg, gpus, bf16_supported=True)
        base += [f"parallel.global_batch_size={d.global_batch_size}", "parallel.gradient_accumulation_steps=null"]
    else:
        base += ["parallel.gradient_accumulation_steps=null"]
    out: list[tuple[str, list[str], str]] = []
    for kind in FIX_ORDER:
        n_before = len(out)
        if kind == "zero" and p.pipeline_stages == 1:
            for z in (1, 2):
                if z > par.zero_stage:
                    out.append((f"parallel.zero_stage={z}", [f"parallel.zero_stage={z}"]))
        elif kind == "micro_batch":
            mb = p.micro_batch_size // 2
            while mb >= 1:
                out.append((f"parallel.micro_batch_size={mb}", [f"parallel.micro_batch_size={mb}"]))
                mb //= 2
        elif kind == "activation_checkpointing":
            policies = ["selective", "full"] if not p.activation_checkpointing else \
                ["full"] if p.checkpoint_policy == "selective" else []
            for pol in policies:
                ov = ["parallel.activation_checkpointing=true", f"parallel.checkpoint_policy={pol}"]
                out.append((" ".join(ov), ov))
        elif kind == "zero3" and p.pipeline_stages == 1 and par.zero_stage < 3:
            out.append(("parallel.zero_stage=3", ["parallel.zero_stage=3"]))
        elif kind == "pipeline_stages" and par.zero_stage <= 1:
            s = p.pipeline_stages * 2
            while s <= min(gpus, n_blocks):
                if gpus % s == 0:
                    out.append((f"parallel.pipeline_stages={s}", [f"parallel.pipeline_stages={s}"]))
                s *= 2
        elif kind == "offload_optimizer" and not par.offload_optimizer:
            z = max(par.zero_stage, 2 if p.pipeline_stages == 1 else 1)
            out.append((f"parallel.zero_stage={z} parallel.offload_optimizer=true",
                        [f"parallel.zero_stage={z}", "parallel.offload_optimizer=true"]))
        elif kind == "offload_param" and not par.offload_param and p.pipeline_stages == 1:
            out.append(("parallel.zero_stage=3 parallel.offload_optimizer=true parallel.offload_param=true",
                        ["parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_param=true"]))
        out[n_before:] = [(desc, ov, kind) for desc, ov in out[n_before:]]
    return [(desc, base + ov, kind) for desc, ov, kind in out]


def find_fix(cfg, *, gpus: int, gpu: str, headroom: float = DEFAULT_HEADROOM, vocab: Optional[int] = None,
             bench_dir: Path = REPO / "bench", mfu: Optional[float] = None,
             bandwidth_gbs: Optional[float] = None) -> dict:
    """The first change (FIX_ORDER) under which the run fits: {"change", "overrides", "peak_gib",
    "step_seconds", "gpu_hours", "warnings"}, or {"change": None, "reason", "tried"}.

    Single changes first, in order; then cumulatively: each change in order is kept when the
    config still validates with it, until the run fits."""
    from . import registry

    spec = registry.get(cfg.model.arch)
    n_blocks = spec.num_layers(spec.make_config(cfg.model, vocab))
    keep_factored = cfg.optim.name == "adafactor" and not cfg.optim.allow_flat_adafactor

    def attempt(base, overrides: list[str]):
        from .config import ConfigError

        try:
            new = _apply(base, overrides)
            p = plan_config(new, gpus=gpus, gpu=gpu, headroom=headroom, vocab=vocab, bench_dir=bench_dir,
                            mfu=mfu, bandwidth_gbs=bandwidth_gbs, fix=False)
        except (ConfigError, PlanError, ValueError):
            return None, None
        if keep_factored and p["warnings"]:
            return None, None
        return new, p

    singles = _candidates(cfg, gpus, n_blocks)
    tried = [desc for desc, _, _ in singles]
    for desc, ov, _ in singles:
        _, p = attempt(cfg, ov)
        if p is not None and p["memory"]["fits"]:
            return _fix_result(desc, ov, p)
    current, applied = cfg, {}  # kind -> description of the change of that kind kept so far
    for desc, ov, kind in singles:
        new, p = attempt(current, ov)
        if p is None:
            continue
        current = new
        applied.pop(kind, None)
        applied[kind] = desc
        if p["memory"]["fits"]:
            return _fix_result(" + ".join(applied.values()), _overrides_of(current), p)
    reason = "no change in the planner's list fits"
    if keep_factored:
        reason += (" while keeping Adafactor factored (ZeRO >= 1 and bf16 pipeline stages hand it flat "
                   "partitions): set optim.allow_flat_adafactor=true to let the planner use them, or use GPUs "
                   "with more memory")
    return {"change": None, "reason": reason, "tried": tried}


def _apply(cfg, overrides: list[str]):
    """A copy of `cfg` with `parallel.x=v` overrides (the only keys the fix search changes)
    applied and the section re-checked; cross-section rules are checked by `derive` in
    plan_config. (Not through YAML: pure-Python PyYAML made the search slow.)"""
    changes: dict[str, Any] = {}
    for text in overrides:
        key, _, raw = text.partition("=")
        section, _, name = key.partition(".")
        if section != "parallel" or not hasattr(cfg.parallel, name):
            raise ValueError(f"the fix search only changes parallel.*, got {text!r}")
        changes[name] = {"null": None, "true": True, "false": False}.get(raw, int(raw) if raw.isdigit() else raw)
    parallel = dataclasses.replace(cfg.parallel, **changes)
    parallel.check()
    return dataclasses.replace(cfg, parallel=parallel)


def _overrides_of(cfg) -> list[str]:
    p = cfg.parallel
    return [f"parallel.zero_stage={p.zero_stage}", f"parallel.offload_optimizer={str(bool(p.offload_optimizer)).lower()}",
            f"parallel.offload_param={str(bool(p.offload_param)).lower()}", f"parallel.pipeline_stages={p.pipeline_stages}",
            f"parallel.micro_batch_size={p.micro_batch_size}",
            f"parallel.activation_checkpointing={str(p.activation_checkpointing).lower()}",
            f"parallel.checkpoint_policy={p.checkpoint_policy}"]


def _fix_result(desc: str, overrides: list[str], p: dict) -> dict:
    return {"change": desc, "overrides": [o for o in overrides], "peak_gib": p["memory"]["peak_gib"],
            "step_seconds": p["time"]["step_seconds"], "gpu_hours": p["time"]["gpu_hours"],
            "warnings": p["warnings"]}


def plan(config_path: Optional[str] = None, overrides: Sequence[str] = (), **kwargs) -> dict:
    """`plan_config` of a YAML file + `a.b=c` overrides (the command line's arguments)."""
    from .config import ConfigError

    try:
        cfg = _load(config_path, overrides)
    except (ConfigError, ValueError) as e:
        raise PlanError(str(e)) from None
    return plan_config(cfg, **kwargs)


# ---------------------------------------------------------------------------- text output
def _gib(x: float) -> str:
    return f"{x:8.2f}"


def format_plan(p: dict) -> str:
    """The human-readable plan (what `archscale plan` prints without --json)."""
    m, h, par, t, mem = p["model"], p["hardware"], p["parallel"], p["time"], p["memory"]
    ob = p["objective"]
    toks = (f"encoder {ob['encoder_tokens']} / decoder {ob['decoder_tokens']} tokens" if ob["encoder_tokens"]
            else f"{ob['decoder_tokens']} tokens")
    lines = [
        f"model      {m['arch'].upper()} {m['size']}: {m['parameters']:,} parameters (vocab {m['vocab_size']}, "
        f"{m['layers']} blocks); objective {ob['name']} ({toks} per row); loss {m['loss_impl_resolved']}"
        + (" (auto on CUDA)" if m["loss_impl"] == "auto" else "")
        + (f", chunks of {m['loss_chunk_size']} rows" if m["loss_impl_resolved"] == "chunked" else ""),
        f"hardware   {h['gpus']} x {h['gpu']}: {h['memory_gib']} GiB, {h['peak_tflops']:g} TFLOP/s bf16 dense, "
        f"{h['interconnect_gbs']:g} GB/s {h['interconnect']}",
        f"layout     {par['pipeline_stages']} pipeline stage(s) x {par['data_parallel']} data-parallel; micro-batch "
        f"{par['micro_batch_size']} x accumulation {par['gradient_accumulation_steps']} = global "
        f"{par['global_batch_size']} rows ({t['tokens_per_step']:,} tokens/step)",
        f"engine     {par['precision']}, ZeRO-{par['zero_stage']}"
        + (" + optimizer offload" if par["offload_optimizer"] else "") + (" + param offload" if par["offload_param"] else "")
        + f", optimizer {par['optimizer']} under {par['optimizer_wrapper']}, activation checkpointing "
        + (par["checkpoint_policy"] if par["activation_checkpointing"] else "off") + f" (preset {par['ds_preset']})",
        "",
        f"{'memory per GPU (GiB)':<32}" + "".join(f"{'stage ' + str(s['stage']):>10}" for s in mem["stages"]),
    ]
    rows = [("parameters on the GPU's stage", "parameters"), ("weights", "weights"), ("gradients", "gradients"),
            ("optimizer: fp32 master", "optimizer_master"), ("optimizer: states", "optimizer_states"),
            ("ZeRO-3 gathered layers", "zero3_gathered_layers"), ("DeepSpeed buffers", "buffers"),
            ("activations / micro-batch", "activations_saved_per_micro_batch"),
            ("micro-batches in flight", "micro_batches_in_flight"), ("backward working set", "activations_working"),
            ("activations in all", "activations"), ("optimizer-step transient", "step_transient"),
            ("peak", "peak"), ("on the host (offload)", "host_offload")]
    for label, key in rows:
        vals = []
        for s in mem["stages"]:
            v = s[key]
            vals.append(f"{v / 1e9:9.3f}B" if key == "parameters" else f"{v:>10}" if isinstance(v, int) else f"{v:10.2f}")
        lines.append(f"  {label:<30}" + "".join(vals))
    verdict = "FITS" if mem["fits"] else "DOES NOT FIT"
    lines += [f"  usable: {h['memory_gib']} GiB - {h['headroom']:.0%} headroom = {mem['usable_gib']:.2f} GiB; "
              f"peak {mem['peak_gib']:.2f} GiB (stage {mem['binding_stage']}): {verdict} "
              f"({'margin' if mem['fits'] else 'short by'} {abs(mem['margin_gib']):.2f} GiB)"]
    for w in p["warnings"]:
        lines.append(f"  warning: {w}")
    fix = p.get("fix")
    if fix is not None:
        if fix["change"]:
            lines.append(f"  fix: {fix['change']}  -> peak {fix['peak_gib']:.2f} GiB, step {fix['step_seconds']:.2f} s, "
                         f"{fix['gpu_hours']:,.0f} GPU-hours")
            lines += [f"  warning (with the fix): {w}" for w in fix.get("warnings", [])]
        else:
            lines.append(f"  fix: none found: {fix['reason']}")
    lines += [
        "",
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
    return "\n".join(lines)


# ----------------------------------------------------------------------- reference plan
REFERENCE_COMMON = ["optim.name=adafactor", "optim.lr=0.01", "schedule.name=inverse_sqrt", "schedule.rsqrt_steps=10000",
                    "model.z_loss=1e-4", "parallel.global_batch_size=2048", "parallel.micro_batch_size=8",
                    "parallel.zero_stage=0"]
REFERENCE_CELLS = [(a, o) for a in ("cd", "nd", "ed") for o in ("flm", "plm", "mlm")]
REFERENCE_TOKENS = {"pretrain": 168e9, "nc-a": 51e9, "mt-f": 13e9}


def _reference_runs() -> list[dict]:
    """Every run of the reference experiment as (name, overrides), SCIENCE.md's numbers."""
    runs = []
    for arch, obj in REFERENCE_CELLS:
        size = "11b" if arch == "ed" else "4.8b"
        runs.append({"run": f"{arch.upper()}:{obj.upper()}", "phase": "pretraining", "arch": arch, "objective": obj,
                     "overrides": [f"model.arch={arch}", f"model.size={size}", f"objective.name={obj}",
                                   f"schedule.train_tokens={int(REFERENCE_TOKENS['pretrain'])}"]})
    runs.append({"run": "CD:FLM -> NC-A (ND:MLM)", "phase": "adaptation", "arch": "nd", "objective": "mlm",
                 "overrides": ["model.arch=nd", "model.size=4.8b", "objective.name=mlm",
                               f"schedule.train_tokens={int(REFERENCE_TOKENS['nc-a'])}"]})
    mtf = [r for r in runs if r["phase"] == "pretraining" and not (r["arch"] == "ed" and r["objective"] == "flm")]
    mtf.append(runs[-1])
    for r in mtf:
        arch = r["arch"]
        runs.append({"run": f"{r['run']} -> MT-F", "phase": "multitask finetuning", "arch": arch, "objective": "prompted",
                     "overrides": [f"model.arch={arch}", f"model.size={'11b' if arch == 'ed' else '4.8b'}",
                                   "objective.name=prompted", "model.overrides.dropout=0.1", "optim.lr=1e-3",
                                   "schedule.name=constant", f"schedule.train_tokens={int(REFERENCE_TOKENS['mt-f'])}"]})
    return runs


def reference_plan(gpus: int = 64, gpu: str = "h100-80gb", *, mfu: Optional[float] = None,
                   bench_dir: Path = REPO / "bench", headroom: float = DEFAULT_HEADROOM) -> dict:
    """The reference experiment (SCIENCE.md) on `gpus` x `gpu`: every pretraining cell CD/ND/ED x
    FLM/PLM/MLM at 168B tokens (ED:FLM does not exist: flm has no encoder input), NC-A
    (CD:FLM -> ND:MLM, 51B tokens), and MT-F (13B tokens, dropout 0.1, lr 1e-3 constant) of every
    pretrained model and of the NC-A model. Each run starts from the reference setup (Adafactor,
    ZeRO-0, micro-batch 8, global batch 2048) and takes the planner's first fix when it does not
    fit; when only flat-Adafactor layouts fit, it is planned with optim.allow_flat_adafactor=true
    and says so. MT-F runs use the objective's default lengths (as pretraining)."""
    rows, total = [], 0.0
    for r in _reference_runs():
        ov = REFERENCE_COMMON + r["overrides"]
        row = {"run": r["run"], "phase": r["phase"], "tokens": None, "overrides": ov}
        if r["arch"] == "ed" and r["objective"] == "flm":
            rows.append({**row, "status": "not available: objective flm has no encoder input for ED"})
            continue
        p = plan(None, ov, gpus=gpus, gpu=gpu, mfu=mfu, bench_dir=bench_dir, headroom=headroom)
        note = ""
        if not p["memory"]["fits"] and (p["fix"] or {}).get("change") is None:
            ov = ov + ["optim.allow_flat_adafactor=true"]
            p = plan(None, ov, gpus=gpus, gpu=gpu, mfu=mfu, bench_dir=bench_dir, headroom=headroom)
            note = "flat Adafactor (no factored layout fits); "
        chosen = p
        change = "as configured"
        if not p["memory"]["fits"]:
            fix = p["fix"] or {}
            if fix.get("change") is None:
                rows.append({**row, "status": f"does not fit: {fix.get('reason')}"})
                continue
            change = fix["change"]
            chosen = plan(None, ov + fix["overrides"], gpus=gpus, gpu=gpu, mfu=mfu, bench_dir=bench_dir,
                          headroom=headroom, fix=False) if "overrides" in fix else p
            if chosen["warnings"] and not note:
                note = "flat Adafactor; "
        t, par = chosen["time"], chosen["parallel"]
        total += t["gpu_hours"]
        rows.append({**row, "tokens": t["train_tokens"], "status": "ok", "layout": note + change,
                     "parameters": chosen["model"]["parameters"],
                     "zero_stage": par["zero_stage"], "pipeline_stages": par["pipeline_stages"],
                     "micro_batch_size": par["micro_batch_size"],
                     "activation_checkpointing": par["activation_checkpointing"],
                     "checkpoint_policy": par["checkpoint_policy"],
                     "peak_gib": chosen["memory"]["peak_gib"], "step_seconds": t["step_seconds"],
                     "tokens_per_second": t["tokens_per_second"], "wall_hours": t["wall_hours"],
                     "gpu_hours": t["gpu_hours"], "gpu_hours_overlapped": t["gpu_hours_overlapped"],
                     "mfu": t["mfu"], "mfu_source": t["mfu_source"],
                     "warnings": chosen["warnings"]})
    total_overlapped = sum(r.get("gpu_hours_overlapped", 0.0) for r in rows)
    return {"schema": 1, "gpus": gpus, "gpu": gpu, "rows": rows, "total_gpu_hours": total,
            "total_gpu_hours_overlapped": total_overlapped,
            "total_wall_hours_one_run_at_a_time": total / gpus}


def format_reference(ref: dict) -> str:
    lines = [f"The reference experiment on {ref['gpus']} x {ref['gpu']} (one run at a time on all GPUs)", "",
             "| run | phase | tokens | layout (first fit) | peak GiB | step s | tokens/s | wall h | GPU-hours | "
             "GPU-hours, comm. overlapped |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in ref["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['run']} | {r['phase']} | - | {r['status']} | | | | | | |")
            continue
        lines.append(f"| {r['run']} | {r['phase']} | {r['tokens'] / 1e9:.1f}B | {r['layout']} | {r['peak_gib']:.1f} | "
                     f"{r['step_seconds']:.2f} | {r['tokens_per_second']:,.0f} | {r['wall_hours']:,.1f} | "
                     f"{r['gpu_hours']:,.0f} | {r['gpu_hours_overlapped']:,.0f} |")
    lines += [f"| **total** | | | | | | | {ref['total_wall_hours_one_run_at_a_time']:,.0f} | "
              f"**{ref['total_gpu_hours']:,.0f}** | **{ref['total_gpu_hours_overlapped']:,.0f}** |"]
    mfus = sorted({r["mfu_source"] for r in ref["rows"] if r["status"] == "ok"})
    lines += ["", "MFU: " + "; ".join(mfus)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- CLI
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="archscale plan", description="Will a run fit, how long, how many GPU-hours "
                                 "(analytic; no GPU, no DeepSpeed, no model built). See docs/planning.md.")
    ap.add_argument("args", nargs="*", help="[CONFIG.yaml] then overrides a.b=c (defaults < file < overrides)")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs in the job (default 1; --reference: 64)")
    ap.add_argument("--gpu", default="h100-80gb", help=f"GPU kind: {', '.join(GPUS)} (default h100-80gb)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--mfu", type=float, default=None, help="model-FLOPs utilisation to assume (default: measured "
                    f"in bench/ for this GPU, else {DEFAULT_MFU})")
    ap.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                    help=f"fraction of GPU memory kept free (default {DEFAULT_HEADROOM})")
    ap.add_argument("--bandwidth", type=float, default=None, help="interconnect GB/s per GPU (default: the GPU table)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the model size's, 32128 for "
                    "the reference sizes; the trainer takes it from the tokenizer)")
    ap.add_argument("--reference", action="store_true", help="the reference experiment's plan (docs/planning.md)")
    a = ap.parse_args(argv)
    try:
        get_gpu(a.gpu)
        if a.reference:
            ref = reference_plan(a.gpus or 64, a.gpu, mfu=a.mfu, headroom=a.headroom)
            print(json.dumps(ref, indent=1) if a.json else format_reference(ref))
            return 0
        path = a.args[0] if a.args and "=" not in a.args[0] else None
        overrides = a.args[1:] if path else a.args
        p = plan(path, overrides, gpus=a.gpus or 1, gpu=a.gpu, mfu=a.mfu, headroom=a.headroom,
                 bandwidth_gbs=a.bandwidth, vocab=a.vocab)
    except (PlanError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=1) if a.json else format_plan(p))
    return 0 if p["memory"]["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
