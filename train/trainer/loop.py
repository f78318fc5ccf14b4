"""The training loop: config -> data -> model -> DeepSpeed engine -> steps -> checkpoints.

`train(cfg)` runs one cell of the comparison in this process (one rank of a job). It resumes
from the run directory's newest complete checkpoint (`checkpoint.resume=auto`), also on another
number of processes (through a DeepSpeed universal checkpoint), saves every N steps, at the end,
and when SIGTERM / SIGUSR1 arrives (then it returns with `stopped_by` set, for a requeue).

Start-up (`_start`) builds a `Trainer`; the loop (`_train`) runs its steps and calls the
callbacks of train/trainer/callbacks.py around them: the non-finite guard, metrics and progress, the
held-out loss, signals, checkpoints and the end of the run. The Trainer holds one `Engine`
(train/engine/engines.py), plain or pipelined: neither the loop nor a callback asks which.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import checkpointing as ckpt
from .integrity import RunLock, verify_checkpoint
from ..engine import runtime as eng
from ..engine.engines import ENGINE_TAG, UNIVERSAL_TAG, Engine, StepLosses, build_engine
from .. import registry
from ..atomic import atomic_path
from .branch import branch_of, write_branch_file
from .fitcheck import MemoryPlan, fit_check
from .callbacks import Callback, Signals, default_callbacks
from ..config import ConfigError, Derived, RunConfig, config_to_yaml, derive

log = logging.getLogger("archscale.train")


@dataclass
class RunResult:
    """What a finished (or stopped) run reports."""

    run_dir: str
    arch: str
    objective: str
    params: int
    step: int
    max_steps: int
    tokens_seen: int
    target_tokens: int
    flops: float
    eval_loss: Optional[float]
    tokens_per_s: float
    stopped_by: Optional[str] = None  # the signal's name when a signal stopped the run
    planned_flops_per_step: float = 0.0  # registry.step_flops: what --dry-run, plan and compare print
    losses: list = field(default_factory=list)  # (step, train loss)
    eval_losses: list = field(default_factory=list)  # (step, tokens seen, flops, held-out loss)
    yardstick: Optional[dict] = None  # the last evaluation's common yardstick (train/eval/yardstick.py)
    yardsticks: list = field(default_factory=list)  # {step, tokens_seen, target_tokens, flops, yardstick_nats, ...}


def check(cfg: RunConfig, world_size: int, *, bf16_supported: bool = False) -> Derived:
    """Every check of the config against the world that needs no data and no model: the derived
    numbers (batch sizes that divide, stages vs layers, ZeRO with pipeline, ...). Cheap (the layer
    count comes from the model's config, nothing is built); `train` calls it before it writes or
    prepares anything. Raises ConfigError with a one-line message.
    """
    from .wandb_log import require

    require(cfg)  # logging.wandb without the wandb package
    try:
        cfg.data.check_training_source()  # a reference preset without its data (data.allow_embedded=false)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    arch = registry.get(cfg.model.arch)
    try:
        model_config = arch.make_config(cfg.model)  # the tokenizer's vocabulary does not change the layers
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    num_layers = arch.num_layers(model_config)
    from ..objectives import check_objective_config

    try:  # build_objective's length checks with the tokens the data section adds (not rank 0's stream build)
        check_objective_config(cfg.objective, arch, cfg.data.num_sentinels, cfg.data.mode_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # tokens per row: derive's default, the row shape's (a ConfigError when the lengths do not fit)
    return derive(cfg, world_size, num_layers=num_layers, bf16_supported=bf16_supported)


def train(cfg: RunConfig, *, max_steps_now: Optional[int] = None, desc: Optional[str] = None,
          fixed_batch: bool = False) -> RunResult:
    """Train (or resume) the run `cfg` describes. `max_steps_now`: stop after this many steps of
    this invocation (tests of resumption), leaving the schedule as configured. `fixed_batch`:
    every step trains on the stream's first batch again (`archscale train --overfit`, train/trainer/debug.py).

    SIGTERM / SIGUSR1 handlers are installed first, so a signal during start-up (data
    preparation, model build, checkpoint load) stops the run cleanly before its first step
    instead of killing the process. The run directory is locked (RUN/.lock) from the end of the
    checks until the run returns: a second trainer on it is refused."""
    signals, lock = Signals(), RunLock()
    try:
        return _train(cfg, signals, lock, max_steps_now=max_steps_now, desc=desc, fixed_batch=fixed_batch)
    finally:
        lock.release()
        signals.restore()


def _train(cfg: RunConfig, signals: Signals, lock: RunLock, *, max_steps_now: Optional[int], desc: Optional[str],
           fixed_batch: bool = False) -> RunResult:
    """Start up, then one `train_step` after another until `stop_at` or until a callback stops the
    run; the callbacks (train/trainer/callbacks.py) do everything around the steps, in their list's order."""
    t = _start(cfg, lock, max_steps_now=max_steps_now, fixed_batch=fixed_batch)
    callbacks = default_callbacks(t, signals, desc)
    t.t_start, t.tok_start = time.perf_counter(), t.tokens_seen
    try:
        for cb in callbacks:
            cb.pre_train(t)
        while t.step < t.stop_at and t.stopped_by is None:
            t.train_step(callbacks)
            for cb in callbacks:
                cb.post_step(t)
        t.elapsed = time.perf_counter() - t.t_start
        for cb in callbacks:
            cb.post_train(t)
    finally:
        for cb in reversed(callbacks):
            cb.close()
    return t.finish()


@dataclass
class Trainer:
    """What start-up built, and the counters the steps advance; the callbacks read and set it."""

    cfg: RunConfig
    dist: Any  # engine.Dist
    arch: Any  # registry.ArchSpec
    derived: Derived
    layout: ckpt.RunLayout
    prepared: Any  # data.PreparedData
    model: Any  # the model_zoo model as built (its config: FLOPs, the pipeline's batch layout)
    engine: Engine  # plain or pipelined, behind the same calls (train/engine/engines.py)
    stream: Any
    config_yaml: str
    init_info: dict  # TrainerState.init
    resumed: bool  # started from a checkpoint (of this run, or of a decay branch's parent)
    result: RunResult
    branch_info: dict = field(default_factory=dict)  # TrainerState.branch: a decay branch's parent
    step: int = 0
    tokens_seen: int = 0
    target_tokens: int = 0
    flops: float = 0.0
    stop_at: int = 0  # the last step of this invocation
    stopped_by: Optional[str] = None  # set by a callback: the loop ends after this step
    # the last step: its loss (mean over ranks), this rank's loss terms and batch, the stop vote
    loss: float = 0.0
    step_losses: Optional[StepLosses] = None
    batch: Optional[dict] = None
    stop_requested: bool = False
    memory_plan: Optional[MemoryPlan] = None  # the start-up fit check's planned peak (None: not checked)
    t_start: float = 0.0  # time.perf_counter() and tokens seen when the loop began
    tok_start: int = 0
    elapsed: float = 0.0

    def train_step(self, callbacks: list[Callback]) -> None:
        """One optimizer step on this rank's rows of the next global batch, then one all-reduce
        of the counts, the loss and the callbacks' stop votes."""
        from ..objectives import pop_counts

        while True:
            batch = next(self.stream)
            counts = pop_counts(batch)
            micro = eng.split_micro(batch, self.derived.micro_batch_size)
            if not self._has_empty_micro(micro):
                break
        here = 1.0 if self.engine.counts_rows else 0.0  # a pipeline counts its rows once, on its first stage
        batch_flops = self.arch.batch_flops(self.model.config, batch) if here else 0.0
        for cb in callbacks:
            cb.pre_step(self)
        losses = self.engine.train_batch(micro)
        vote = 1.0 if any(cb.wants_stop(self) for cb in callbacks) else 0.0
        red = eng.all_sum([counts["num_tokens"] * here, counts["num_target_tokens"] * here, batch_flops,
                           losses.loss, vote], self.dist.device)
        self.step += 1
        self.tokens_seen += int(red[0])
        self.target_tokens += int(red[1])
        self.flops += red[2]
        self.loss = red[3] / self.dist.world_size
        self.step_losses, self.batch, self.stop_requested = losses, batch, red[4] > 0

    def _has_empty_micro(self, micro: list[dict]) -> bool:
        """Whether a micro-batch of this step, on any rank, has no target token: the padded tail of
        an epoch can leave one (its mean loss is 0 / 0 = nan and would stop the run as non-finite).
        Such a batch is skipped on every rank alike (the same stream position everywhere, so a
        resume skips it again); found by the fault campaign's 960-step run (bench/faults)."""
        empty = any(int((m["labels"] != -100).sum()) == 0 for m in micro if "labels" in m)
        if self.dist.world_size > 1:
            empty = eng.all_sum([1.0 if empty else 0.0], self.dist.device)[0] > 0
        if empty and self.dist.is_rank0:
            log.info("step %d: skipped a batch with a micro-batch of no target tokens (an epoch's tail)", self.step + 1)
        return empty

    def finish(self) -> RunResult:
        r = self.result
        r.step, r.tokens_seen, r.target_tokens, r.flops = self.step, self.tokens_seen, self.target_tokens, self.flops
        r.stopped_by = self.stopped_by
        r.tokens_per_s = (self.tokens_seen - self.tok_start) / max(self.elapsed, 1e-9)
        return r


# ---------------------------------------------------------------------------------- start-up
def _start(cfg: RunConfig, lock: RunLock, *, max_steps_now: Optional[int], fixed_batch: bool) -> Trainer:
    """Check the config, prepare the data, write the run files, build the model and the engine,
    load the init weights or resume: the Trainer of the first step."""
    dist = eng.setup_distributed()
    arch, derived, layout, resume_dir, state, memory_plan = _preflight(cfg, lock, dist)
    branch = branch_of(cfg, derived, layout, resume_dir, state)  # a decay branch: refused unless it continues
    torch.manual_seed(cfg.seed)
    prepared = _prepare_data(cfg, dist)  # bad data: refused before the run directory is made
    if dist.is_rank0 and lock.fd is None:
        lock.acquire(layout.root)  # the first write: nothing is written into a run directory in use
    vocab = registry.padded_vocab(prepared.tokens.vocab_size)
    universal = state is not None and state.world_size != dist.world_size and (
        derived.zero_stage >= 1 or derived.pipeline_stages > 1)
    ds_config, config_yaml = _write_run_files(cfg, derived, layout, dist, universal)
    if dist.is_rank0:
        write_branch_file(layout.root, branch)

    model = arch.build(cfg.model, vocab)
    init_info, init_dir = (dict(state.init) if state is not None else {}), None
    if state is None and cfg.init.from_checkpoint:
        init_dir, init_info = _init_weights(cfg, model, arch, dist, derived)
    engine = build_engine(cfg, model, derived, ds_config, dist)
    t = Trainer(cfg=cfg, dist=dist, arch=arch, derived=derived, layout=layout, prepared=prepared, model=model,
                engine=engine, stream=_stream(cfg, prepared, derived, engine, fixed_batch), config_yaml=config_yaml,
                init_info=init_info, resumed=state is not None, result=_result(cfg, arch, model, derived),
                branch_info=branch, memory_plan=memory_plan)
    if init_dir is not None and cfg.init.load_optimizer:
        # the parent's optimizer state (and weights, the same as loaded above); not its schedule or step
        engine.load(init_dir, schedule=False)
    if state is not None:
        _resume(t, resume_dir, state, universal)
    t.stop_at = derived.max_steps if max_steps_now is None else min(derived.max_steps, t.step + max_steps_now)
    return t


def _preflight(cfg: RunConfig, lock: RunLock, dist) -> tuple[Any, Derived, ckpt.RunLayout, Optional[Path],
                                                             Optional[ckpt.TrainerState], Optional[MemoryPlan]]:
    """Every check that needs no data and no model, before any work: the config against the
    world, the planned peak memory against the device's (train/trainer/fitcheck.py), the run
    layout, the checkpoint to resume (its files verified) or to start from, the run directory's
    lock. (registry entry, derived numbers, layout, resume directory, its state, the memory plan)."""
    arch = registry.get(cfg.model.arch)
    derived = check(cfg, dist.world_size, bf16_supported=_bf16_supported(dist.device))
    memory_plan = fit_check(cfg, derived, dist.device, dist.world_size)  # refused before any file or tensor
    layout = ckpt.RunLayout.from_config(cfg)  # a bad checkpoint.resume fails here
    for d in (layout.root, layout.checkpoints):
        if d.exists() and not d.is_dir():
            raise ConfigError(f"{d} is a file, not a directory: choose another run_dir (or checkpoint.dir)")
    resume_dir, state = _resume_point(cfg, derived)  # and the checkpoint's files verified
    if state is None and cfg.init.from_checkpoint:
        init_source(cfg.init.from_checkpoint, arch)  # a bad init checkpoint
    if dist.is_rank0 and layout.root.is_dir():
        lock.acquire(layout.root)  # a run directory in use
    return arch, derived, layout, resume_dir, state, memory_plan


def _write_run_files(cfg: RunConfig, derived: Derived, layout: ckpt.RunLayout, dist,
                     universal: bool) -> tuple[dict, str]:
    """The DeepSpeed JSON and the resolved config, written into the run directory by rank 0
    (the others wait): (ds_config, config.yaml's text)."""
    from ..engine.ds_config import build_ds_config

    ds_config = build_ds_config(cfg, derived, load_universal=universal)
    config_yaml = config_to_yaml(cfg)
    if dist.is_rank0:
        layout.create()
        layout.write_run_files(config_yaml, ds_config)
    eng.barrier()
    return ds_config, config_yaml


def _stream(cfg: RunConfig, prepared, derived: Derived, engine: Engine, fixed_batch: bool):
    """This data-parallel rank's share of the global batches (every stage of a pipeline reads the
    same rows); with `fixed_batch` (--overfit) the first batch, again and again (train/trainer/debug.py)."""
    from ..data import build_stream

    stream = build_stream(prepared, cfg.objective, cfg.model.arch, global_batch_size=derived.global_batch_size,
                          rank=engine.dp_rank, world_size=engine.dp_size, seed=cfg.data.seed, data=cfg.data,
                          prefetch=cfg.data.prefetch)
    if fixed_batch:
        from .debug import RepeatFirst

        stream = RepeatFirst(stream)
    return stream


def _result(cfg: RunConfig, arch, model, derived: Derived) -> RunResult:
    """The RunResult before the first step: what the run is (its counters are filled at the end)."""
    return RunResult(run_dir=str(cfg.run_dir), arch=cfg.model.arch, objective=cfg.objective.name,
                     params=arch.num_params(model.config), step=0, max_steps=derived.max_steps, tokens_seen=0,
                     target_tokens=0, flops=0.0, eval_loss=None, tokens_per_s=0.0,
                     planned_flops_per_step=arch.step_flops(model.config, cfg.objective, derived.global_batch_size))


def _resume_point(cfg: RunConfig, derived: Derived) -> tuple[Optional[Path], Optional[ckpt.TrainerState]]:
    """The checkpoint to resume from (checkpoint.resume) and its trainer state, or (None, None)."""
    resume_dir = ckpt.find_resume_point(cfg.run_dir, cfg.checkpoint.resume, checkpoints_dir=cfg.checkpoint.dir)
    if resume_dir is not None:
        verify_checkpoint(resume_dir)  # truncated / deleted files, pickles beyond weights: refused here
    state = ckpt.TrainerState.load(resume_dir / ckpt.STATE_FILE) if resume_dir else None
    if state is not None:
        _same_model(cfg, resume_dir, state)
        before = int(((state.config or {}).get("parallel") or {}).get("pipeline_stages", 1))
        if (before > 1) != (derived.pipeline_stages > 1):
            raise ConfigError(f"{resume_dir} was written with parallel.pipeline_stages={before}; this run has "
                              f"{derived.pipeline_stages}: a pipeline checkpoint names its parameters by layer, an "
                              f"unpipelined one by module. Resume with {'a' if before > 1 else 'no'} pipeline, or "
                              f"start a new run from it with init.from_checkpoint")
    return resume_dir, state


def _same_model(cfg: RunConfig, resume_dir: Path, state: ckpt.TrainerState) -> None:
    """A resume continues the run that saved the checkpoint: the same model (architecture, size,
    model options) and objective; anything else is refused before any work."""
    saved = state.config or {}
    keys = [("model", "arch"), ("model", "size"), ("model", "overrides"), ("objective", "name")]
    now = {"model": {"arch": cfg.model.arch, "size": cfg.model.size, "overrides": dict(cfg.model.overrides)},
           "objective": {"name": cfg.objective.name}}
    for sec, key in keys:
        before = (saved.get(sec) or {}).get(key)
        if before is not None and before != now[sec][key]:
            raise ConfigError(f"{resume_dir} is a checkpoint of {sec}.{key}={before}; this run has {sec}.{key}="
                              f"{now[sec][key]}: resume with the checkpoint's settings, train in another run_dir, "
                              f"or start from it with init.from_checkpoint")


def _prepare_data(cfg: RunConfig, dist):
    """Rank 0 prepares the data (tokenizes, caches) first; the others then hit the cache."""
    from ..data import prepare

    def run():
        try:
            return prepare(cfg.data, cfg.objective)
        except (FileNotFoundError, IsADirectoryError, ValueError) as e:  # UnicodeDecodeError too
            msg = " ".join(str(e).split()) or type(e).__name__
            raise ConfigError(msg if msg.startswith("data") else f"data: {msg}") from None

    if dist.is_rank0:
        prepared = run()
    eng.barrier()
    if not dist.is_rank0:
        prepared = run()
    return prepared


def _init_weights(cfg: RunConfig, model, arch, dist, derived: Derived) -> tuple[Path, dict]:
    """init.from_checkpoint into `model` (load_init_weights), with init.load_optimizer's layout check."""
    init_dir, init_info = load_init_weights(model, cfg.init.from_checkpoint, arch)
    if cfg.init.load_optimizer and (init_info["world_size"] != dist.world_size
                                    or (init_info["pipeline_stages"] > 1) != (derived.pipeline_stages > 1)):
        raise ConfigError(f"init.load_optimizer=true needs the parent's layout: it ran on "
                          f"{init_info['world_size']} process(es) with pipeline_stages="
                          f"{init_info['pipeline_stages']}, this run on {dist.world_size} with "
                          f"{derived.pipeline_stages}; match it, or set init.load_optimizer=false")
    return init_dir, init_info


def init_source(path: str, arch: "registry.ArchSpec") -> tuple[Path, ckpt.TrainerState]:
    """init.from_checkpoint's checkpoint and trainer state, verified and of a family this run's
    architecture takes (a ConfigError / CheckpointError of one line otherwise; reads no weights)."""
    step_dir = ckpt.resolve_checkpoint(path, what="init.from_checkpoint")
    verify_checkpoint(step_dir)
    state = ckpt.TrainerState.load(Path(step_dir) / ckpt.STATE_FILE)
    src_arch = (state.config or {}).get("model", {}).get("arch")
    if src_arch and not arch.accepts_weights_of(registry.get(src_arch)):
        raise ConfigError(f"init.from_checkpoint={path} is a {src_arch.upper()} checkpoint "
                          f"({registry.get(src_arch).family}); this run's architecture needs a {arch.family} checkpoint")
    return step_dir, state


def load_init_weights(model, path: str, arch: "registry.ArchSpec") -> tuple[Path, dict]:
    """init.from_checkpoint: weights only, from a checkpoint or run directory of another run.
    Returns the resolved checkpoint directory and what TrainerState.init records of it."""
    from .weights import load_weights

    step_dir, state = init_source(path, arch)
    missing, unexpected = load_weights(model, Path(step_dir))
    if missing or unexpected:
        raise ConfigError(f"init.from_checkpoint={path}: weights do not fit this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); use a checkpoint of the same size")
    step_dir = Path(step_dir).resolve()
    return step_dir, {"checkpoint": str(step_dir), "step": state.step, "tokens_seen": state.tokens_seen,
                      "target_tokens": state.target_tokens, "flops": state.flops, "world_size": state.world_size,
                      "pipeline_stages": int(((state.config or {}).get("parallel") or {}).get("pipeline_stages", 1))}


def _resume(t: Trainer, resume_dir: Path, state: ckpt.TrainerState, universal: bool) -> None:
    """The engine's files (converted to a universal checkpoint on another number of processes),
    the data position, the counters and, on the same number of processes, every rank's RNG states."""
    if universal:
        if t.dist.is_rank0:
            _to_universal(resume_dir)
        eng.barrier()
    t.engine.load(resume_dir, universal=universal)
    t.stream.load_state_dict(state.data_position)
    t.step, t.tokens_seen, t.target_tokens, t.flops = state.step, state.tokens_seen, state.target_tokens, state.flops
    rng = state.rng_state_for(t.dist.rank) if state.world_size == t.dist.world_size else None
    if rng is not None:
        ckpt.restore_rng_state(rng)
    if t.dist.is_rank0:
        log.info("resumed %s at step %d from %s", t.cfg.run_dir, t.step, resume_dir)


def _to_universal(step_dir: Path) -> str:
    """Convert a checkpoint to DeepSpeed's universal format (once; kept beside the original)."""
    out = step_dir / UNIVERSAL_TAG
    if (out / ckpt.COMPLETE).exists():
        return out.name
    with atomic_path(out) as tmp:
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(step_dir / ENGINE_TAG), "--output_folder", str(tmp), "--inject_missing_state"],
                       check=True, stdout=subprocess.DEVNULL)
        (tmp / ckpt.COMPLETE).write_text("")
        if out.exists():  # a conversion without COMPLETE: never read, replaced
            shutil.rmtree(out)
    return out.name


def _bf16_supported(device: torch.device) -> bool:
    """Whether precision=auto may choose bf16: a CUDA device with bf16 in hardware. Emulated bf16
    (what is_bf16_supported() also counts by default, e.g. on a V100) is slower than fp32 there,
    and the planner plans such a GPU in fp32 (train/commands/plan/hardware.py)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
