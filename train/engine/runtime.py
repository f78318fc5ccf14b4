"""The DeepSpeed side of training: processes, devices, the engine, one optimizer step.

Runs as one process with no launcher (CPU or one GPU), under torchrun, under the deepspeed
launcher and under srun: `setup_distributed` reads whichever environment is there. On CPU the
backend is gloo; on GPUs nccl.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Iterable, Optional

import torch


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(deepspeed, backend: str, retry_port: bool, tries: int = 8) -> None:
    """deepspeed.init_distributed; a world of one whose port this process picked picks another when
    that port was taken between the pick and the store's bind (another process's outgoing
    connection can land on it: the pick is a free ephemeral port, not a reservation)."""
    for attempt in range(tries):
        try:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
            return
        except torch.distributed.DistNetworkError as e:
            if not retry_port or "EADDRINUSE" not in str(e) or attempt == tries - 1:
                raise
            os.environ["MASTER_PORT"] = str(_free_port())


# The environment variables setup_distributed set itself, with what they were before (None:
# unset); teardown_distributed puts them back, so that neither a later run in this process nor a
# process it starts inherits a world of one's rank and port as if a launcher had set them.
_ENV_BEFORE: dict[str, Optional[str]] = {}
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")


def setup_distributed() -> Dist:
    """Initialise torch.distributed through DeepSpeed, from torchrun / deepspeed / srun
    variables, or as a single process when none are set. The rendezvous variables it sets are
    recorded (_ENV_BEFORE) for teardown_distributed to put back."""
    before = {k: os.environ.get(k) for k in _RENDEZVOUS}
    try:
        return _setup_distributed(os.environ)
    finally:
        _ENV_BEFORE.update({k: v for k, v in before.items() if os.environ.get(k) != v and k not in _ENV_BEFORE})


def _setup_distributed(env) -> Dist:
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        # srun started one task per GPU: map Slurm's variables; the sbatch script sets the rendezvous
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise RuntimeError("srun with several tasks needs MASTER_ADDR and MASTER_PORT (the sbatch template "
                               "sets them): launch through `archscale submit`")
    chose_port = False
    if "RANK" not in env:  # a plain `python -m train ...`: a world of one
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in env:
            env["MASTER_PORT"], chose_port = str(_free_port()), True
    cuda = torch.cuda.is_available() and env.get("DS_ACCELERATOR", "") != "cpu"
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not cuda:
        # DeepSpeed would first compile a shared-memory allreduce C++ op (minutes on a small
        # CPU machine); gloo's allreduce serves the CPU runs this stack does.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(env["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        _init_process_group(deepspeed, "nccl" if cuda else "gloo", retry_port=chose_port)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=local_rank, device=device)


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def all_sum(values: list[float], device) -> list[float]:
    """Sum floats over all processes (one small all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def all_gather_object(obj) -> list:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def initialize(model, cfg, derived, ds_config: dict):
    """deepspeed.initialize with the client optimizer and schedule of the run config."""
    import deepspeed

    from .ds_config import build_lr_scheduler, build_optimizer, param_groups

    optimizer = build_optimizer(param_groups(model.named_parameters(), cfg.optim.weight_decay), cfg.optim, derived)
    scheduler = build_lr_scheduler(optimizer, cfg.schedule, derived.max_steps, cfg.optim)
    # a pipeline engine built earlier in this process leaves its grid as DeepSpeed's global mpu;
    # a plain engine would then read its model-parallel size and fail ('NoneType' ... get_model_parallel_rank)
    from deepspeed.utils import groups

    groups.mpu = None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    undo_init_step(engine)
    return engine


def undo_init_step(engine) -> bool:
    """Undo the optimizer step DeepSpeed's FP16_UnfusedOptimizer takes at construction; returns
    whether there was one to undo.

    That wrapper (bf16 at ZeRO-0 without pipeline stages; DeepSpeed 0.19.8,
    fp16/unfused_optimizer.py initialize_optimizer_states) sets every gradient to zero and calls
    the client optimizer's step() once, to create its state. With AdamW that step is not free:
    the step count becomes 1 (so the first real step is bias-corrected as step 2: an update of
    (0.1 / 0.19) / sqrt(0.001 / 0.001999) = 0.74 of Adam's first step), weight decay shrinks the
    fp32 master by (1 - lr_0 wd) while the bf16 weights the model computes with keep their
    values, and Adafactor's decay schedule starts one step late. Seen: bf16 ZeRO-0 trailed fp32
    by 0.018 nats after 6 debug steps, the other stages by < 1e-3 (tests/test_bf16.py). Undone
    here: the inner optimizer's state is dropped (it is rebuilt lazily at the first real step,
    as every other stage's is) and the master copied back from the bf16 weights, which is what
    it held before that step."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrapper = getattr(engine, "optimizer", None)
    if not isinstance(wrapper, FP16_UnfusedOptimizer):
        return False
    wrapper.optimizer.state.clear()
    wrapper.refresh_fp32_params()
    return True


def untie_optimizer_steps(engine) -> int:
    """Give every optimizer state its own `step` tensor; returns how many were shared.

    DeepSpeed 0.19.8's ZeRO-3 universal-checkpoint load (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3) puts one and the same `step` tensor
    into the state of every flat parameter group; torch's AdamW increments it in place once
    per group, so with two groups (decayed, not decayed) the step count, hence Adam's bias
    correction, runs ahead twice as fast after the resume (seen: the weights 3.6% off the
    uninterrupted run's after two steps). Call after load_checkpoint."""
    opt = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    seen, shared = set(), 0
    for st in (getattr(opt, "state", None) or {}).values():
        step = st.get("step") if isinstance(st, dict) else None
        if torch.is_tensor(step):
            if id(step) in seen:
                st["step"] = step.clone()
                shared += 1
            seen.add(id(step))
    return shared


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


SEGMENT_KEYS = ("segment_ids", "decoder_segment_ids")  # the batch contract's segment tensors (docs/design.md)


def drop_trivial_segments(batch: dict) -> dict:
    """A batch whose rows are each one example with no padding (every segment id 1, in every
    segment tensor it has: a decoder's `segment_ids`, or ED's encoder and decoder ones) needs no
    segment mask: without them the model runs plain SDPA (causal, bidirectional or cross) instead
    of a flex block mask; positions and the loss are the same. All or none are dropped: ED
    without encoder segments but with decoder ones would pair decoder segment s with no encoder
    token. Checked on the host copy, before the transfer: no device synchronisation."""
    segs = [batch[k] for k in SEGMENT_KEYS if k in batch]
    if not segs or any(s.device.type != "cpu" or not bool((s == 1).all()) for s in segs):
        return batch
    return {k: v for k, v in batch.items() if k not in SEGMENT_KEYS}


def split_micro(batch: dict, micro: int) -> list[dict]:
    """This rank's rows of one optimizer step -> micro-batches of `micro` rows, in order."""
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i:i + micro] for k, v in batch.items()} for i in range(0, n, micro)]


