"""Catching failures early (issue 10): non-finite detection, `--overfit`, `--determinism-check`.

Non-finite detection. `NonFiniteGuard` watches the training forward of an unpipelined model: a
forward hook on the whole model checks each micro-batch's loss; the first time it is not finite
(before backward and the optimizer step, so the weights are still the ones that produced it)
the same micro-batch is run again under no_grad with a forward hook on every module, and the
first module to finish with a NaN / inf output is remembered. After the step, `check` (on every
rank: the loss it sees is all-reduced, the gradient norm global) saves this rank's batch, as the
data stream gave it before the device transfer, to RUN_DIR/nonfinite/batch-step-N.pt (other
ranks: batch-step-N-rank-R.pt) and raises NonFiniteError, which the CLI prints as `error: ...`
with exit code 3. `archscale inspect --batch FILE` shows the saved batch. Pipeline runs detect
and save the same way but do not name a module (a stage's forward is not one call here).

Test hook: ARCHSCALE_TEST_NAN_AT_STEP="K:MODULE" (e.g. "3:decoder.layers.1.mlp") multiplies the
output of that module (a name of model.named_modules()) by NaN in the training forward of step K.
ARCHSCALE_TEST_NOISE_AT_STEP="K:MODULE" adds standard normal noise, drawn from a generator seeded
from the operating system's random source, to that module's output at step K: a nondeterminism
that `--determinism-check` must find at step K. (It was a random scale of 1.05-1.1 first; at
initialisation a layer's MLP output is so small against the residual stream that two such scales
could round to the same float32 loss, and the check then found the difference a step late.)
Unset in real runs.

`--overfit` and `--determinism-check` live in train/commands/debug.py (they call the loop, which
imports this module). `--overfit` (`overfit`): trains on the stream's first batch, repeated (`train(cfg,
fixed_batch=True)`), in a temporary run directory, and reports whether the loss fell below a
threshold: the classic wiring check. `--determinism-check` (`determinism_check`): two fresh runs
of the same steps in temporary run directories, in this process; the first step where the
losses differ, or identical.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("archscale.debug")

NAN_AT_STEP_ENV = "ARCHSCALE_TEST_NAN_AT_STEP"
NOISE_AT_STEP_ENV = "ARCHSCALE_TEST_NOISE_AT_STEP"


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm went NaN / inf; the message names step, module and batch file."""


def _tensors(obj):
    """The floating-point tensors of a module output (tensor, tuple/list, dict, ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)
    elif hasattr(obj, "__dataclass_fields__"):
        for k in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, k, None))


def _finite(obj) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(obj))


@torch.no_grad()
def first_nonfinite_module(model: torch.nn.Module, kwargs: dict) -> Optional[str]:
    """Run `model(**kwargs)` with a forward hook on every module; the name of the first module
    (in the order modules finish, so the innermost one) whose output is not finite, or None.
    The model's own name is "<model>"."""
    found: list[str] = []
    handles = []

    def hook(name):
        def fn(module, args, out):
            if not found and not _finite(out):
                found.append(name or "<model>")
        return fn

    for name, m in model.named_modules():
        handles.append(m.register_forward_hook(hook(name)))
    try:
        model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


class NonFiniteGuard:
    def __init__(self, model: torch.nn.Module, run_dir, rank: int, *, locate: bool = True):
        self.model, self.run_dir, self.rank = model, Path(run_dir), rank
        self.step = 0  # the step being run (the loop sets it before each step)
        self.module: Optional[str] = None  # the first module found non-finite at this step
        self._busy = False
        self.locate = locate
        self._handles = []
        if locate:
            self._handles.append(model.register_forward_hook(self._on_forward, with_kwargs=True))
        spec = os.environ.get(NAN_AT_STEP_ENV)
        if spec:  # test hook: see NAN_AT_STEP_ENV
            at, name = spec.split(":", 1)
            target = dict(model.named_modules())[name]
            self._handles.append(target.register_forward_hook(
                lambda m, a, out: out * float("nan") if self.step == int(at) and m.training else None))

        spec = os.environ.get(NOISE_AT_STEP_ENV)
        if spec:  # test hook: see NOISE_AT_STEP_ENV
            import random

            at, name = spec.split(":", 1)
            target = dict(model.named_modules())[name]
            def noise(m, a, out):
                if self.step != int(at) or not m.training:
                    return None
                g = torch.Generator(device=out.device).manual_seed(random.SystemRandom().getrandbits(63))
                return out + torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype)

            self._handles.append(target.register_forward_hook(noise))

    def _on_forward(self, module, args, kwargs, out):
        if self._busy or self.module is not None or not module.training:
            return
        loss = getattr(out, "loss", None)
        if loss is None or bool(torch.isfinite(loss.detach()).all()):
            return
        self._busy = True
        try:
            self.module = first_nonfinite_module(module, kwargs) or "<none: the loss alone>"
        finally:
            self._busy = False

    def check(self, step: int, loss: float, grad_norm: Optional[float], batch: dict) -> None:
        """After step `step`: raise NonFiniteError (on every rank) if the loss or gradient norm is
        not finite, with this rank's batch saved for replay."""
        bad_loss = not math.isfinite(loss)
        bad_grad = grad_norm is not None and not math.isfinite(grad_norm)
        if not (bad_loss or bad_grad):
            self.module = None
            return
        from ..engine.runtime import all_gather_object

        names = [n for n in all_gather_object(self.module) if n is not None]
        out = self.run_dir / "nonfinite"
        out.mkdir(parents=True, exist_ok=True)
        path = out / (f"batch-step-{step}.pt" if self.rank == 0 else f"batch-step-{step}-rank-{self.rank}.pt")
        torch.save({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, path)
        what = f"loss {loss}" if bad_loss else f"gradient norm {grad_norm} (loss {loss})"
        where = (f"first non-finite module output: {names[0]}" if names else
                 "no module output went non-finite in the forward" if self.locate and not bad_loss else
                 "module not located" + ("" if self.locate else " (pipeline run: replay the batch unpipelined)"))
        raise NonFiniteError(f"non-finite {what} at step {step}; {where}; batch saved to {path} "
                             f"(replay: archscale inspect --batch {path})")

    def close(self):
        for h in self._handles:
            h.remove()


class RepeatFirst:
    """The first batch of a data stream, again at every step (a fresh dict each time: the loop
    pops the counts out of it). Checkpoints record the wrapped stream's position."""

    def __init__(self, stream):
        self.stream = stream
        self.first = next(stream)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return dict(self.first)

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


# fresh, short runs in a temporary directory: no checkpoints worth keeping, no held-out loss
