"""The training loop: config -> data -> model -> DeepSpeed engine -> steps -> checkpoints.

`train(cfg)` runs one cell of the comparison in this process (one rank of a job). It resumes
from the run directory's newest complete checkpoint (`checkpoint.resume=auto`), also on another
number of processes (through a DeepSpeed universal checkpoint), saves every N steps, at the end,
and when SIGTERM / SIGUSR1 arrives (then it returns with `stopped_by` set, for a requeue).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import checkpointing as ckpt
from . import engine as eng
from . import registry
from .config import ConfigError, Derived, RunConfig, config_to_yaml, derive

log = logging.getLogger("archscale.train")

# Test hook: with ARCHSCALE_TEST_SAVE_DELAY=S in the environment, every checkpoint save sleeps S
# seconds after the engine files are written into `step-N.tmp` and before COMPLETE, so a test
# can kill the run in the middle of a save (tests/test_trainer.py). Unset in real runs.
SAVE_DELAY_ENV = "ARCHSCALE_TEST_SAVE_DELAY"

# Dense bf16 peak per GPU, for MFU (the vendor's figure; bench/ measures the real one).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


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
    losses: list = field(default_factory=list)  # (step, train loss)
    eval_losses: list = field(default_factory=list)  # (step, tokens seen, flops, held-out loss)


class _Signals:
    """SIGTERM / SIGUSR1 set a flag; the loop saves and stops at the next step boundary."""

    def __init__(self):
        self.received: Optional[str] = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Metrics:
    """metrics.jsonl, TensorBoard and the progress bar (rank 0 only)."""

    def __init__(self, cfg: RunConfig, layout, active: bool, start_step: int, max_steps: int, desc: str):
        self.active = active
        self.jsonl = self.tb = self.bar = None
        if not active:
            return
        if cfg.logging.jsonl:
            _trim_jsonl(layout.metrics_jsonl, start_step)
            self.jsonl = open(layout.metrics_jsonl, "a")
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(layout.tensorboard), purge_step=start_step + 1)
            except ImportError:
                log.warning("tensorboard is not installed: no event files (pip install tensorboard)")
        if cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc=desc, dynamic_ncols=True, leave=True,
                            disable=None if os.environ.get("ARCHSCALE_PROGRESS") != "1" else False)

    def log(self, record: dict):
        if not self.active:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["step"])

    def progress(self, n: int, postfix: dict):
        if self.bar is not None:
            self.bar.set_postfix({k: v for k, v in postfix.items() if v is not None}, refresh=False)
            self.bar.update(n)

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def _trim_jsonl(path: Path, step: int) -> None:
    """On resume, drop the lines of steps after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line a kill cut short
    ckpt.atomic_write_text(path, "".join(l + "\n" for l in keep))


def _to_universal(step_dir: Path) -> str:
    """Convert a checkpoint to DeepSpeed's universal format (once; kept beside the original)."""
    out = step_dir / "engine_universal"
    if (out / ckpt.COMPLETE).exists():
        return out.name
    tmp = step_dir / "engine_universal.tmp"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(step_dir / "engine"), "--output_folder", str(tmp), "--inject_missing_state"],
                   check=True, stdout=subprocess.DEVNULL)
    (tmp / ckpt.COMPLETE).write_text("")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out.name


def load_init_weights(model, path: str, arch: "registry.ArchSpec") -> tuple[Path, dict]:
    """init.from_checkpoint: weights only, from a checkpoint or run directory of another run.
    Returns the resolved checkpoint directory and what TrainerState.init records of it."""
    from .export import engine_weights

    step_dir = ckpt.resolve_checkpoint(path, what="init.from_checkpoint")
    state = ckpt.TrainerState.load(Path(step_dir) / ckpt.STATE_FILE)
    src_arch = (state.config or {}).get("model", {}).get("arch")
    if src_arch and not arch.accepts_weights_of(registry.get(src_arch)):
        raise ValueError(f"init.from_checkpoint={path} is a {src_arch.upper()} checkpoint "
                         f"({registry.get(src_arch).family}); this run's architecture needs a {arch.family} checkpoint")
    weights = engine_weights(Path(step_dir), model_config=model.config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.config.tie_embeddings]
    if missing or unexpected:
        raise ValueError(f"init.from_checkpoint={path}: weights do not fit this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); use a checkpoint of the same size")
    step_dir = Path(step_dir).resolve()
    return step_dir, {"checkpoint": str(step_dir), "step": state.step, "tokens_seen": state.tokens_seen,
                      "target_tokens": state.target_tokens, "flops": state.flops, "world_size": state.world_size,
                      "pipeline_stages": int(((state.config or {}).get("parallel") or {}).get("pipeline_stages", 1))}


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def check(cfg: RunConfig, world_size: int, *, bf16_supported: bool = False) -> Derived:
    """Every check of the config against the world that needs no data and no model: the derived
    numbers (batch sizes that divide, stages vs layers, ZeRO with pipeline, ...). Cheap (the layer
    count comes from the model's config, nothing is built); `train` calls it before it writes or
    prepares anything. Raises ConfigError with a one-line message.
    """
    arch = registry.get(cfg.model.arch)
    try:
        model_config = arch.make_config(cfg.model)  # the tokenizer's vocabulary does not change the layers
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    num_layers = arch.num_layers(model_config)
    return derive(cfg, world_size, num_layers=num_layers, tokens_per_sequence=arch.tokens_per_row(cfg.objective),
                  bf16_supported=bf16_supported)


