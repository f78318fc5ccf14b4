"""A comparison's compute budget (`--budget KIND=VALUE`) and its size matching (`--match`).

Budgets, one value for every cell, turned into each cell's schedule (`schedule_overrides`):
    tokens-seen=N     tokens through the model (the reference experiment's rule): schedule.train_tokens=N
                      (derive: N / the row shape's tokens per row), or max_steps counted on the cell's
                      stream where its rows carry less than the row shape plans (ED:UL2)
    steps=N           optimizer steps: schedule.max_steps=N
    flops=F           training FLOPs: max_steps counted on the cell's stream (the loop's exact FLOPs)
    target-tokens=N   tokens that carry a loss: max_steps counted on the cell's stream
Every run lands within 2% of its budget, or within one optimizer step where a step is coarser
(tests/test_budgets.py, on every registry entry and objective); compare and reproduce refuse a
run that would not, before anything trains (`check_budget`, on the run's own stream).

Matching (`--match params|flops --match-to CELL`): every cell of another family than the named
cell (ArchSpec.same_family) gets the shape (d_model, n_heads, head_dim, d_ff, n_layers through
model.overrides.*) whose non-embedding parameters, or training FLOPs per token (the registry's
row_flops / tokens_per_row), land within 5% of the named cell's: `match_cell`, with the search of
compare/matching.py (its docstring: the candidates and the choice); a cell of the same family
keeps its shape. No shape within 5%: a one-line refusal before anything trains. The output shows
every cell's non-embedding and total parameters, its embedding share and its matched gap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

BUDGETS = ("tokens-seen", "target-tokens", "flops", "steps")
MATCHES = ("params", "flops")


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
    return {"params": arch.num_params(mc), "non_embedding_params": arch.num_params(mc, embeddings=False),
            "flops_per_token": arch.row_flops(mc, cfg.objective) / per_row,
            "step_flops": arch.step_flops(mc, cfg.objective, gb), "tokens_per_step": per_row * gb}


def global_batch(cfg) -> int:
    """The cell's global batch in rows on one process (as compare trains it): derive's answer."""
    import dataclasses

    from ...config import derive

    if cfg.schedule.max_steps is None and cfg.schedule.train_tokens is None:  # derive needs a length; any will do
        cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, max_steps=1))
    return derive(cfg, 1).global_batch_size


def _counted_steps(cfg, world_size: int = 1, flops: bool = False):
    """The cell's training stream as the trainer counts it, one step at a time: dicts of
    num_tokens, num_target_tokens (and flops: the registry's batch_flops, as the loop sums them)
    per optimizer step. Built as the trainer builds it (train.data.build_stream, the global batch
    of a world of `world_size`, data.seed; one process sees the global batch's rows, whose counts
    the ranks' all-sum gives), skipping what the trainer skips: a batch with a micro-batch of no
    target token (Trainer._has_empty_micro). No model is built or trained."""
    import dataclasses

    from ... import registry
    from ...config import derive
    from ...data import build_stream, prepare
    from ...objectives import IGNORE, pop_counts

    if cfg.schedule.max_steps is None and cfg.schedule.train_tokens is None:  # derive needs a length; any will do
        cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, max_steps=1))
    d = derive(cfg, world_size)
    prepared = prepare(cfg.data, cfg.objective)
    arch = registry.get(cfg.model.arch)
    mc = arch.make_config(cfg.model, registry.padded_vocab(prepared.tokens.vocab_size)) if flops else None
    stream = build_stream(prepared, cfg.objective, cfg.model.arch, global_batch_size=d.global_batch_size,
                          seed=cfg.data.seed, data=cfg.data)
    micro = cfg.parallel.micro_batch_size
    for batch in stream:
        counts = pop_counts(batch)
        labels = batch["labels"]  # (G, L): the trainer's micro-batches are runs of `micro` rows
        if ((labels != IGNORE).reshape(-1, micro, labels.shape[-1]).sum(dim=(1, 2)) == 0).any():
            continue
        if flops:
            counts["flops"] = arch.batch_flops(mc, batch)
        yield counts


COUNT_OF = {"tokens-seen": "num_tokens", "target-tokens": "num_target_tokens", "flops": "flops"}
TOLERANCE = 0.02  # every budget is met within 2%, or within one optimizer step where a step is coarser
MAX_COUNTED_STEPS = 200_000  # a budget that needs more steps is planned in steps (--budget steps=N)


def steps_to_meet(budget: Budget, cfg, world_size: int = 1) -> int:
    """The number of optimizer steps whose counted total (the cell's own stream, as the trainer
    sums it) is nearest `budget`: exact to half a step for any row shape, padding or mixture.
    Raises BudgetError when one step is more than twice the budget or the walk is too long."""
    key, total, n = COUNT_OF[budget.kind], 0.0, 0
    for counts in _counted_steps(cfg, world_size, flops=budget.kind == "flops"):
        before, total, n = total, total + counts[key], n + 1
        if total >= budget.value:
            if budget.value - before < total - budget.value:  # the step before is nearer
                n -= 1
            break
        if n >= MAX_COUNTED_STEPS:
            raise BudgetError(f"{budget.text()} needs more than {MAX_COUNTED_STEPS:,} steps of {cfg.model.arch}:"
                              f"{cfg.objective.name}; give the budget in steps (--budget steps=N)")
    if n == 0:
        raise BudgetError(f"{budget.text()} is less than half of one step of {cfg.model.arch}:{cfg.objective.name} "
                          f"({total:,.4g}); raise the budget or lower --micro-batch / --accumulation")
    return n


def schedule_overrides(budget: Budget, cfg) -> list[str]:
    """The schedule overrides that give the cell `budget` (cfg: the cell's config without them;
    None: tokens-seen and steps only, without looking at the stream).

    tokens-seen: schedule.train_tokens=N, which derive turns into steps through the row shape's
    tokens_per_row; where the cell's rows carry less than that (an ED row whose two sides fill
    unevenly: ED:UL2's rows carry about half), max_steps counted on its stream instead
    (`steps_to_meet`). flops and target-tokens: max_steps counted on the stream (the exact FLOPs
    the loop sums and the targets it counts; the analytic row_flops and a probe of a few batches
    missed by up to 7% and 80%). steps: max_steps=N."""
    if budget.kind == "steps":
        return [f"schedule.max_steps={max(1, int(round(budget.value)))}", "schedule.train_tokens=null"]
    if budget.kind == "tokens-seen" and (cfg is None or not budget_refusal(budget, _train_tokens(cfg, budget.value))):
        return [f"schedule.train_tokens={int(budget.value)}", "schedule.max_steps=null"]
    return [f"schedule.max_steps={steps_to_meet(budget, cfg)}", "schedule.train_tokens=null"]


def _train_tokens(cfg, n: float):
    """cfg with schedule.train_tokens=n and no max_steps (the tokens-seen plan, to be checked)."""
    import dataclasses

    return dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, train_tokens=int(n), max_steps=None))


def budget_refusal(budget: Budget, cfg, world_size: int = 1) -> str:
    """Why the run `cfg` (its final config: schedule included) would miss `budget`, in one line
    with the fix; "" when it lands within TOLERANCE of it, or within one optimizer step where a
    step is coarser. Counts the run's own stream over the steps derive gives it (a world of
    `world_size`): what the trainer will count, before anything trains."""
    from ... import registry
    from ...config import derive

    d = derive(cfg, world_size)
    if budget.kind == "steps":
        got, step = float(d.max_steps), 1.0
    else:
        import itertools

        run = itertools.islice(_counted_steps(cfg, world_size, flops=budget.kind == "flops"), d.max_steps)
        got = float(sum(counts[COUNT_OF[budget.kind]] for counts in run))
        step = got / max(d.max_steps, 1)
    if abs(got - budget.value) <= max(TOLERANCE * budget.value, step):
        return ""
    why = f"{d.max_steps} steps of {d.global_batch_size} rows give {got:,.4g} ({got / budget.value:.0%})"
    if budget.kind == "tokens-seen" and cfg.schedule.max_steps is None:
        why += (f": its rows carry {got / max(d.max_steps, 1) / d.global_batch_size:.1f} of the "
                f"{registry.get(cfg.model.arch).tokens_per_row(cfg.objective)} tokens per row its row shape plans")
    return (f"{budget.text()} cannot be met within {TOLERANCE:.0%}: {why}; plan it with compare's schedule "
            f"(no schedule.* in --set or the cell's settings) or give the budget in steps (--budget steps=N)")


def check_budget(budget: Budget, cfg, world_size: int = 1) -> None:
    """Raises BudgetError (one line: why, and the fix) when the run `cfg` would miss `budget`
    (budget_refusal): compare and reproduce call it for every run before anything trains."""
    why = budget_refusal(budget, cfg, world_size)
    if why:
        raise BudgetError(why)


def _model_builder(cfg):
    """(registry entry, shape overrides -> model_zoo config) of a cell's config: the overrides go
    under its own model.overrides (the user's values win, as in the run); the vocabulary is the
    tokenizer's (read once)."""
    import dataclasses

    from ... import registry
    from ...data.tokenizer import load_tokenizer

    arch = registry.get(cfg.model.arch)
    _, tokens = load_tokenizer(cfg.data)
    vocab = registry.padded_vocab(tokens.vocab_size)
    return arch, lambda shape: arch.make_config(
        dataclasses.replace(cfg.model, overrides={**shape, **cfg.model.overrides}), vocab)


def match_cell(kind: str, reference, cfg, name: str = "the cell"):
    """The Match (compare/matching.py) of a cell's config `cfg` against the reference cell's config
    `reference` on `kind` (params | flops): the searched shape, within 5%, for a cell of another
    family; its own shape, with its gap, for one of the same family. Raises MatchError."""
    import dataclasses

    from .matching import Match, Shape, quantity, search_shape

    ref_arch, ref_build = _model_builder(reference)
    ref_mc = ref_build({})
    target = quantity(kind, ref_arch, ref_mc, reference.objective)
    arch, build = _model_builder(cfg)
    if arch.same_family(ref_arch):
        mc = build({})
        return Match(kind, Shape.of(mc), quantity(kind, arch, mc, cfg.objective), target)

    def measure(shape):
        try:
            mc = build(shape.overrides())
        except ValueError:  # not a valid model (e.g. an odd n_heads under mixed-direction heads)
            return None
        return quantity(kind, arch, mc, cfg.objective)

    m = search_shape(kind, measure, Shape.of(ref_mc), target, max_layers=4 * ref_arch.num_layers(ref_mc), what=name)
    return dataclasses.replace(m, shape=Shape.of(build(m.shape.overrides())))  # as the run has it: the user's values win
