"""What `archscale ladder` trains: rungs matched across cells, budgets turned into steps, and for
each cell x rung x seed one stable warmup-stable-decay run with a decay branch per budget.

The schedule (schedule.name=wsd, train/config): warm up, hold the peak learning rate, and decay over
the last round(f x T) of a run's T steps (f = schedule.decay_fraction). A run of T steps therefore
leaves its stable phase at S = T - round(f x T), and every run that shares the stable phase agrees
with it bit for bit up to S. So one *stable* run (f = 0: never decays), with a checkpoint kept at
each branch point S_b (checkpoint.at_steps), gives every budget b: the *branch* resumes the stable
checkpoint step-S_b (checkpoint.resume) with max_steps = T_b and decay_fraction = f and trains only
the T_b - S_b decay steps (OLMo's WSD-S). The stable run stops at the largest branch point.

Budgets are tokens seen, D_b = m_b x N (`--budget-unit per-param`: m_b tokens per non-embedding
parameter, N the rung's reference cell's, so every cell of a rung gets the same tokens) or D_b
given (`--budget-unit tokens`); each cell's T_b = round(D_b / its tokens per step), at least 1.
Rungs: named model_zoo sizes, or WIDTHxDEPTH (d_model x n_layers at the debug size's head width,
d_ff = 2 d_model); each rung's cells are matched to the first cell (compare's --match, through
compare/matching.py) by non-embedding parameters or training FLOPs per token.

Pitfalls: the budgets must give distinct branch points after the warm-up (two budgets that round
to one S, or an S inside the warm-up, are refused in one line); the points' D and C are what the
runs counted, not these plans.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..compare import CompareArgs, base_overrides, cell_overrides, plan_cells
from ..compare.cells import Cell
from ..compare.sizing import Budget
from .points import LadderError

BUDGET_UNITS = ("per-param", "tokens")
WARMUP_STEPS = 5  # compare's warm-up (base_overrides); every branch point must lie after it


def stable_steps(total: int, fraction: float) -> int:
    """S = T - round(f T): the step where a wsd run of T steps leaves its stable phase (train.config's
    wsd_branch_point: the one statement of the arithmetic, shared with the trainer)."""
    from ...config import wsd_branch_point

    return wsd_branch_point(total, fraction)


def total_steps(stable: int, fraction: float) -> int:
    """The smallest T whose stable phase ends at `stable` (train.config's branch_length)."""
    from ...config import branch_length

    return branch_length(stable, fraction)


@dataclass(frozen=True)
class Rung:
    """One model size: a label (the run directories' and the points' rung), the model.size it
    starts from and the model.overrides.* that make it (a WIDTHxDEPTH rung)."""

    label: str
    size: str
    overrides: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "Rung":
        import model_zoo

        text = text.strip()
        if text in model_zoo.SIZES:
            return cls(text, text)
        m = re.fullmatch(r"(\d+)x(\d+)", text)
        head = model_zoo.SIZES["debug"]["head_dim"]
        if not m or int(m.group(1)) % head or int(m.group(2)) < 1:
            raise LadderError(f"--sizes: {text!r} is neither a model_zoo size ({', '.join(model_zoo.SIZES)}) nor "
                              f"WIDTHxDEPTH with WIDTH a multiple of {head} (e.g. 64x2)")
        d, n = int(m.group(1)), int(m.group(2))
        return cls(text, "debug", (f"model.overrides.d_model={d}", f"model.overrides.n_layers={n}",
                                   f"model.overrides.n_heads={d // head}", f"model.overrides.d_ff={2 * d}"))


@dataclass(frozen=True)
class LadderArgs:
    """The ladder's command line, read once (command.parse_args); no function changes it."""

    cells: tuple[Cell, ...]
    rungs: tuple[Rung, ...]
    budgets: tuple[float, ...]
    budget_unit: str = "per-param"
    seeds: int = 2
    decay_fraction: float = 0.2
    match: str = "params"
    out: str = "runs/ladder"
    seq_len: int = 128
    micro_batch: int = 8
    accumulation: int = 1
    lr: float = 3e-3
    eval_every: int = 1000
    checkpoint_every: int = 1000  # besides the branch points (checkpoint.at_steps) and the end
    seed: int = 0
    set: tuple[str, ...] = ()

    def __post_init__(self):
        if len(self.budgets) < 2 or len(set(self.budgets)) != len(self.budgets) or min(self.budgets) <= 0:
            raise LadderError(f"--budgets {','.join(f'{b:g}' for b in self.budgets)}: give at least 2 distinct "
                              f"positive budgets (3 or more for a fit), e.g. --budgets 10,20,40")
        if len({r.label for r in self.rungs}) != len(self.rungs) or not self.rungs:
            raise LadderError("--sizes: give distinct sizes, e.g. --sizes 32x1,32x2,64x2,64x4")
        if not 0 < self.decay_fraction < 1:
            raise LadderError(f"--decay-fraction {self.decay_fraction} must be in (0, 1), e.g. 0.2")
        if self.budget_unit not in BUDGET_UNITS:
            raise LadderError(f"--budget-unit {self.budget_unit!r} must be one of {', '.join(BUDGET_UNITS)}")

    def compare_args(self, rung: Rung) -> CompareArgs:
        """compare's arguments for one rung: its size, the match, OUT/RUNG. A WIDTHxDEPTH rung's
        shape goes into the own overrides of the cells of the first cell's family (those the
        match keeps as they are); the other cells get the searched shape (an override the user
        gives a cell would win over the search, so the rung's shape cannot go into --set)."""
        from ... import registry

        ref = registry.get(self.cells[0].arch)
        cells = tuple(dataclasses.replace(c, overrides=rung.overrides + c.overrides)
                      if registry.get(c.arch).same_family(ref) else c for c in self.cells)
        return CompareArgs(cells=cells, out=str(Path(self.out) / rung.label), budget=Budget("steps", 1),
                           match=self.match, size=rung.size, seq_len=self.seq_len, micro_batch=self.micro_batch,
                           accumulation=self.accumulation, lr=self.lr, eval_every=self.eval_every,
                           checkpoint_every=self.checkpoint_every, seed=self.seed, set=self.set,
                           wandb_group=Path(self.out).absolute().name)


@dataclass(frozen=True)
class LadderRun:
    """One run of the ladder. budget None: the stable run; else a decay branch of `parent` (the
    stable run's directory) resuming its checkpoint at `branch_step`."""

    cell: str  # the cell's label
    name: str  # the cell's name, e.g. "CD:FLM" (the points' cell)
    rung: str
    seed: int
    budget: Optional[float]
    steps: int  # T: the run's max_steps (the stable run: its largest branch point)
    branch_step: int  # S: the stable run's checkpoint this branch resumes (the stable run: its last step)
    run_dir: str
    overrides: tuple[str, ...]
    parent: Optional[str] = None  # the stable run's directory (branches)
    tokens_per_step: int = 0
    non_embedding_params: int = 0

    @property
    def decay_steps(self) -> int:
        """The steps this run trains itself (a branch: T - S; the stable run: all of them)."""
        return self.steps - (self.branch_step if self.budget is not None else 0)


@dataclass(frozen=True)
class RungPlan:
    rung: Rung
    args: CompareArgs  # compare's arguments for the rung
    facts: dict  # cell label -> compare's cell_facts (parameters, FLOPs per token; tokens per step of the world)
    matches: dict  # cell label -> compare's Match against the first cell (None: the first cell)
    tokens: tuple[float, ...]  # D_b: each budget's tokens seen
    runs: tuple[LadderRun, ...]


def budget_tokens(args: LadderArgs, n_ref: float) -> tuple[float, ...]:
    """D_b for a rung whose reference cell has `n_ref` non-embedding parameters."""
    return tuple(sorted(b * n_ref if args.budget_unit == "per-param" else b for b in args.budgets))


def branch_steps(tokens: tuple[float, ...], tokens_per_step: int, fraction: float, what: str) -> list[tuple[int, int]]:
    """[(T_b, S_b)] for budgets of `tokens` (ascending): T_b = max(1, round(D_b / tokens per step)),
    S_b = T_b - round(f T_b). Raises LadderError where two budgets share a branch point or one
    lies inside the warm-up."""
    out = []
    for d in tokens:
        t = max(1, round(d / tokens_per_step))
        out.append((t, stable_steps(t, fraction)))
    s = [b for _, b in out]
    if s[0] <= WARMUP_STEPS or len(set(s)) != len(s):
        raise LadderError(f"{what}: the budgets {', '.join(f'{d:,.0f}' for d in tokens)} tokens give branch points "
                          f"at steps {s} ({tokens_per_step} tokens per step); each must be distinct and after the "
                          f"{WARMUP_STEPS}-step warm-up: raise or spread the budgets (--budgets)")
    return out


def plan_rung(args: LadderArgs, rung: Rung, world_size: int = 1) -> RungPlan:
    """The rung's matched cells and its runs, for a world of `world_size` processes (each step
    takes micro-batch x accumulation rows on every one). Raises LadderError, or compare's
    CellError / MatchError / BudgetError (one line each)."""
    from ...config import load_config

    cargs = args.compare_args(rung)
    plan = plan_cells(cargs)
    ref = cargs.match_target().label
    tokens = budget_tokens(args, plan.facts[ref]["non_embedding_params"])
    runs, all_facts = [], {}
    for c in cargs.cells:
        facts = all_facts[c.label] = {**plan.facts[c.label],
                                      "tokens_per_step": plan.facts[c.label]["tokens_per_step"] * world_size}
        steps = branch_steps(tokens, facts["tokens_per_step"], args.decay_fraction, f"rung {rung.label} cell {c.name}")
        at = ",".join(str(s) for _, s in steps)
        data_seed = load_config(None, base_overrides(c, cargs)).data.seed
        for i in range(args.seeds):
            where = Path(args.out) / rung.label / c.label / f"seed-{i}"
            base = [o for o in cell_overrides(c, cargs, i, data_seed, plan)
                    if not o.startswith(("run_dir=", "logging.wandb.name="))]  # W&B: named below, in OUT's group
            common = dict(cell=c.label, name=c.name, rung=rung.label, seed=i, tokens_per_step=facts["tokens_per_step"],
                          non_embedding_params=facts["non_embedding_params"])
            stable = where / "stable"
            s_max = steps[-1][1]
            runs.append(LadderRun(budget=None, steps=s_max, branch_step=s_max, run_dir=str(stable), **common,
                                  overrides=tuple(base + [
                                      "schedule.name=wsd", f"schedule.max_steps={s_max}", "schedule.decay_fraction=0",
                                      f"checkpoint.at_steps=[{at}]", f"run_dir={stable}", wandb_name(args.out, stable)])))
            for b, (t, s) in zip(tokens, steps):
                branch = where / f"decay-{b:.0f}"
                runs.append(LadderRun(budget=b, steps=t, branch_step=s, run_dir=str(branch), parent=str(stable),
                                      **common, overrides=tuple(base + [
                                          "schedule.name=wsd", f"schedule.max_steps={t}",
                                          f"schedule.decay_fraction={args.decay_fraction}",
                                          f"checkpoint.resume={checkpoint_path(stable, s)}", f"run_dir={branch}",
                                          wandb_name(args.out, branch)])))
    return RungPlan(rung, cargs, all_facts, {k: v for k, v in plan.matches.items()}, tokens, tuple(runs))


def wandb_name(out: str, run_dir: Path) -> str:
    """logging.wandb.name of a ladder run: its directory below OUT (RUNG/CELL/seed-I/stable, .../decay-B)."""
    return f"logging.wandb.name={run_dir.relative_to(out)}"


def checkpoint_path(run_dir: Path | str, step: int) -> str:
    """RUN/checkpoints/step-<S> as the trainer names it."""
    from ...trainer.checkpointing import step_dir_name

    return str(Path(run_dir) / "checkpoints" / step_dir_name(step))


def plan_ladder(args: LadderArgs, world_size: int = 1) -> list[RungPlan]:
    """Every rung's plan for a world of `world_size`, in the order given; a rung that cannot be
    matched or branched is refused before anything trains."""
    return [plan_rung(args, r, world_size) for r in args.rungs]


def check_runs(plans: list[RungPlan], world_size: int = 1) -> None:
    """Every run's config loaded and checked for a world of `world_size` (the trainer's own check),
    before anything trains or is submitted. Raises LadderError naming the run."""
    from ...config import ConfigError, load_config
    from ...trainer.loop import check

    for p in plans:
        for r in p.runs:
            try:
                check(load_config(None, list(r.overrides)), world_size)
            except (ConfigError, ValueError) as e:
                raise LadderError(f"run {r.run_dir}: {' '.join(str(e).split())}") from None


def replace_steps(overrides: tuple[str, ...], steps: int) -> list[str]:
    """The planner's view of a run that trains `steps` steps itself (a branch: its decay steps):
    `overrides` without the resume, with a constant schedule of that length (a wsd schedule of so
    few steps would fail its own warm-up check; the schedule does not change the step's cost)."""
    return [o for o in overrides if not o.startswith(("checkpoint.resume=", "run_dir="))] + \
        ["schedule.name=constant", f"schedule.max_steps={steps}"]


__all__ = ["BUDGET_UNITS", "LadderArgs", "LadderRun", "Rung", "RungPlan", "branch_steps", "budget_tokens",
           "check_runs", "checkpoint_path", "plan_ladder", "plan_rung", "replace_steps",
           "stable_steps", "total_steps"]
