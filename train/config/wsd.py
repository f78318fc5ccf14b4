"""Warmup-stable-decay (``schedule.name=wsd``): the one statement of where the decay starts, shared by
the trainer's learning-rate multiplier (train/engine/ds_config.py), the config check (``derive``)
and whoever plans decay branches (``archscale ladder``).

A WSD run of T steps with decay fraction f decays over its last D = round(f * T) steps (as
OLMo-core's ``WSD`` scheduler: ``decay_steps = round(max_steps * decay_fraction)``), so the decay
starts at step S = T - D. WSD-S reuses one stable run (f = 0: never decays) for several budgets: a
decay branch resumes the stable run's checkpoint at step S with its own ``schedule.max_steps=T``,
where T - round(f * T) = S, and decays over exactly the steps after S.

    wsd_branch_point(T, f) -> S        the step the decay starts at (the checkpoint to branch from)
    branch_length(S, f)    -> T        the smallest T whose branch point is S (the inverse)

Pitfall: ``round`` is Python's, which rounds a tie to the even integer (round(2.5) = 2), as
OLMo-core's; both sides must call these functions rather than re-deriving D with another rounding.
Pure and light (the standard library only): a login node's planner may import it.
"""
from __future__ import annotations

from ..errors import ConfigError


def decay_steps(max_steps: int, decay_fraction: float) -> int:
    """D = round(decay_fraction * max_steps): the steps a WSD run of max_steps steps decays over."""
    if not 0.0 <= decay_fraction < 1.0:
        raise ConfigError(f"schedule.decay_fraction={decay_fraction} must be in [0, 1) (0 = never decay: the stable run)")
    if max_steps < 0:
        raise ConfigError(f"schedule.max_steps={max_steps} must be >= 0")
    return round(decay_fraction * max_steps)


def wsd_branch_point(max_steps: int, decay_fraction: float) -> int:
    """S = max_steps - round(decay_fraction * max_steps): the optimizer steps taken at the stable
    rate before the decay starts (the multiplier is 1 at step S and min_lr_ratio at max_steps)."""
    return max_steps - decay_steps(max_steps, decay_fraction)


def branch_length(branch_step: int, decay_fraction: float) -> int:
    """The smallest T with wsd_branch_point(T, decay_fraction) == branch_step: the max_steps of the
    decay branch started from the stable run's checkpoint at step ``branch_step``.

    g(T) = T - round(f T) never decreases and grows by 0 or 1 per step of T (f < 1), so every S >= 0
    has a T; for f > 1/2 several T share one S (g stays flat), and the smallest (the shortest
    decay) is chosen. f = 0 gives T = S. Binary search between S and (S + 1) / (1 - f) + 1.
    """
    if branch_step < 0:
        raise ConfigError(f"branch step {branch_step} must be >= 0")
    decay_steps(0, decay_fraction)  # the fraction's range check
    lo, hi = branch_step, int((branch_step + 1) / (1.0 - decay_fraction)) + 2
    while lo < hi:  # the smallest T in [lo, hi] with g(T) >= S
        mid = (lo + hi) // 2
        if wsd_branch_point(mid, decay_fraction) >= branch_step:
            hi = mid
        else:
            lo = mid + 1
    assert wsd_branch_point(lo, decay_fraction) == branch_step, (branch_step, decay_fraction, lo)
    return lo


def check_wsd(warmup_steps: int, max_steps: int, decay_fraction: float) -> None:
    """The run's warmup and decay fit in its length (called by ``derive`` once max_steps is known)."""
    d = decay_steps(max_steps, decay_fraction)
    if warmup_steps + d > max_steps:
        raise ConfigError(f"schedule.warmup_steps={warmup_steps} + decay steps round({decay_fraction} x {max_steps}) = "
                          f"{d} exceed schedule.max_steps={max_steps}: shorten the warmup, lower "
                          f"schedule.decay_fraction or train longer")
