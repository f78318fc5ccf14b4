"""archscale reproduce: the verdict rules on constructed differences, and the refusals."""
from __future__ import annotations

import pytest

from train.commands import reproduce as R


def pair(a, b, mean, half):
    return {"a": a, "b": b, "metric": R.METRIC, "mean": mean, "half_width": half, "low": mean - half,
            "high": mean + half, "resolved": abs(mean) > half, "seeds": [0, 1]}


GPT = R.CLAIMS["su-gpt-vs-unilm"].names
ED = R.CLAIMS["su-ed-params"].names


@pytest.mark.parametrize("nd_cd,mix_nd,mix_cd,verdict", [
    ((0.01, 0.02), (-0.05, 0.01), (-0.04, 0.01), "reproduced"),        # no gain from ND; mixed best
    ((-0.05, 0.01), (-0.05, 0.01), (-0.1, 0.01), "not reproduced"),   # ND resolved better than CD
    ((0.0, 0.02), (0.05, 0.01), (0.05, 0.01), "not reproduced"),      # mixed resolved worse
    ((0.0, 0.02), (-0.01, 0.02), (-0.01, 0.02), "inconclusive"),      # mixed not resolved
])
def test_gpt_vs_unilm_rule(nd_cd, mix_nd, mix_cd, verdict):
    # the table lists pairs in cell order (CD, ND, mixed): a - b with a earlier; the rule flips signs itself
    pairs = [pair(GPT["cd"], GPT["nd"], -nd_cd[0], nd_cd[1]), pair(GPT["cd"], GPT["mixed"], -mix_cd[0], mix_cd[1]),
             pair(GPT["nd"], GPT["mixed"], -mix_nd[0], mix_nd[1])]
    got, reasons = R.rule_gpt_vs_unilm(pairs, GPT)
    assert got == verdict and len(reasons) == 3 and reasons[0].startswith("ND:PLM - CD:PLM")


@pytest.mark.parametrize("ed,half,verdict", [
    ((-0.1, 0.02), (0.01, 0.02), "reproduced"),
    ((-0.1, 0.02), (-0.1, 0.02), "not reproduced"),
    ((0.0, 0.02), (0.01, 0.02), "inconclusive"),
])
def test_ed_params_rule(ed, half, verdict):
    pairs = [pair(ED["ed"], ED["cd"], *ed), pair(ED["ed-params"], ED["cd"], *half)]
    assert R.rule_ed_params(pairs, ED)[0] == verdict


@pytest.mark.parametrize("nd_cd,nd_mix,verdict", [
    ((-5.0, 1.0), (-4.0, 1.0), "reproduced"),
    ((2.0, 1.0), (-4.0, 1.0), "not reproduced"),
    ((-5.0, 1.0), (-0.5, 1.0), "inconclusive"),
])
def test_low_rank_rule(nd_cd, nd_mix, verdict):
    names = R.CLAIMS["su-low-rank"].names
    pairs = [{**pair(names["cd"], names["nd"], -nd_cd[0], nd_cd[1]), "metric": R.RANK},
             {**pair(names["nd"], names["mixed"], *nd_mix), "metric": R.RANK}]
    assert R.rule_low_rank(pairs, names)[0] == verdict


def test_refusals(capsys):
    assert R.main(["--list"]) == 0
    assert "su-gpt-vs-unilm" in capsys.readouterr().out
    assert R.main(["nope"]) == 2 and "unknown claim 'nope'" in capsys.readouterr().err
    assert R.main(["su-gpt-vs-unilm", "--size", "huge"]) == 2 and "--size 'huge'" in capsys.readouterr().err


ENT = R.CLAIMS["su-entropy-scale"].names


@pytest.mark.parametrize("logn,bias,verdict", [
    ((-0.1, 0.02), (-0.05, 0.02), "reproduced"),
    ((-0.1, 0.02), (0.05, 0.02), "not reproduced"),     # q/k bias extrapolates resolved worse
    ((-0.1, 0.02), (-0.01, 0.02), "inconclusive"),
])
def test_entropy_scale_rule_reads_the_4n_loss(logn, bias, verdict):
    key = R.length_metric(4)
    pairs = [{**pair(ENT["rope"], ENT["logn"], -logn[0], logn[1]), "metric": key},
             {**pair(ENT["qkbias"], ENT["rope"], *bias), "metric": key},
             # the same differences at n point the other way: the rule must not read them
             {**pair(ENT["logn"], ENT["rope"], 1.0, 0.01), "metric": R.length_metric(1)}]
    got, reasons = R.rule_entropy_scale(pairs, ENT)
    assert got == verdict and all(r.endswith("at 4n") for r in reasons)


