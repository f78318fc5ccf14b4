"""The loop's concerns beside the step itself, as callbacks (in the style of OLMo-core's trainer
callbacks): the non-finite guard, metrics and progress, the held-out loss, signals, checkpoints
and the end of a run.

The loop (train/trainer/loop.py) calls every callback of its list, in list order, at these points:

    pre_train(t)    once, before the first step (also when no step will run)
    pre_step(t)     each step, after the batch is fetched, before forward / backward
    wants_stop(t)   each step, after forward / backward: a vote that joins the step's all-reduce,
                    so every rank sees the same stop decision at the same step
    post_step(t)    each step, after the counters of `t` are updated
    post_train(t)   after the last step (not when a step raised)
    close()         always, in reverse list order

`t` is the loop's `Trainer`: what start-up built (engine, stream, layout, ...) and the counters
(`step`, `tokens_seen`, `target_tokens`, `flops`, `stopped_by`). A callback that stops the run
sets `t.stopped_by`; the loop ends after the step's `post_step` calls.

The list `default_callbacks` builds is the order of every write of a step: the non-finite check,
the metrics line, the held-out loss and its line, the stop on a signal, the checkpoint; after
the last step the tail checkpoint, then the final held-out loss and FINISHED.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Optional

from . import checkpointing as ckpt
from .fitcheck import memory_record
from ..engine import runtime as eng

log = logging.getLogger("archscale.train")

# Test hook: with ARCHSCALE_TEST_SAVE_DELAY=S in the environment, every checkpoint save sleeps S
# seconds after the engine files are written into `step-N.tmp` and before COMPLETE, so a test
# can kill the run in the middle of a save (tests/test_trainer.py). Unset in real runs.
SAVE_DELAY_ENV = "ARCHSCALE_TEST_SAVE_DELAY"
# Test hook: with ARCHSCALE_TEST_FINAL_EVAL_PAUSE=S, the end of a run (FinishCallback) sleeps S
# seconds before the final evaluation and S seconds after its line, before FINISHED, so a kill can
# land inside the final evaluation (bench/faults/kills.py, tests/test_metrics_once.py). Unset in real runs.
FINAL_EVAL_PAUSE_ENV = "ARCHSCALE_TEST_FINAL_EVAL_PAUSE"

# Dense bf16 peak per GPU, for MFU (the vendor's figure; bench/ measures the real one).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device) -> Optional[float]:
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Callback:
    """A no-op at every point; subclasses override the points they need (module docstring)."""

    def pre_train(self, t) -> None:
        pass

    def pre_step(self, t) -> None:
        pass

    def wants_stop(self, t) -> bool:
        return False

    def post_step(self, t) -> None:
        pass

    def post_train(self, t) -> None:
        pass

    def close(self) -> None:
        pass


def default_callbacks(t, signals: "Signals", desc: Optional[str] = None) -> list[Callback]:
    """The trainer's callbacks, in the order of their writes (module docstring)."""
    guard = NonFiniteCallback(t)
    metrics = MetricsCallback(t, desc or f"{t.cfg.model.arch.upper()}:{t.cfg.objective.name.upper()}")
    evals = EvalCallback(metrics)
    return [guard, metrics, evals, SignalCallback(signals), CheckpointCallback(), FinishCallback(evals)]


# ---------------------------------------------------------------------------------- non-finite
class NonFiniteCallback(Callback):
    """Non-finite loss / gradient norm: stop with the step, the first non-finite module and the
    batch saved (train/trainer/debug.py). The module is located from a hook on the whole model,
    where this rank runs all of it (the engine's `whole_model`)."""

    def __init__(self, t):
        from .debug import NonFiniteGuard

        self.guard = NonFiniteGuard(t.engine.module, t.layout.root, t.dist.rank,
                                    locate=t.engine.whole_model is not None)

    def pre_step(self, t) -> None:
        self.guard.step = t.step + 1

    def post_step(self, t) -> None:
        self.guard.check(t.step, t.loss, t.engine.grad_norm(), t.batch)  # raises NonFiniteError

    def close(self) -> None:
        self.guard.close()


