"""Warmup-stable-decay (schedule.name=wsd) and WSD-S decay branches (docs/resume.md "Decay branches").

The pure parts: the multiplier's shape and endpoints, the branch point and its inverse, the config
checks, at_steps checkpoints against pruning, find_resume_point's order for a branch. The trainer
(CPU, debug CD:FLM, in this process): a stable run (decay_fraction=0) saving at its branch point S,
a branch from that checkpoint to T, stopped mid-decay and resumed from its own checkpoint, equals
one uninterrupted wsd run of T steps bitwise (every loss, the final weights, the counts); the branch
names its parent in branch.json and in its trainer states; branches that would not continue their
parent are refused in one line.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_trainer import _write_corpus, base_overrides, fp32_weights, losses, metrics, state
from train.config import ConfigError, branch_length, derive, load_config, wsd_branch_point
from train.engine.ds_config import lr_multiplier
from train.trainer.checkpointing import (CheckpointError, TrainerState, find_resume_point, list_checkpoints,
                                         save_checkpoint)

T, F = 10, 0.3  # the branch's budget and decay fraction: D = 3, branch point S = 7
S = wsd_branch_point(T, F)
STABLE_STEPS = 9  # the stable run goes on past S (its checkpoint at S is a mid-run save)


def schedule(**kw):
    args = [f"schedule.{k}={v}" for k, v in {"name": "wsd", **kw}.items()]
    return load_config(None, args).schedule


# ---------------------------------------------------------------------------------- pure parts
def test_wsd_multiplier_warms_up_stays_flat_and_decays_linearly_to_min_lr_ratio():
    s = schedule(max_steps=20, warmup_steps=4, decay_fraction=0.25, min_lr_ratio=0.1)
    m = [lr_multiplier(s, k, 20) for k in range(21)]
    assert m[:4] == [0.25, 0.5, 0.75, 1.0]                      # warmup: (step + 1) / warmup
    assert m[4:16] == [1.0] * 12                                 # stable, up to and with S = 15
    assert wsd_branch_point(20, 0.25) == 15
    assert m[20] == 0.1 and m[15] == 1.0                         # endpoints exact
    steps = [m[k] - m[k + 1] for k in range(15, 20)]
    assert all(abs(d - 0.9 / 5) < 1e-12 for d in steps)          # linear, (1 - 0.1) / D per step
    flat = schedule(max_steps=20, warmup_steps=4, decay_fraction=0.0)
    assert [lr_multiplier(flat, k, n) for n in (20, 50) for k in range(4, 20)] == [1.0] * 32  # the stable run
    cos = load_config(None, ["schedule.max_steps=20"]).schedule   # the default schedule is unchanged
    assert cos.name == "cosine" and lr_multiplier(cos, 0, 20) == 1.0 and lr_multiplier(cos, 20, 20) == pytest.approx(0.1)


@pytest.mark.parametrize("f", [0.0, 0.1, 0.3, 0.5, 0.75, 0.95])
def test_branch_length_inverts_the_branch_point(f):
    for s in range(0, 400):
        t = branch_length(s, f)
        assert wsd_branch_point(t, f) == s
        assert t == s or wsd_branch_point(t - 1, f) < s          # the smallest such T
    assert branch_length(S, F) == T


def test_wsd_config_errors_are_one_line():
    for args, match in ((["schedule.decay_fraction=1.0"], "decay_fraction=1.0 must be in"),
                        (["schedule.decay_fraction=-0.1"], "must be in"),
                        (["checkpoint.at_steps=[0, 5]"], "at_steps")):
        with pytest.raises(ConfigError, match=match) as e:
            load_config(None, ["schedule.name=wsd", "schedule.max_steps=10", *args])
        assert "\n" not in str(e.value)
    cfg = load_config(None, ["schedule.name=wsd", "schedule.max_steps=10", "schedule.warmup_steps=8",
                             "schedule.decay_fraction=0.3"])
    with pytest.raises(ConfigError, match=r"warmup_steps=8 \+ decay steps .* = 3 exceed schedule.max_steps=10"):
        derive(cfg, 1)
    cfg.schedule.warmup_steps = 7
    assert derive(cfg, 1).max_steps == 10


def _save(ckpt: Path, step: int, **kw) -> Path:
    return save_checkpoint(ckpt, TrainerState(step=step), lambda d: (d / "engine").mkdir(), **kw)


def test_at_steps_checkpoints_survive_keep_last_pruning(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in range(1, 9):
        _save(ckpt, step, keep_last=1, keep_steps=(3, 5))
    assert [s for s, _ in list_checkpoints(ckpt)] == [3, 5, 8]


def test_a_branch_resumes_its_own_checkpoint_once_it_has_one(tmp_path):
    parent, branch = tmp_path / "stable", tmp_path / "branch"
    _save(parent / "checkpoints", 7)
    _save(parent / "checkpoints", 9)
    start = str(parent / "checkpoints" / "step-00000007")
    assert find_resume_point(branch, start) == parent / "checkpoints" / "step-00000007"
    _save(branch / "checkpoints", 8)
    assert find_resume_point(branch, start) == branch / "checkpoints" / "step-00000008"
    assert find_resume_point(branch, str(parent)) == branch / "checkpoints" / "step-00000008"
    # a path into this run's own checkpoints still names that checkpoint (a roll-back)
    _save(branch / "checkpoints", 9)
    assert find_resume_point(branch, str(branch / "checkpoints" / "step-00000008")).name == "step-00000008"
    with pytest.raises(CheckpointError, match="no such path"):   # a bad path stays an error
        find_resume_point(branch, str(parent / "checkpoints" / "step-00000008"))


# ---------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("wsd")
    _write_corpus(w / "corpus")
    return w


@pytest.fixture(scope="module")
def inproc():
    from rehearse import inprocess

    with inprocess():
        yield


def run(overrides: list[str], **kw):
    from train.trainer.loop import train

    return train(load_config(None, overrides), **kw)


def common(work: Path) -> list[str]:
    """CD:FLM, debug size, ZeRO-1 (fp32 weights read back by zero_to_fp32), warmup 2, no periodic
    saves, the held-out loss every 4 steps (at 4 and 8: before and after the branch point)."""
    return [o for o in base_overrides(work) if not o.startswith("schedule.name")] + [
        "model.arch=cd", "objective.name=flm", "schedule.name=wsd", "schedule.warmup_steps=2",
        "checkpoint.every_n_steps=100", "eval.yardstick=false", "parallel.zero_stage=1",
        "eval.every_n_steps=4"]


def branch_args(work: Path, run_dir: Path, **kw) -> list[str]:
    args = {"max_steps": T, "decay_fraction": F, **kw}
    return common(work) + [f"run_dir={run_dir}", f"checkpoint.resume={work / 'stable' / 'checkpoints' / f'step-{S:08d}'}"] \
        + [f"schedule.{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def runs(work, inproc) -> dict[str, Path]:
    """The uninterrupted wsd run of T steps; the stable run (saves at S, keeps 1 besides); the
    branch from its step-S checkpoint, stopped after one decay step and resumed to T."""
    ref, stable, branch = work / "reference", work / "stable", work / "branch"
    run(common(work) + [f"run_dir={ref}", f"schedule.max_steps={T}", f"schedule.decay_fraction={F}"])
    run(common(work) + [f"run_dir={stable}", f"schedule.max_steps={STABLE_STEPS}", "schedule.decay_fraction=0",
                        f"checkpoint.at_steps=[{S}]", "checkpoint.every_n_steps=1", "checkpoint.keep_last=1"])
    run(branch_args(work, branch), max_steps_now=1)              # stops at S + 1, mid-decay
    first = sorted(s for s, _ in list_checkpoints(branch / "checkpoints"))
    run(branch_args(work, branch))                               # the same command: its own checkpoint
    return {"reference": ref, "stable": stable, "branch": branch, "first": first}


def test_stable_run_keeps_its_branch_point_through_pruning(runs):
    assert [s for s, _ in list_checkpoints(runs["stable"] / "checkpoints")] == [S, STABLE_STEPS]


def test_stable_plus_branch_equals_one_wsd_run_bitwise(runs):
    ref, stable, branch = losses(runs["reference"]), losses(runs["stable"]), losses(runs["branch"])
    assert sorted(ref) == list(range(1, T + 1))
    assert {k: stable[k] for k in range(1, S + 1)} == {k: ref[k] for k in range(1, S + 1)}
    assert branch == {k: ref[k] for k in range(S + 1, T + 1)}
    assert [r["step"] for r in metrics(runs["branch"]) if "loss" in r] == list(range(S + 1, T + 1))  # once each
    lrs = {r["step"]: r["lr"] for r in metrics(runs["branch"]) if "lr" in r}
    ref_lrs = {r["step"]: r["lr"] for r in metrics(runs["reference"]) if "lr" in r}
    assert lrs and lrs == {k: ref_lrs[k] for k in lrs}
    assert ref_lrs[S - 1] == ref_lrs[S - 2] > lrs[S + 1] > lrs[T - 1] > lrs[T]  # it did decay, after S
    evals = {r["step"]: r["eval_loss"] for r in metrics(runs["branch"]) if "eval_loss" in r}
    ref_evals = {r["step"]: r["eval_loss"] for r in metrics(runs["reference"]) if "eval_loss" in r}
    assert sorted(evals) == [8, T] and evals == {k: ref_evals[k] for k in evals}
    final = f"step-{T:08d}"
    w_ref = fp32_weights(runs["reference"] / "checkpoints" / final)
    w_run = fp32_weights(runs["branch"] / "checkpoints" / final)
    assert w_ref.keys() == w_run.keys() and w_ref
    assert not [k for k in w_ref if not torch.equal(w_ref[k], w_run[k])]
    s_ref, s_run = state(runs["reference"]), state(runs["branch"])
    for k in ("step", "tokens_seen", "target_tokens", "flops", "data_position"):
        assert s_ref[k] == s_run[k], k


def test_the_branch_names_its_parent_and_resumed_its_own_checkpoint(runs):
    assert runs["first"] == [S + 1]                              # its own save when stopped mid-decay
    record = json.loads((runs["branch"] / "branch.json").read_text())
    parent_ckpt = runs["stable"] / "checkpoints" / f"step-{S:08d}"
    assert record == {"parent_run_dir": str(runs["stable"].resolve()), "parent_checkpoint": str(parent_ckpt.resolve()),
                      "parent_step": S}
    for step in (S + 1, T):
        assert state(runs["branch"], step)["branch"] == record
    assert state(runs["reference"])["branch"] == {} and not (runs["reference"] / "branch.json").exists()


@pytest.mark.parametrize("change, match", [
    (["model.overrides.n_layers=1"], "model.overrides"),
    (["objective.name=plm", "model.arch=nd"], "model.arch"),
    (["optim.lr=0.001"], "optim.lr=0.003; this branch has optim.lr=0.001"),
    (["parallel.gradient_accumulation_steps=2"], "global batch of 2 rows; this branch has 4"),
    (["objective.seq_length=32"], "objective.seq_length=64; this branch has objective.seq_length=32"),
    (["data.seed=7"], "data.seed=1234; this branch has data.seed=7"),
    (["schedule.min_lr_ratio=0.2"], "schedule.min_lr_ratio"),
    (["schedule.max_steps=7"], r"step 7 the lr multiplier 0.55 .* use schedule.max_steps=10 \(decay from step 7\)"),
])
def test_a_branch_that_does_not_continue_its_parent_is_refused_in_one_line(change, match, work, runs, inproc):
    with pytest.raises(ConfigError, match=match) as e:
        run(branch_args(work, work / "refused") + change)
    assert not (work / "refused" / "checkpoints").exists()      # refused before any work
    assert "\n" not in str(e.value)