@pytest.mark.slow
def test_entropy_scale_reproduction_runs_end_to_end(tmp_path, capsys):
    """A real (tiny) run of the claim: three CD:FLM cells trained at n, each scored at n, 2n, 4n."""
    res = tmp_path / "results"
    assert R.main(["su-entropy-scale", "--seeds", "1", "--tokens", "3000", "--out", str(tmp_path / "runs"),
                   "--results", str(res)]) == 0
    out = capsys.readouterr().out
    assert "verdict: inconclusive" in out  # one seed resolves nothing
    page = (res / "su-entropy-scale.md").read_text()
    assert "| nats/token at 1n | nats/token at 2n | nats/token at 4n |" in page and (res / "su-entropy-scale.png").exists()
    rows = [line for line in page.splitlines() if line.startswith("| CD:FLM (rope") and line.count("|") == 6]
    assert len(rows) == 3 and all(8.0 < float(v) < 10.0 for r in rows for v in r.strip("|").split("|")[2:])


NCA = R.CLAIMS["wang-nca"].names


def nca_doc(scratch_losses, nca_losses):
    """Runs with (step, tokens, flops, held-out loss) curves: scratch ends at step 100."""
    curve = lambda losses: [(10 * (i + 1), 0, 0.0, x) for i, x in enumerate(losses)]  # noqa: E731
    return {"cells": [{"name": NCA["scratch"], "runs": [{"seed": s, "eval_losses": curve(scratch_losses)}
                                                        for s in (0, 1)]},
                      {"name": NCA["nca"], "runs": [{"seed": s, "eval_losses": curve(nca_losses[s])} for s in (0, 1)]}]}


@pytest.mark.parametrize("nca,verdict,speedups", [
    (([5.0, 4.0, 3.0], [5.0, 2.9, 2.0]), "reproduced", [100 / 30, 100 / 20]),   # 3.3x and 5x
    (([5.0, 4.0, 3.0], [5.0, 5.0, 5.0]), "not reproduced", [100 / 30, None]),    # seed 1 never gets there
    (([9.0] * 5 + [3.0], [9.0] * 7 + [3.0]), "not reproduced", [100 / 60, 100 / 80]),  # mean 1.46x < 1.5
    (([5.0, 4.0, 3.0], [9.0] * 5 + [3.0]), "inconclusive", [100 / 30, 100 / 60]),  # one seed at 1.7x
])
def test_nca_rule_reads_the_catch_up_per_seed(nca, verdict, speedups):
    doc = nca_doc([6.0] * 9 + [3.0], nca)  # scratch's final held-out loss 3.0 at step 100
    got, reasons = R.rule_nca(R.measure_catch_up(doc, NCA), NCA)
    runs = doc["cells"][1]["runs"]
    assert got == verdict and [r[R.SPEEDUP] for r in runs] == pytest.approx(speedups)
    assert all(r["target_loss"] == 3.0 and r["scratch_steps"] == 100 for r in runs) and "speed-up per seed" in reasons[0]


def test_compare_fills_out_and_seed_in_a_cells_own_values():
    from train.commands.compare import CompareArgs, cell_overrides
    from train.commands.compare.cells import Cell

    args = CompareArgs(out="runs/x")
    cell = Cell("nd", "mlm", ["init.from_checkpoint={out}/cd-flm/seed-{seed}"], "nca")
    assert "init.from_checkpoint=runs/x/cd-flm/seed-1" in cell_overrides(cell, args, seed_index=1)


@pytest.mark.slow
def test_nca_reproduction_continues_each_seed_of_the_causal_decoder(tmp_path, capsys):
    """A real (tiny) NC-A chain: CD:FLM, ND:MLM from scratch, and ND:MLM started from CD:FLM's run."""
    import yaml

    res, runs = tmp_path / "results", tmp_path / "runs"
    assert R.main(["wang-nca", "--seeds", "1", "--tokens", "3000", "--out", str(runs), "--results", str(res)]) == 0
    assert "speed-up per seed" in capsys.readouterr().out
    cfg = yaml.safe_load((runs / "nd-mlm-nca" / "seed-0" / "config.yaml").read_text())
    assert cfg["init"]["from_checkpoint"] == str(runs / "cd-flm" / "seed-0") and cfg["model"]["arch"] == "nd"
    page = (res / "wang-nca.md").read_text()
    assert "| ND:MLM (nd-mlm-nca) | 0 |" in page and "speed-up" in page