# ---------------------------------------------------------------------------------- metrics
class MetricsCallback(Callback):
    """The loss curve of the result; metrics.jsonl, TensorBoard, W&B and the progress bar (rank 0)."""

    def __init__(self, t, desc: str):
        cfg, layout = t.cfg, t.layout
        self.active = t.dist.is_rank0
        self.jsonl = self.tb = self.bar = self.wandb = None
        if not self.active:
            return
        if cfg.logging.jsonl:
            trim_jsonl(layout.metrics_jsonl, t.step, final=t.step >= t.derived.max_steps)
            self.jsonl = open(layout.metrics_jsonl, "a")
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(layout.tensorboard), purge_step=t.step + 1)
            except ImportError:
                log.warning("tensorboard is not installed: no event files (pip install tensorboard)")
        from .wandb_log import open_run

        self.wandb = open_run(t)  # logging.wandb: the same W&B run across resumes (wandb_log.py)
        if cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=t.derived.max_steps, initial=t.step, desc=desc, dynamic_ncols=True, leave=True,
                            disable=None if os.environ.get("ARCHSCALE_PROGRESS") != "1" else False)

    def pre_train(self, t) -> None:
        self.peak = peak_flops(t.dist.device)
        self.memory_logged = False  # the first line of this invocation: planned against measured peak memory
        self.t_log, self.tok_log, self.flops_log = t.t_start, t.tokens_seen, t.flops

    def post_step(self, t) -> None:
        t.result.losses.append((t.step, t.loss))
        now = time.perf_counter()
        if t.step % t.cfg.logging.every_n_steps == 0 or t.step == t.stop_at:
            dt = max(now - self.t_log, 1e-9)
            # ce_loss / z_loss: this rank's; None where the engine does not measure them (a pipeline)
            rec = {"step": t.step, "loss": t.loss, "ce_loss": t.step_losses.ce_loss,
                   "z_loss": t.step_losses.z_loss, "lr": t.engine.lr(), "tokens_seen": t.tokens_seen,
                   "target_tokens": t.target_tokens, "flops": t.flops,
                   "planned_flops_per_step": t.result.planned_flops_per_step,
                   "tokens_per_s": (t.tokens_seen - self.tok_log) / dt, "grad_norm": t.engine.grad_norm()}
            if not self.memory_logged:
                rec.update(memory_record(t.memory_plan, t.dist.device))
                self.memory_logged = True
            if self.peak:
                rec["mfu"] = (t.flops - self.flops_log) / dt / (self.peak * t.dist.world_size)
            self.log(rec)
            self.t_log, self.tok_log, self.flops_log = now, t.tokens_seen, t.flops
        self.progress(1, {"loss": f"{t.loss:.3f}",
                          "tok/s": f"{(t.tokens_seen - t.tok_start) / max(now - t.t_start, 1e-9):.0f}"})

    def log(self, record: dict) -> None:
        if not self.active:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["step"])
        if self.wandb:
            self.wandb.log(record, line_kind(record))

    def progress(self, n: int, postfix: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: v for k, v in postfix.items() if v is not None}, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.close()
        if self.bar is not None:
            self.bar.close()


def line_kind(record: dict) -> str:
    """What a metrics.jsonl line records: "eval" (a held-out line, with the yardstick's numbers
    when there is one) or "train" (a logging step's line). A run writes at most one line of each
    kind per step; (step, kind) names a line."""
    return "eval" if "eval_loss" in record else "train"


def trim_jsonl(path: Path, step: int, *, final: bool = False) -> None:
    """On a resume from the checkpoint of step s = `step`, keep exactly the lines an uninterrupted
    run had written when it finished that checkpoint; the resumed run writes the rest again, once.

    Within a step the writes come in this order (module docstring): the training line, a periodic
    held-out line, the checkpoint; after the last step its checkpoint, then the final evaluation's
    line, then FINISHED. So the rule is:
        keep a line  iff  line.step < s,  or  line.step == s and not (final and kind == "eval")
    where `final` = s >= schedule.max_steps: the resumed run takes no step and ends with the final
    evaluation of step s, which a kill after that line and before FINISHED (or a rerun of a
    finished run) had already logged. Everything after s goes (it is trained again).

    Pitfalls: a line a kill cut short is dropped; TensorBoard's purge (purge_step = s + 1) is by
    step, not by tag, so its events may still hold the final evaluation twice (the same values):
    metrics.jsonl is the record. The file is replaced atomically (a kill here loses nothing)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            at = rec.get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line a kill cut short
        if at < step or (at == step and not (final and line_kind(rec) == "eval")):
            keep.append(line)
    ckpt.atomic_write_text(path, "".join(l + "\n" for l in keep))


# ---------------------------------------------------------------------------------- held-out loss
def held_out_loss(t) -> Optional[float]:
    """The held-out loss of the model now, on this data-parallel rank's share of the eval split's
    first eval.num_batches global batches (heldout.heldout_batches), reduced over all ranks by
    the engine (None: no eval split)."""
    if t.prepared.eval is None:
        return None
    from .heldout import heldout_batches

    batches, _ = heldout_batches(t.prepared, t.cfg, global_batch_size=t.derived.global_batch_size,
                                 micro_batch_size=t.derived.micro_batch_size, max_batches=t.cfg.eval.num_batches,
                                 rank=t.engine.dp_rank, world_size=t.engine.dp_size)
    return t.engine.held_out_loss(batches)


class EvalCallback(Callback):
    """The held-out loss, and the common yardstick (eval.yardstick), every eval.every_n_steps
    steps (the last step's is FinishCallback's). Before the first step, RUN/heldout.json records
    the held-out split and the yardstick's windows."""

    def __init__(self, metrics: MetricsCallback):
        self.metrics = metrics
        self.yardstick = None  # (Yardstick, task records), built before the first step

    def pre_train(self, t) -> None:
        from .yardstick import prepare_yardstick

        self.yardstick = prepare_yardstick(t)

    def post_step(self, t) -> None:
        every = t.cfg.eval.every_n_steps
        if every and t.step % every == 0 and t.step < t.derived.max_steps:
            self.evaluate(t)

    def evaluate(self, t) -> Optional[float]:
        from .yardstick import score_now

        ev = held_out_loss(t)
        t.result.eval_losses.append((t.step, t.tokens_seen, t.flops, ev))
        ys, flat = score_now(t, self.yardstick)
        if ys is not None:
            t.result.yardstick = ys
            t.result.yardsticks.append({"step": t.step, "tokens_seen": t.tokens_seen,
                                        "target_tokens": t.target_tokens, "flops": t.flops, **flat})
        self.metrics.log({"step": t.step, "eval_loss": ev, "tokens_seen": t.tokens_seen, "flops": t.flops, **flat})
        return ev