@dataclass(frozen=True)
class StepLosses:
    """The loss terms of one optimizer step on this rank, means over its micro-batches. A term
    the engine does not measure is None, never 0.0 (train.engine.engines: a pipeline step
    reports only `loss`)."""

    loss: float  # ce_loss + z_loss coefficient x z_loss
    ce_loss: Optional[float] = None  # cross-entropy per target token
    z_loss: Optional[float] = None  # mean logsumexp^2 (before its coefficient)


def train_step(engine, micro_batches: Iterable[dict]) -> StepLosses:
    """Forward, backward and the optimizer step over one step's micro-batches (DeepSpeed
    accumulates and steps at the boundary). Returns the mean loss terms of this rank (a term
    the model's output leaves None stays None).

    The loss terms stay on the device until the step is over: one host synchronisation per
    step, none between micro-batches, so the host queues the next micro-batch's kernels while
    the device still runs the last one's."""
    names = ("loss", "ce_loss", "z_loss")
    sums: dict = {}
    n = 0
    for mb in micro_batches:
        out = engine(**to_device(drop_trivial_segments(mb), engine.device))
        engine.backward(out.loss)
        if engine.is_gradient_accumulation_boundary() and _reports_no_grad_norm(engine):
            # the accumulated, all-reduced gradients, before clipping (what ZeRO >= 1 reports)
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            engine._archscale_grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None
        engine.step()
        for k in names:
            v = getattr(out, k)
            if v is not None:
                v = v.detach().float()
                sums[k] = v if k not in sums else sums[k] + v
        n += 1
    values = torch.stack([sums[k] for k in names if k in sums]).tolist() if sums else []  # the one sync
    got = dict(zip([k for k in names if k in sums], values))
    return StepLosses(**{k: got[k] / max(n, 1) if k in got else None for k in names})


