"""`archscale train --overfit` and `--determinism-check` (issue 10): the wiring checks of
train/trainer/debug.py's docstring, as commands. They call the training loop, so they live above it (the
loop imports train.trainer.debug's guard; this module imports the loop)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

_SCRATCH = ["checkpoint.resume=never", "checkpoint.every_n_steps=1000000000", "checkpoint.keep_last=0",
            "eval.every_n_steps=0", "logging.progress_bar=false", "logging.tensorboard=false"]


def _scratch_config(path, overrides: list[str], run_dir: Path, steps: int):
    from ..config import load_config

    return load_config(path, list(overrides) + _SCRATCH + [f"run_dir={run_dir}", f"schedule.max_steps={steps}"])


def _summary(losses: list) -> str:
    if not losses:
        return "no steps"
    picks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1})
    return ", ".join(f"step {losses[i][0]}: {losses[i][1]:.4f}" for i in picks)


def overfit(path, overrides: list[str], steps: int = 200, threshold: float = 0.5) -> tuple[bool, list]:
    """Train `steps` steps on the stream's first batch; (final loss < threshold, [(step, loss)])."""
    import tempfile

    from ..engine.runtime import teardown_distributed
    from ..trainer.loop import train

    with tempfile.TemporaryDirectory(prefix="archscale-overfit-") as d:
        result = train(_scratch_config(path, overrides, Path(d) / "run", steps), fixed_batch=True,
                       desc="overfit")
    teardown_distributed()
    final = result.losses[-1][1] if result.losses else math.inf
    return final < threshold, result.losses


def determinism_check(path, overrides: list[str], steps: int = 5) -> tuple[Optional[int], list, list]:
    """Two fresh runs of `steps` steps; (first step where the losses differ or None, losses a, b)."""
    import tempfile

    from ..engine.runtime import teardown_distributed
    from ..trainer.loop import train

    curves = []
    for i in range(2):
        with tempfile.TemporaryDirectory(prefix="archscale-determinism-") as d:
            curves.append(train(_scratch_config(path, overrides, Path(d) / "run", steps),
                                desc=f"determinism {i + 1}/2").losses)
        teardown_distributed()
    a, b = curves
    for (s, x), (_, y) in zip(a, b):
        if x != y:
            return s, a, b
    return (None if len(a) == len(b) else min(len(a), len(b)) + 1), a, b


def main_overfit(path, overrides: list[str], steps: int, threshold: float) -> int:
    ok, losses = overfit(path, overrides, steps, threshold)
    final = losses[-1][1] if losses else float("nan")
    print(f"overfit on one batch, {len(losses)} steps: {_summary(losses)}")
    print(f"{'PASS' if ok else 'FAIL'}: final loss {final:.4f} {'<' if ok else '>='} threshold {threshold}")
    return 0 if ok else 1


def main_determinism(path, overrides: list[str], steps: int) -> int:
    first, a, b = determinism_check(path, overrides, steps)
    if first is None:
        print(f"identical: {len(a)} steps, the same loss at every step ({_summary(a)})")
        return 0
    x = dict(a).get(first)
    y = dict(b).get(first)
    print(f"losses differ first at step {first}: run 1 {x!r}, run 2 {y!r}")
    return 1
