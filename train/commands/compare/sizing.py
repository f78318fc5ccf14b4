"""A comparison's compute budget (`--budget KIND=VALUE`) and its size matching (`--match`).

Budgets, one value for every cell, turned into each cell's schedule:
    tokens-seen=N     tokens through the model (the reference experiment's rule): schedule.train_tokens=N
    steps=N           optimizer steps: schedule.max_steps=N
    flops=F           training FLOPs: max_steps = round(F / the registry's step_flops of the cell)
    target-tokens=N   tokens that carry a loss: max_steps = round(N / the mean target tokens of the
                      cell's first `TARGET_PROBE_BATCHES` training batches, counted on its own stream)
Every budget is met to within one step; the table shows all four columns, so what was matched
and what was not is on the page.

Matching (`--match params|flops --match-to CELL`): each encoder-decoder cell's depth
(model.overrides.n_layers, per stack) is set to the value whose parameter count, or whose
training FLOPs per token (the registry's row_flops / tokens_per_row), is nearest the named
decoder cell's; the table shows both counts for every cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

BUDGETS = ("tokens-seen", "target-tokens", "flops", "steps")
MATCHES = ("params", "flops")
TARGET_PROBE_BATCHES = 8


class BudgetError(ValueError):
    """A budget or match that cannot be applied (one line, with the fix)."""


@dataclass(frozen=True)
class Budget:
    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "Budget":
        kind, sep, value = text.partition("=")
        if not sep or kind not in BUDGETS:
            raise BudgetError(f"--budget {text!r} is not KIND=VALUE with KIND in {', '.join(BUDGETS)} "
                              f"(e.g. --budget flops=2e12)")
        try:
            v = float(value)
        except ValueError:
            raise BudgetError(f"--budget {text!r}: {value!r} is not a number") from None
        if not v > 0 or math.isinf(v):
            raise BudgetError(f"--budget {text!r} must be a positive number")
        return cls(kind, v)

    def text(self) -> str:
        return f"{self.kind} = {self.value:,.0f}" if self.kind != "flops" else f"flops = {self.value:.3g}"


def cell_facts(cfg) -> dict:
    """Parameters, planned FLOPs per step and per token, tokens per step of a cell's config (the
    registry's formulas on the model config with the tokenizer's vocabulary)."""
    from ... import registry
    from ...data.tokenizer import load_tokenizer

    arch = registry.get(cfg.model.arch)
    _, tokens = load_tokenizer(cfg.data)
    mc = arch.make_config(cfg.model, registry.padded_vocab(tokens.vocab_size))
    per_row = arch.tokens_per_row(cfg.objective)
    gb = global_batch(cfg)
    return {"params": arch.num_params(mc), "flops_per_token": arch.row_flops(mc, cfg.objective) / per_row,
            "step_flops": arch.step_flops(mc, cfg.objective, gb), "tokens_per_step": per_row * gb}


def global_batch(cfg) -> int:
    """The cell's global batch in rows on one process (as compare trains it): derive's answer."""
    import dataclasses

    from ... import registry
    from ...config import derive

    if cfg.schedule.max_steps is None and cfg.schedule.train_tokens is None:  # derive needs a length; any will do
        cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, max_steps=1))
    return derive(cfg, 1, tokens_per_sequence=registry.get(cfg.model.arch).tokens_per_row(cfg.objective)).global_batch_size


def target_tokens_per_step(cfg) -> float:
    """Mean target tokens of a global batch over the cell's first training batches."""
    from ...data import build_stream, prepare
    from ...objectives import pop_counts

    prepared = prepare(cfg.data, cfg.objective)
    gb = global_batch(cfg)
    stream = build_stream(prepared, cfg.objective, cfg.model.arch, global_batch_size=gb, seed=cfg.data.seed,
                          data=cfg.data)
    counts = [pop_counts(next(stream))["num_target_tokens"] for _ in range(TARGET_PROBE_BATCHES)]
    return sum(counts) / len(counts)


def schedule_overrides(budget: Budget, cfg) -> list[str]:
    """The schedule overrides that give the cell `budget` (cfg: the cell's config without them)."""
    if budget.kind == "tokens-seen":
        return [f"schedule.train_tokens={int(budget.value)}", "schedule.max_steps=null"]
    if budget.kind == "steps":
        steps = budget.value
    elif budget.kind == "flops":
        steps = budget.value / cell_facts(cfg)["step_flops"]
    else:
        steps = budget.value / target_tokens_per_step(cfg)
    return [f"schedule.max_steps={max(1, int(round(steps)))}", "schedule.train_tokens=null"]


def match_depth(kind: str, target: dict, cfg_for_layers) -> tuple[int, dict]:
    """The encoder-decoder depth (per stack) whose `kind` (params | flops per token) is nearest
    `target` (cell_facts of the decoder cell): (n_layers, its cell_facts). `cfg_for_layers(n)`
    gives the cell's config at depth n."""
    key = "params" if kind == "params" else "flops_per_token"
    best = None
    n = 1
    while True:
        facts = cell_facts(cfg_for_layers(n))
        gap = abs(facts[key] - target[key])
        if best is None or gap < best[0]:
            best = (gap, n, facts)
        if facts[key] >= target[key] or n >= 256:  # past the target: deeper only gets further
            break
        n += 1
    return best[1], best[2]