def test_submit_dry_run_plans_every_run_and_chains_nca_after_its_parent(tmp_path, capsys):
    out = tmp_path / "runs"
    assert R.main(["wang-nca", "--submit", "--dry-run", "--gpus-per-node", "2", "--tokens", "1000000",
                   "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "plan on 2 x h100-80gb per run" in text and "GPU-hours" in text.split("total:")[1]
    assert text.count("GPU-hours") == 7  # six runs and the total
    assert "nd-mlm-nca seed 1: dry run (after cd-flm seed 1, afterok)" in text
    assert "nd-mlm seed 0: dry run\n" in text  # from scratch: no dependency
    assert "#SBATCH --gpus-per-node=2" in text and not list(out.glob("*/seed-*/slurm/job.sh"))
    assert R.main(["wang-nca", "--submit", "--dry-run", "--nodes", "0", "--out", str(out)]) == 2
    assert "world size 0 must be >= 1" in capsys.readouterr().err


ZS = R.CLAIMS["wang-zero-shot"].names


@pytest.mark.parametrize("cd_nd,cd_ed,ed_cd_after,verdict", [
    ((-0.1, 0.02), (-0.1, 0.02), (-0.1, 0.02), "reproduced"),
    ((-0.1, 0.02), (0.1, 0.02), (-0.1, 0.02), "not reproduced"),    # CD:FLM resolved worse than ED:MLM before
    ((-0.1, 0.02), (-0.1, 0.02), (0.1, 0.02), "not reproduced"),    # ED:MLM resolved worse after MT-F
    ((-0.1, 0.02), (-0.01, 0.02), (-0.1, 0.02), "inconclusive"),
])
def test_zero_shot_rule_reads_the_yardstick_before_and_after_mtf(cd_nd, cd_ed, ed_cd_after, verdict):
    pairs = [pair(ZS["cd"], ZS["nd"], *cd_nd), pair(ZS["cd"], ZS["ed"], *cd_ed),
             {**pair(ZS["cd"], ZS["ed"], -ed_cd_after[0], ed_cd_after[1]), "metric": "mtf_nats"}]
    got, reasons = R.rule_zero_shot(pairs, ZS)
    assert got == verdict and reasons[2].startswith("ED:MLM - CD:FLM") and reasons[2].endswith("after MT-F")


def test_toy_tasks_hold_out_a_prompt_the_mixture_never_trains_on(tmp_path):
    from train.commands.reproduce.measures import write_toy_tasks
    from train.eval.tasks import read_task_file

    mixture, heldout = write_toy_tasks(tmp_path)
    train_tasks = {r["task"] for r in read_task_file(mixture)}
    held = read_task_file(heldout)
    assert train_tasks == {"parity/is_even", "parity/odd_or_even", "order/larger"}
    assert {r["task"] for r in held} == {"order_heldout/smaller"} and len(held) == 200
    assert all(int(r["answer_choices"][r["label"]]) == min(map(int, r["answer_choices"])) for r in held)
    assert write_toy_tasks(tmp_path / "again")[1].read_text() == heldout.read_text()  # fixed seed


@pytest.mark.slow
def test_zero_shot_reproduction_finetunes_every_pretrained_run(tmp_path, capsys):
    res, runs = tmp_path / "results", tmp_path / "runs"
    assert R.main(["wang-zero-shot", "--seeds", "1", "--tokens", "2000", "--out", str(runs), "--results", str(res)]) == 0
    assert "after MT-F" in capsys.readouterr().out
    for label in ("cd-flm", "nd-plm", "ed-mlm"):
        assert (runs / f"{label}-mtf" / "seed-0" / "FINISHED").exists()
    page = (res / "wang-zero-shot.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith(("| CD:FLM | 0 |", "| ND:PLM | 0 |", "| ED:MLM | 0 |"))]
    assert len(rows) >= 3 and all(0.0 <= float(row.split("|")[5]) <= 1.0 for row in rows[-3:])


def test_low_rank_reading_and_picture_compare_init_with_trained(tmp_path):
    from train.commands.reproduce.measures import plot_ranks, reading_low_rank

    names = R.CLAIMS["su-low-rank"].names
    run = lambda trained, init: {R.RANK: trained, R.RANK_INIT: init}  # noqa: E731
    doc = {"cells": [{"name": names["cd"], "runs": [run(20.0, 21.0), run(22.0, 21.0)]},
                     {"name": names["nd"], "runs": [run(3.0, 2.0), run(5.0, 2.0)]},
                     {"name": names["mixed"], "runs": [run(19.0, 21.0)]}]}
    text = reading_low_rank(doc, names)
    assert "at init ND's prefix block has effective rank 2.00 against CD's 21.00" in text
    assert "after training 4.00 against 21.00" in text
    assert plot_ranks(doc, tmp_path / "r.png").stat().st_size > 1000


@pytest.mark.slow
def test_submit_runs_nca_on_the_local_cluster_then_judges_the_finished_runs(slurm_cluster, tmp_path, capsys):
    """`reproduce wang-nca --submit` on the real local Slurm cluster (tests/test_slurm.py's fixture):
    three CPU jobs, NC-A after its CD:FLM job; then the same command without --submit trains
    nothing and writes the page from the jobs' runs."""
    import re

    from test_slurm import final_state, wait_for

    out, res = tmp_path / "runs", tmp_path / "results"
    common = ["wang-nca", "--seeds", "1", "--tokens", "2000", "--out", str(out), "--results", str(res)]
    assert R.main(common + ["--submit", "--gpus-per-node", "0", "--time", "10"]) == 0
    text = capsys.readouterr().out
    jobs = dict(re.findall(r"^(\S+) seed 0: job (\d+)", text, re.M))
    assert set(jobs) == {"cd-flm", "nd-mlm", "nd-mlm-nca"} and "afterok" in text
    states = wait_for(lambda: (lambda s: s if all(s) else None)([final_state(j) for j in jobs.values()]), 300,
                      "the reproduction's jobs", out / "nd-mlm-nca" / "seed-0" / "slurm")
    assert states == ["COMPLETED"] * 3, states
    assert R.main(common) == 0
    assert "speed-up per seed" in capsys.readouterr().out and (res / "wang-nca.md").exists()