@torch.no_grad()
def eval_loss(module, batches: Iterable[dict], device) -> tuple[float, float]:
    """(sum of per-token cross-entropy, number of target tokens) over `batches`, this rank. The
    target tokens are those the model's loss averages over: its labels as model_zoo's
    align_labels aligns them for the model's class (`shifts_labels`), for any layout."""
    from model_zoo.loss import align_labels

    was_training = module.training
    module.eval()
    total, count = 0.0, 0.0
    for b in batches:
        b = to_device(b, device)
        out = module(**b)
        _, labels = align_labels(b["labels"], module.shifts_labels)  # (B, T)
        n = float((labels != -100).sum())
        total += float(out.ce_loss) * n
        count += n
    module.train(was_training)
    return total, count


def _reports_no_grad_norm(engine) -> bool:
    """DeepSpeed's fp32 ZeRO-0 path clips without keeping the norm (get_global_grad_norm() is None)."""
    return engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())


def grad_norm(engine) -> Optional[float]:
    """The global gradient norm of the last optimizer step, before clipping."""
    try:
        v = engine.get_global_grad_norm()
    except Exception:  # not every ZeRO stage / engine reports it
        v = None
    if v is None:
        v = getattr(engine, "_archscale_grad_norm", None)  # set by train_step where DeepSpeed keeps none
    return float(v) if v is not None else None


CHECKPOINTING = ("none", "full", "selective")


def _selective_policy():
    """Selective activation checkpointing: keep the outputs of matmuls and attention kernels,
    recompute everything else in the backward pass (norms with their fp32 statistics,
    activations and the gate product, RoPE, residual adds, dropout with its saved RNG state).
    Recomputing those costs a few pointwise kernels per block, a small fraction of its FLOPs."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    save = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        save.add(flex)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def prepare_blocks(model, checkpointing: str = "none", compile: bool = False) -> int:
    """Give every Block of `model` (model_zoo stacks and pipeline layers alike) a `runner`: its
    `body` under activation checkpointing (`full`: recompute the whole block in the backward
    pass; `selective`: keep matmul and attention outputs, recompute the rest) and/or
    torch.compile (one graph per stack kind and mask direction: the body takes no layer index).
    Applied from outside the model: no module is wrapped, state-dict keys are unchanged.
    Checkpointing goes inside the compiled function, as torch.compile expects it. Returns the
    number of blocks prepared."""
    import functools

    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    from model_zoo.blocks import Block, allow_compiled_variants

    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"activation checkpointing {checkpointing!r} is not valid; choose one of "
                         f"{', '.join(CHECKPOINTING)}")
    context_fn = None
    if checkpointing == "selective":
        policy = _selective_policy()
        context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    if compile:
        allow_compiled_variants()
    n = 0
    for block in (m for m in model.modules() if isinstance(m, Block)):
        fn = block.body
        if checkpointing != "none":
            kw = {"context_fn": context_fn} if context_fn is not None else {}
            fn = functools.partial(_checkpointed, fn, kw)
        if compile:
            fn = torch.compile(fn, dynamic=False)
        block.runner = fn if (compile or checkpointing != "none") else None
        n += 1
    return n


def _checkpointed(fn, kw: dict, *args):
    """fn(*args), recomputed in the backward pass when gradients are being recorded."""
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, **kw)


def teardown_distributed() -> None:
    """Destroy the process group and DeepSpeed's cached groups with it (deepspeed.comm's
    destroy_process_group), so that a later run in the same process (a notebook, the tests)
    starts clean. torch.distributed.destroy_process_group alone leaves DeepSpeed holding stale
    groups ("Group ... is not registered"). The rendezvous variables setup_distributed set
    (a world of one's RANK, MASTER_PORT, ...) are put back as they were."""
    if torch.distributed.is_initialized():
        import deepspeed

        deepspeed.comm.destroy_process_group()
    for k, v in _ENV_BEFORE.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _ENV_BEFORE.clear()
