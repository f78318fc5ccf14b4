"""archscale ladder: the plan (rungs matched across cells, branch points, the runs and what each
waits on), the refusals, a CI-sized ladder trained for real, and --submit on the local cluster."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.commands.ladder import command as L
from train.commands.ladder.plan import LadderArgs, Rung, branch_steps, plan_ladder, stable_steps
from train.commands.ladder.points import LadderError

TINY = ["--cells", "cd:flm,ed:mlm", "--sizes", "64x2,128x2", "--budgets", "10240,16384", "--budget-unit", "tokens",
        "--seeds", "1", "--resamples", "20"]


def tiny_plans(tmp_path, extra=()):
    ns, args = L.parse_args(TINY + ["--out", str(tmp_path / "lad"), *extra])
    return ns, args, plan_ladder(args)


def test_plan_matches_each_rung_and_branches_every_budget_from_one_stable_run(tmp_path):
    ns, args, plans = tiny_plans(tmp_path, ["--seeds", "2"])
    assert [p.rung.label for p in plans] == ["64x2", "128x2"]
    for p in plans:
        cd, ed = p.facts["cd-flm"]["non_embedding_params"], p.facts["ed-mlm"]["non_embedding_params"]
        assert abs(ed / cd - 1) <= 0.05  # matched by non-embedding parameters within 5%
        assert p.tokens == (10240.0, 16384.0)
        for cell in ("cd-flm", "ed-mlm"):
            for seed in (0, 1):
                runs = [r for r in p.runs if r.cell == cell and r.seed == seed]
                stable = [r for r in runs if r.budget is None]
                branches = [r for r in runs if r.budget is not None]
                assert len(stable) == 1 and len(branches) == 2
                s = stable[0]
                points = [b.branch_step for b in branches]
                # the stable run stops at the largest branch point and keeps a checkpoint at each
                assert s.steps == max(points) and f"checkpoint.at_steps=[{','.join(map(str, points))}]" in s.overrides
                assert "schedule.decay_fraction=0" in s.overrides and "schedule.name=wsd" in s.overrides
                for b in branches:
                    assert b.parent == s.run_dir and stable_steps(b.steps, 0.2) == b.branch_step
                    assert f"schedule.max_steps={b.steps}" in b.overrides
                    assert any(o == f"checkpoint.resume={s.run_dir}/checkpoints/step-{b.branch_step:08d}"
                               for o in b.overrides)
                    assert b.decay_steps == b.steps - b.branch_step > 0
                    assert b.run_dir.startswith(str(Path(args.out) / p.rung.label / cell / f"seed-{seed}"))
    # the larger rung is larger, and its cells' seeds differ
    assert plans[1].facts["cd-flm"]["non_embedding_params"] > 3 * plans[0].facts["cd-flm"]["non_embedding_params"]
    seeds = {o for r in plans[0].runs if r.cell == "cd-flm" and r.budget is None for o in r.overrides
             if o.startswith("seed=")}
    assert seeds == {"seed=0", "seed=1"}


def test_budgets_per_parameter_scale_with_the_rung_and_match_by_flops(tmp_path):
    argv = ["--cells", "cd:flm,ed:mlm", "--sizes", "64x2,128x2", "--budgets", "0.2,0.4", "--seeds", "1",
            "--match", "flops", "--out", str(tmp_path)]
    _, args = L.parse_args(argv)
    plans = plan_ladder(args)
    for p in plans:
        n = p.facts["cd-flm"]["non_embedding_params"]
        assert p.tokens == (0.2 * n, 0.4 * n)
        f_cd, f_ed = p.facts["cd-flm"]["flops_per_token"], p.facts["ed-mlm"]["flops_per_token"]
        assert abs(f_ed / f_cd - 1) <= 0.05  # matched by training FLOPs per token


def test_branch_steps_refuse_budgets_that_share_a_branch_point_or_sit_in_the_warmup():
    assert branch_steps((10240.0, 16384.0), 1024, 0.2, "x") == [(10, 8), (16, 13)]
    with pytest.raises(LadderError, match="distinct and after the 5-step warm-up"):
        branch_steps((10240.0, 10300.0), 1024, 0.2, "rung r cell c")
    with pytest.raises(LadderError, match="warm-up"):
        branch_steps((2048.0, 16384.0), 1024, 0.2, "rung r cell c")


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "64x2,65x2"], "WIDTHxDEPTH with WIDTH a multiple of 16"),
    (["--sizes", "64x2,64x2"], "distinct sizes"),
    (["--budgets", "10,10"], "at least 2 distinct positive budgets"),
    (["--budgets", "10,x"], "not a comma-separated list of numbers"),
    (["--decay-fraction", "1.5"], "must be in (0, 1)"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert L.main(["--out", "/nonexistent/never", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_cells_split_at_each_arch_objective_and_keep_their_own_settings():
    _, args = L.parse_args(["--cells", "cd:plm,nd:plm:model.overrides.bidirectional_mode=mixed_heads,ed:mlm"])
    assert [c.label for c in args.cells] == ["cd-plm", "nd-plm-bidirectional_modemixed_heads", "ed-mlm"]
    assert args.cells[1].overrides == ("model.overrides.bidirectional_mode=mixed_heads",)


def test_named_sizes_are_rungs_and_an_unmatchable_rung_is_refused_before_anything_trains(tmp_path, capsys):
    assert Rung.parse("tiny") == Rung("tiny", "tiny")
    assert L.main(["--cells", "cd:flm,ed:mlm", "--sizes", "32x1,64x2", "--out", str(tmp_path / "x")]) == 2
    assert "--match params: no shape of cell ed-mlm" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_default_target_judges_ed_at_its_own_reference_size(tmp_path):
    _, args = L.parse_args(["--cells", "cd:flm,nd:plm,ed:mlm", "--out", str(tmp_path)])
    t = L.target_of(L.DEFAULT_TARGET, args)
    assert t.for_cell("CD:FLM") == (4.8e9, 1.68e11) and t.for_cell("ND:PLM") == (4.8e9, 1.68e11)
    n_ed, _ = t.for_cell("ED:MLM")
    assert 1.0e10 < n_ed < 1.2e10  # the 11b reference ED's non-embedding parameters
    assert L.target_of("N=1e9,D=2e10", args).for_cell("ED:MLM") == (1e9, 2e10)  # an explicit target as given


def test_submit_dry_run_plans_gpu_hours_per_rung_and_chains_branches(tmp_path, capsys):
    assert L.main(TINY + ["--out", str(tmp_path / "lad"), "--submit", "--dry-run", "--gpus-per-node", "1",
                          "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "rung 64x2: 6 runs" in out and "rung 128x2: 6 runs" in out and "total:" in out and "GPU-hours" in out
    assert out.count("stable: dry run") == 4 and out.count("(afterok its stable run)") == 8
    assert "#SBATCH" in out and "schedule.name=wsd" in out
    assert not (tmp_path / "lad").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_ci_sized_ladder_trains_branches_collects_points_and_refuses_a_two_rung_fit(tmp_path, capsys):
    """2 cells x 2 sizes x 2 budgets, real training: every branch resumes its stable run's
    checkpoint and names it; ladder.json's N, D and C are the runs' own; the fit refuses 2 rungs."""
    out = tmp_path / "lad"
    assert L.main(TINY + ["--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert err == ["error: cannot fit the ladder: cell CD:FLM has 2 rung(s); the fit needs at least 3: add model "
                   "sizes to the ladder"]
    doc = json.loads((out / "ladder.json").read_text())
    assert len(doc["points"]) == 8 and len(doc["runs"]) == 12
    _, args, plans = tiny_plans(tmp_path)
    planned = {r.run_dir: r for p in plans for r in p.runs}
    for pt in doc["points"]:
        run = Path(pt["run_dir"])
        result = json.loads((run / "result.json").read_text())
        branch = json.loads((run / "branch.json").read_text())
        assert branch["parent_run_dir"] == pt["parent"] and branch["parent_step"] == pt["branch_step"]
        assert (Path(pt["parent"]) / "checkpoints" / f"step-{pt['branch_step']:08d}" / "COMPLETE").exists()
        assert result["step"] == pt["step"] == planned[str(run)].steps
        assert pt["D"] == result["tokens_seen"] and pt["C"] == result["flops"]
        assert pt["loss"] == result["yardsticks"][-1]["yardstick_nats"] and 0 < pt["loss"] < 12
        assert pt["N"] == planned[str(run)].non_embedding_params
        parent = json.loads((Path(pt["parent"]) / "result.json").read_text())
        assert parent["step"] == max(p["branch_step"] for p in doc["points"] if p["parent"] == pt["parent"])
        # the branch continues its parent's stream: the same tokens per step, counted from step 0
        assert abs(pt["D"] / pt["step"] / (parent["tokens_seen"] / parent["step"]) - 1) < 0.02
        assert (pt["step"] > parent["step"]) == (pt["D"] > parent["tokens_seen"])
    # the budgets vary D within a rung, the rungs N; the larger budget sees more tokens
    for cell in ("CD:FLM", "ED:MLM"):
        for rung in ("64x2", "128x2"):
            ds = sorted(p["D"] for p in doc["points"] if p["cell"] == cell and p["rung"] == rung)
            assert len(ds) == 2 and ds[1] > 1.4 * ds[0]
    # the same command again trains nothing and reads the same points
    assert L.main(TINY + ["--out", str(out), "--min-rungs", "2"]) == 2
    assert "fit needs at least" not in capsys.readouterr().err
    assert json.loads((out / "ladder.json").read_text())["points"] == doc["points"]


@pytest.mark.slow
def test_submit_runs_the_ladder_on_the_local_cluster_then_collects_it(slurm_cluster, tmp_path, capsys):
    """--submit on the real local Slurm cluster: CPU jobs, each branch afterok its stable run; the
    same command without --submit then trains nothing and writes every point."""
    import re

    from test_slurm import final_state, wait_for

    out = tmp_path / "lad"
    common = TINY + ["--out", str(out), "--sizes", "64x2", "--cells", "cd:flm"]
    assert L.main(common + ["--submit", "--gpus-per-node", "0", "--time", "10"]) == 0
    text = capsys.readouterr().out
    jobs = re.findall(r": job (\d+)", text)
    assert len(jobs) == 3 and text.count("afterok") == 2
    states = wait_for(lambda: (lambda s: s if all(s) else None)([final_state(j) for j in jobs]), 300,
                      "the ladder's jobs", out / "64x2" / "cd-flm" / "seed-0" / "stable" / "slurm")
    assert states == ["COMPLETED"] * 3, states
    assert L.main(common) == 2  # one rung: the fit refuses, after the points are written
    doc = json.loads((out / "ladder.json").read_text())
    assert len(doc["points"]) == 2 and all(not (Path(p["run_dir"]) / "result.json").exists() for p in doc["points"])


def test_finished_branches_are_fitted_judged_drawn_and_paged(tmp_path, capsys):
    """Branches finished elsewhere (a metrics.jsonl and FINISHED, as a --submit job leaves them),
    their losses drawn from a known law: the command reads them, fits, judges ED at its own
    size, and writes the pictures and the page; an unfinished branch is listed, not a point."""
    import numpy as np

    argv = ["--cells", "cd:flm,ed:mlm", "--sizes", "64x2,128x2,192x2,256x2", "--budgets", "20,40,80",
            "--seeds", "2", "--resamples", "30", "--starts", "16", "--out", str(tmp_path / "lad")]
    ns, args = L.parse_args(argv)
    plans = plan_ladder(args)
    rng = np.random.default_rng(0)
    branches = [r for p in plans for r in p.runs if r.budget is not None]
    for r in branches[:-1]:  # the last branch has not finished
        n, d = r.non_embedding_params, r.steps * r.tokens_per_step
        loss = 1.8 + 400 / n ** 0.34 + 900 / d ** 0.28 + (0.05 if r.cell == "ed-mlm" else 0) + rng.normal(0, 0.005)
        Path(r.run_dir).mkdir(parents=True)
        (Path(r.run_dir) / "FINISHED").write_text("{}\n")
        (Path(r.run_dir) / "metrics.jsonl").write_text(
            json.dumps({"step": r.steps - 5, "tokens_seen": 1, "flops": 1, "yardstick_nats": 99.0}) + "\n"
            + json.dumps({"step": r.steps, "tokens_seen": d, "flops": 6.0 * n * d, "yardstick_nats": loss}) + "\n")
    assert L.judge_ladder(ns, args, plans, "archscale ladder " + " ".join(argv)) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "lad" / "ladder.json").read_text())
    assert len(doc["points"]) == len(branches) - 1 and f"1 branch(es) not finished, e.g. {branches[-1].run_dir}" in out
    assert all(p["loss"] < 50 for p in doc["points"])  # the last step's evaluation, not an earlier one
    page = (tmp_path / "lad" / "ladder.md").read_text()
    assert "archscale ladder --cells cd:flm,ed:mlm" in page and "ED:MLM" in page and "CD:FLM" in page
    assert (tmp_path / "lad" / "loss_vs_flops.png").stat().st_size > 1000
    assert (tmp_path / "lad" / "isoflop.png").stat().st_size > 1000
    assert "N[ED:MLM]=1.09e+10" in page  # ED judged at the 11b reference's non-embedding parameters
    # these branches were written by hand, with no config.yaml: the baselines say why they are missing
    assert "## Baselines\n\nBaselines not computed: config file" in page
    assert "## Points (47 finished branches" in page and "| CD:FLM | 64x2 |" in page
    # archscale report on the ladder's directory: its points and the page's verdicts, read-only
    from train.commands import report

    assert report.main([str(tmp_path / "lad")]) == 0
    shown = capsys.readouterr().out
    assert "1 branch(es) unfinished" in shown and "| ED:MLM | 256x2 |" in shown and "## Verdicts at the target" in shown
    assert (tmp_path / "lad" / "report" / "report.md").exists()