def train(cfg: RunConfig, *, max_steps_now: Optional[int] = None, desc: Optional[str] = None,
          fixed_batch: bool = False) -> RunResult:
    """Train (or resume) the run `cfg` describes. `max_steps_now`: stop after this many steps of
    this invocation (tests of resumption), leaving the schedule as configured. `fixed_batch`:
    every step trains on the stream's first batch again (`archscale train --overfit`, train/debug.py).

    SIGTERM / SIGUSR1 handlers are installed first, so a signal during start-up (data
    preparation, model build, checkpoint load) stops the run cleanly before its first step
    instead of killing the process."""
    signals = _Signals()
    try:
        return _train(cfg, signals, max_steps_now=max_steps_now, desc=desc, fixed_batch=fixed_batch)
    finally:
        signals.restore()


def _train(cfg: RunConfig, signals: "_Signals", *, max_steps_now: Optional[int], desc: Optional[str],
           fixed_batch: bool = False) -> RunResult:
    from .data import build_stream, prepare
    from .objectives import pop_counts

    dist = eng.setup_distributed()
    arch = registry.get(cfg.model.arch)
    derived = check(cfg, dist.world_size, bf16_supported=_bf16_supported(dist.device))  # before any work
    layout = ckpt.RunLayout.from_config(cfg)  # a bad checkpoint.resume fails here, before any work too
    resume_dir = ckpt.find_resume_point(cfg.run_dir, cfg.checkpoint.resume, checkpoints_dir=cfg.checkpoint.dir)
    state = ckpt.TrainerState.load(resume_dir / ckpt.STATE_FILE) if resume_dir else None
    if state is not None:
        before = int(((state.config or {}).get("parallel") or {}).get("pipeline_stages", 1))
        if (before > 1) != (derived.pipeline_stages > 1):
            raise ConfigError(f"{resume_dir} was written with parallel.pipeline_stages={before}; this run has "
                              f"{derived.pipeline_stages}: a pipeline checkpoint names its parameters by layer, an "
                              f"unpipelined one by module. Resume with {'a' if before > 1 else 'no'} pipeline, or "
                              f"start a new run from it with init.from_checkpoint")
    torch.manual_seed(cfg.seed)

    # data: rank 0 prepares (tokenizes, caches) first; the others then hit the cache
    if dist.is_rank0:
        prepared = prepare(cfg.data, cfg.objective)
    eng.barrier()
    if not dist.is_rank0:
        prepared = prepare(cfg.data, cfg.objective)
    vocab = registry.padded_vocab(prepared.tokens.vocab_size)

    universal = state is not None and state.world_size != dist.world_size and (
        derived.zero_stage >= 1 or derived.pipeline_stages > 1)
    from .ds_config import build_ds_config

    ds_config = build_ds_config(cfg, derived, load_universal=universal)
    config_yaml = config_to_yaml(cfg)
    if dist.is_rank0:
        layout.create()
        layout.write_run_files(config_yaml, ds_config)
    eng.barrier()

    model = arch.build(cfg.model, vocab)
    init_info, init_dir = (dict(state.init) if state is not None else {}), None
    if state is None and cfg.init.from_checkpoint:
        init_dir, init_info = load_init_weights(model, cfg.init.from_checkpoint, arch)
        if cfg.init.load_optimizer and (init_info["world_size"] != dist.world_size
                                        or (init_info["pipeline_stages"] > 1) != (derived.pipeline_stages > 1)):
            raise ConfigError(f"init.load_optimizer=true needs the parent's layout: it ran on "
                              f"{init_info['world_size']} process(es) with pipeline_stages="
                              f"{init_info['pipeline_stages']}, this run on {dist.world_size} with "
                              f"{derived.pipeline_stages}; match it, or set init.load_optimizer=false")
    params = arch.num_params(model.config)
    piped = derived.pipeline_stages > 1
    if piped:
        engine = eng.initialize_pipeline(model, cfg, derived, ds_config)
        # every stage of a pipeline reads the same rows: data parallelism is across pipelines
        dp_rank, dp_size = engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size()
        counts_here = 1.0 if engine.is_first_stage() else 0.0  # count tokens and FLOPs once per pipeline
    else:
        eng.prepare_blocks(model, cfg.parallel.checkpoint_policy if cfg.parallel.activation_checkpointing else "none",
                           compile=cfg.model.compile)
        engine = eng.initialize(model, cfg, derived, ds_config)
        dp_rank, dp_size = dist.rank, dist.world_size  # every process is a data-parallel rank
        counts_here = 1.0
    stream = build_stream(prepared, cfg.objective, cfg.model.arch, global_batch_size=derived.global_batch_size,
                          rank=dp_rank, world_size=dp_size, seed=cfg.data.seed, data=cfg.data,
                          prefetch=cfg.data.prefetch)
    if fixed_batch:  # --overfit: the first batch, again and again (train/debug.py)
        from .debug import RepeatFirst

        stream = RepeatFirst(stream)
    step, tokens_seen, target_tokens, flops = 0, 0, 0, 0.0
    if init_dir is not None and cfg.init.load_optimizer:
        # the parent's optimizer state (and weights, the same as loaded above); not its schedule or step
        engine.load_checkpoint(str(init_dir), tag="engine", load_module_strict=True, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
    if state is not None:
        tag = "engine"
        if universal:
            if dist.is_rank0:
                tag = _to_universal(resume_dir)
            eng.barrier()
            tag = "engine_universal"
        engine.load_checkpoint(str(resume_dir), tag=tag, load_module_strict=True)
        stream.load_state_dict(state.data_position)
        step, tokens_seen, target_tokens, flops = state.step, state.tokens_seen, state.target_tokens, state.flops
        rng = state.rng_state_for(dist.rank) if state.world_size == dist.world_size else None
        if rng is not None:
            ckpt.restore_rng_state(rng)
        if dist.is_rank0:
            log.info("resumed %s at step %d from %s", cfg.run_dir, step, resume_dir)

    def write_engine(step_dir: Path) -> None:
        engine.save_checkpoint(str(step_dir), tag="engine", save_latest=False)
        if os.environ.get(SAVE_DELAY_ENV):  # test hook: see SAVE_DELAY_ENV
            time.sleep(float(os.environ[SAVE_DELAY_ENV]))

    def save(at_step: int) -> Path:
        rngs = eng.all_gather_object(ckpt.capture_rng_state())
        st = ckpt.TrainerState(step=at_step, tokens_seen=tokens_seen, target_tokens=target_tokens, flops=flops,
                               data_position=stream.state_dict(), rng_states=rngs, world_size=dist.world_size,
                               init=init_info,
                               config=__import__("yaml").safe_load(config_yaml))
        return ckpt.save_checkpoint(layout.checkpoints, st,
                                    write_engine,
                                    is_rank0=dist.is_rank0, barrier=eng.barrier,
                                    keep_last=cfg.checkpoint.keep_last,
                                    keep_every_n_steps=cfg.checkpoint.keep_every_n_steps, config_yaml=config_yaml)

    def held_out_loss() -> Optional[float]:
        if prepared.eval is None:
            return None
        evals = build_stream(prepared, cfg.objective, cfg.model.arch, global_batch_size=derived.global_batch_size,
                             rank=dp_rank, world_size=dp_size, seed=cfg.data.seed, split="eval", data=cfg.data)
        batches = []
        for i, b in enumerate(evals):
            if i >= cfg.eval.num_batches:
                break
            pop_counts(b)
            batches.extend(eng.split_micro(b, derived.micro_batch_size))
        if piped:  # per micro-batch means, already averaged over data-parallel ranks
            total, count = eng.pipeline_eval(engine, batches, model.config)
            return total / count if count else None
        total, count = eng.all_sum(list(eng.eval_loss(engine.module, batches, dist.device)), dist.device)
        return total / count if count else None

    # Non-finite loss / gradient norm: stop with the step, the first non-finite module and the batch
    # saved (train/debug.py). Unpipelined runs locate the module from a hook on the whole model.
    from .debug import NonFiniteGuard

    guard = NonFiniteGuard(engine.module, layout.root, dist.rank, locate=not piped)
    metrics = _Metrics(cfg, layout, dist.is_rank0, step, derived.max_steps,
                       desc or f"{cfg.model.arch.upper()}:{cfg.objective.name.upper()}")
    result = RunResult(run_dir=str(cfg.run_dir), arch=cfg.model.arch, objective=cfg.objective.name, params=params,
                       step=step, max_steps=derived.max_steps, tokens_seen=tokens_seen, target_tokens=target_tokens,
                       flops=flops, eval_loss=None, tokens_per_s=0.0)
    peak = peak_flops(dist.device)
    stop_at = derived.max_steps if max_steps_now is None else min(derived.max_steps, step + max_steps_now)
    last_saved = step
    t_start, tok_start = time.perf_counter(), tokens_seen
    t_log, tok_log, flops_log = t_start, tokens_seen, flops
    elapsed = 0.0
    try:
        if eng.all_sum([1.0 if signals.received else 0.0], dist.device)[0] > 0:
            # a signal during start-up: nothing new to save; stop before the first step
            result.stopped_by = signals.received or "signal"
            stop_at = step
            last_saved = step
        while step < stop_at:
            batch = next(stream)
            counts = pop_counts(batch)
            batch_flops = arch.batch_flops(model.config, batch) if counts_here else 0.0
            micro = eng.split_micro(batch, derived.micro_batch_size)
            guard.step = step + 1
            losses = eng.pipeline_step(engine, micro, model.config) if piped else eng.train_step(engine, micro)
            red = eng.all_sum([counts["num_tokens"] * counts_here, counts["num_target_tokens"] * counts_here,
                               batch_flops, losses["loss"], 1.0 if signals.received else 0.0], dist.device)
            step += 1
            tokens_seen += int(red[0])
            target_tokens += int(red[1])
            flops += red[2]
            loss = red[3] / dist.world_size
            guard.check(step, loss, eng.grad_norm(engine), batch)  # raises NonFiniteError
            result.losses.append((step, loss))
            now = time.perf_counter()
            if step % cfg.logging.every_n_steps == 0 or step == stop_at:
                dt = max(now - t_log, 1e-9)
                rec = {"step": step, "loss": loss, "ce_loss": losses["ce_loss"], "z_loss": losses["z_loss"],
                       "lr": engine.get_lr()[0], "tokens_seen": tokens_seen, "target_tokens": target_tokens,
                       "flops": flops, "tokens_per_s": (tokens_seen - tok_log) / dt,
                       "grad_norm": eng.grad_norm(engine)}
                if peak:
                    rec["mfu"] = (flops - flops_log) / dt / (peak * dist.world_size)
                metrics.log(rec)
                t_log, tok_log, flops_log = now, tokens_seen, flops
            metrics.progress(1, {"loss": f"{loss:.3f}", "tok/s": f"{(tokens_seen - tok_start) / max(now - t_start, 1e-9):.0f}"})
            if cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 and step < derived.max_steps:
                ev = held_out_loss()
                result.eval_losses.append((step, tokens_seen, flops, ev))
                metrics.log({"step": step, "eval_loss": ev, "tokens_seen": tokens_seen, "flops": flops})
            if red[4] > 0:  # a signal reached some rank: save and stop, everyone at this step
                result.stopped_by = signals.received or "signal"
                break
            if step % cfg.checkpoint.every_n_steps == 0:
                save(step)
                last_saved = step
        elapsed = time.perf_counter() - t_start
        if step != last_saved or (state is None and step == 0 and result.stopped_by is None):
            save(step)
        if step >= derived.max_steps and result.stopped_by is None:
            ev = held_out_loss()
            result.eval_losses.append((step, tokens_seen, flops, ev))
            metrics.log({"step": step, "eval_loss": ev, "tokens_seen": tokens_seen, "flops": flops})
            result.eval_loss = ev
            if dist.is_rank0:
                (layout.root / "FINISHED").write_text(json.dumps({"step": step}) + "\n")
    finally:
        metrics.close()
        guard.close()
    result.step, result.tokens_seen, result.target_tokens, result.flops = step, tokens_seen, target_tokens, flops
    result.tokens_per_s = (tokens_seen - tok_start) / max(elapsed, 1e-9)
    return result
