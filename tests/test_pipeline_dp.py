"""Pipeline x data parallel through the real trainer: 2 stages x 2 data-parallel ranks (4 CPU
processes over gloo) at ZeRO-1 for CD, ND and ED follow the single-process run over the same
global batch; a 2x2 checkpoint resumes on 2 stages x 1 rank (through a universal checkpoint)
with the uninterrupted losses, and refuses 1 stage x 2 ranks with a message naming both layouts
and the way out.

One 4-process launch (the three 2x2 runs, CD stopped at step 2 and resumed in the same launch),
one 2-process launch (the two resumes of CD's step-2 copy) and three single-process reference
runs in this process. The global batch is 8 rows of micro-batches of 2 on every layout
(`parallel.global_batch_size=8`: accumulation 4 on one process, 2 per pipeline of a 2x2 run,
4 on 2x1), so the micro-batches are the same rows everywhere and only reduction orders differ.
"""
from __future__ import annotations

import json

import pytest

from rehearse import CELLS, base_overrides, launch, losses, make_work, max_diff, metrics, run_inproc, state

STEPS = 4
LOSS_TOL = 1e-5  # fp32, different reduction orders only (seen: see docs/pipeline.md)


def overrides(work, run_dir, arch: str, stages: int) -> list[str]:
    return base_overrides(work) + CELLS[arch] + [
        f"run_dir={run_dir}", f"schedule.max_steps={STEPS}", "parallel.zero_stage=1",
        f"parallel.pipeline_stages={stages}", "parallel.global_batch_size=8", "checkpoint.every_n_steps=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = make_work(tmp_path_factory, "pipeline_dp")
    r = {a: work / f"pdp-{a}" for a in CELLS}
    spec = [
        {"overrides": overrides(work, r["cd"], "cd", 2), "max_steps_now": 2, "copy_to": str(work / "pdp-cd-at2")},
        {"overrides": overrides(work, r["cd"], "cd", 2)},  # 2x2 -> 2x2: the same launch resumes it
        {"overrides": overrides(work, r["nd"], "nd", 2)},
        {"overrides": overrides(work, r["ed"], "ed", 2)},
    ]
    times = launch(work, 4, spec, "launch4")
    spec2 = [
        {"overrides": overrides(work, work / "pdp-cd-2x1", "cd", 2), "copy_from": str(work / "pdp-cd-at2")},
        {"overrides": overrides(work, work / "pdp-cd-1x2", "cd", 1), "copy_from": str(work / "pdp-cd-at2"),
         "expect_error": True},
    ]
    times += launch(work, 2, spec2, "launch2")
    for a in CELLS:
        run_inproc(overrides(work, work / f"one-{a}", a, 1))
    return work, r, times


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CELLS))
def test_two_stages_by_two_ranks_follow_one_process(arch, runs):
    work, r, _ = runs
    one, pdp = losses(work / f"one-{arch}"), losses(r[arch])
    assert sorted(one) == sorted(pdp) == list(range(1, STEPS + 1))
    diff = max_diff(one, pdp, one)
    print(f"{arch.upper()} 2 stages x 2 ranks vs 1 process: max |loss diff| = {diff:.3g}")
    assert diff <= LOSS_TOL, (one, pdp)
    assert one[STEPS] < one[1]  # it learns, so equal curves mean something
    s1, s4 = state(work / f"one-{arch}"), state(r[arch])
    assert (s4["world_size"], s4["config"]["parallel"]["pipeline_stages"]) == (4, 2)
    assert (s1["tokens_seen"], s1["target_tokens"]) == (s4["tokens_seen"], s4["target_tokens"])
    assert s1["flops"] == pytest.approx(s4["flops"], rel=1e-12)
    if arch == "cd":  # stopped at step 2 and resumed in the same launch: each step logged once
        assert [m["step"] for m in metrics(r[arch]) if "loss" in m] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_two_by_two_resumes_on_two_stages_by_one_rank(runs):
    work, r, _ = runs
    run = work / "pdp-cd-2x1"
    assert (run / "checkpoints" / "step-00000002" / "engine_universal" / "COMPLETE").is_file()
    got, ref = losses(run), losses(r["cd"])
    assert sorted(got) == list(range(1, STEPS + 1))
    diff = max_diff(got, ref, range(3, STEPS + 1))
    print(f"CD 2x2 -> 2x1 resume: max |loss diff| over steps 3-{STEPS} = {diff:.3g}")
    assert diff <= LOSS_TOL, (got, ref)
    s = state(run)
    assert (s["step"], s["world_size"]) == (STEPS, 2)
    assert s["tokens_seen"] == state(r["cd"])["tokens_seen"]


@pytest.mark.slow
def test_two_by_two_refuses_one_stage_by_two_ranks(runs):
    work, _, _ = runs
    run = work / "pdp-cd-1x2"
    msg = (run / "error.txt").read_text()
    assert "\n" not in msg.strip()
    assert "parallel.pipeline_stages=2; this run has 1" in msg and "init.from_checkpoint" in msg, msg
    assert state(run)["step"] == 2 and not (run / "FINISHED").exists()  # nothing was written
    assert json.loads((run / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())["world_size"] == 4