# ---------------------------------------------------------------------------------- signals
class Signals:
    """SIGTERM / SIGUSR1 set a flag; the loop saves and stops at the next step boundary. Installed
    by `train.trainer.loop.train` before start-up, so a signal then stops the run before its first step."""

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


class SignalCallback(Callback):
    """A signal on any rank stops every rank at the same step, with a checkpoint of it (the
    CheckpointCallback's tail save): Slurm's time-limit signal, then a requeue resumes."""

    def __init__(self, signals: Signals):
        self.signals = signals

    def pre_train(self, t) -> None:
        if eng.all_sum([1.0 if self.signals.received else 0.0], t.dist.device)[0] > 0:
            # a signal during start-up: nothing new to save; stop before the first step
            t.stopped_by = self.signals.received or "signal"

    def wants_stop(self, t) -> bool:
        return self.signals.received is not None

    def post_step(self, t) -> None:
        if t.stop_requested:  # a signal reached some rank: save and stop, everyone at this step
            t.stopped_by = self.signals.received or "signal"


# ---------------------------------------------------------------------------------- checkpoints
class CheckpointCallback(Callback):
    """A checkpoint every checkpoint.every_n_steps steps and at checkpoint.at_steps (a WSD stable
    run's branch points; never pruned), and one of the last step (unless it was
    just saved); a fresh run that stops at step 0 saves step 0 (an init.from_checkpoint child's start)."""

    def pre_train(self, t) -> None:
        self.last_saved = t.step

    def post_step(self, t) -> None:
        c = t.cfg.checkpoint
        if t.stopped_by is None and (t.step % c.every_n_steps == 0 or t.step in c.at_steps):
            save(t)
            self.last_saved = t.step

    def post_train(self, t) -> None:
        if t.step != self.last_saved or (not t.resumed and t.step == 0 and t.stopped_by is None):
            save(t)


def save(t) -> Path:
    """Checkpoint step `t.step`: the engine's files and the trainer state (checkpointing.save_checkpoint)."""
    def write_engine(step_dir: Path) -> None:
        t.engine.save(step_dir)
        if os.environ.get(SAVE_DELAY_ENV):  # test hook: see SAVE_DELAY_ENV
            time.sleep(float(os.environ[SAVE_DELAY_ENV]))

    import yaml

    rngs = eng.all_gather_object(ckpt.capture_rng_state())
    st = ckpt.TrainerState(step=t.step, tokens_seen=t.tokens_seen, target_tokens=t.target_tokens, flops=t.flops,
                           data_position=t.stream.state_dict(), rng_states=rngs, world_size=t.dist.world_size,
                           init=t.init_info, branch=t.branch_info, config=yaml.safe_load(t.config_yaml))
    cfg = t.cfg.checkpoint
    return ckpt.save_checkpoint(t.layout.checkpoints, st, write_engine, is_rank0=t.dist.is_rank0,
                                barrier=eng.barrier, keep_last=cfg.keep_last,
                                keep_every_n_steps=cfg.keep_every_n_steps, keep_steps=tuple(cfg.at_steps),
                                config_yaml=t.config_yaml)


# ---------------------------------------------------------------------------------- the end
class FinishCallback(Callback):
    """A run that reached schedule.max_steps (not stopped by a signal): the final held-out loss
    (RunResult.eval_loss) and RUN/FINISHED, after the last checkpoint. A resume from that
    checkpoint evaluates again; trim_jsonl drops the line it would repeat."""

    def __init__(self, evals: EvalCallback):
        self.evals = evals

    def post_train(self, t) -> None:
        if t.step >= t.derived.max_steps and t.stopped_by is None:
            pause = float(os.environ.get(FINAL_EVAL_PAUSE_ENV) or 0)  # test hook: see FINAL_EVAL_PAUSE_ENV
            time.sleep(pause)
            t.result.eval_loss = self.evals.evaluate(t)
            time.sleep(pause)
            if t.dist.is_rank0:
                (t.layout.root / "FINISHED").write_text(json.dumps({"step": t.step}) + "\n")
