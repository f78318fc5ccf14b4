"""compare (issue 16): cells with their own settings, YAML grids, budgets, size matching, seeds,
and the report page; sweep's seeds. The end-to-end run trains the same cell twice under two
labels: identical runs must differ by exactly 0 ± 0 on every metric."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from train.commands.compare import cells as C
from train.commands.compare import sizing
from train.config import load_config


def test_cells_parse_with_their_own_settings():
    c = C.parse_cell("ed:mlm:model.overrides.n_layers=1,eval.prefix_fractions=[0.25,0.5]")
    assert (c.arch, c.objective) == ("ed", "mlm")
    assert c.overrides == ("model.overrides.n_layers=1", "eval.prefix_fractions=[0.25,0.5]")
    assert c.label == "ed-mlm-n_layers1-prefix_fractions0.250.5" and c.name.startswith("ED:MLM (")
    assert C.parse_cell("CD:FLM").label == "cd-flm" and C.parse_cell("cd:flm").name == "CD:FLM"
    for bad, match in [("cd", "ARCH:OBJECTIVE"), ("xx:flm", "ARCH:OBJECTIVE with ARCH"),
                       ("ed:flm", "does not fit arch 'ed'"), ("cd:flm:model.size", "is not key=value"),
                       ("cd:prompted", "OBJECTIVE in")]:
        with pytest.raises(C.CellError, match=match):
            C.parse_cell(bad)


def test_grid_file(tmp_path):
    g = tmp_path / "g.yaml"
    g.write_text("cells:\n  - cd:flm\n  - {cell: ed:mlm, label: ed-half, set: {model.overrides.n_layers: 1}}\n"
                 "set: [optim.lr=1e-3]\nmatch: params\n")
    grid = C.load_grid(g)
    assert [c.label for c in grid["cells"]] == ["cd-flm", "ed-half"]
    assert grid["cells"][1].overrides == ("model.overrides.n_layers=1",) and grid["set"] == ["optim.lr=1e-3"]
    assert grid["match"] == "params"
    for text, match in [("cells: []\n", "non-empty `cells:`"), ("cells: [cd:flm]\nextra: 1\n", "unknown key"),
                        ("cells: [{cell: cd:flm, sett: {}}]\n", "unknown key"), ("cells: [\n", "not valid YAML"),
                        ("cells: [{cell: cd:flm, set: 3}]\n", "`set` must be")]:
        g.write_text(text)
        with pytest.raises(C.CellError, match=match):
            C.load_grid(g)
    with pytest.raises(C.CellError, match="same label"):
        C.unique_labels([C.parse_cell("cd:flm"), C.parse_cell("cd:flm")])


def test_budgets():
    assert sizing.Budget.parse("flops=2e12") == sizing.Budget("flops", 2e12)
    for bad, match in [("flops", "KIND=VALUE"), ("time=3", "KIND=VALUE"), ("steps=x", "not a number"),
                       ("steps=-1", "positive")]:
        with pytest.raises(sizing.BudgetError, match=match):
            sizing.Budget.parse(bad)
    cfg = load_config(None, ["model.size=debug", "objective.seq_length=64", "parallel.micro_batch_size=4"])
    assert sizing.schedule_overrides(sizing.Budget("steps", 7), cfg)[0] == "schedule.max_steps=7"
    step = sizing.cell_facts(cfg)["step_flops"]
    assert sizing.schedule_overrides(sizing.Budget("flops", 10.4 * step), cfg)[0] == "schedule.max_steps=10"
    # target tokens: FLM targets nearly every token, so steps ~ budget / tokens per step
    over = sizing.schedule_overrides(sizing.Budget("target-tokens", 64 * 4 * 10), cfg)[0]
    assert over in ("schedule.max_steps=10", "schedule.max_steps=11")


TINY = ["--seq-len", "64", "--micro-batch", "4", "--eval-every", "0", "--eval-batches", "1", "--tokens", "1000"]


def test_arguments_are_one_frozen_object(tmp_path):
    """parse_args reads the command line and the grid once into a CompareArgs; nothing changes it."""
    import dataclasses

    from train.commands.compare import CompareArgs, parse_args, plan_cells

    g = tmp_path / "g.yaml"
    g.write_text("cells: [cd:flm, ed:mlm]\nset: [optim.lr=1e-3]\nmatch: params\nmatch_to: cd:flm\n")
    args = parse_args(["--grid", str(g), "--budget", "steps=3", *TINY])
    assert isinstance(args, CompareArgs) and [c.label for c in args.cells] == ["cd-flm", "ed-mlm"]
    assert (args.match, args.match_to, args.grid_set, args.budget) == ("params", "cd:flm", ("optim.lr=1e-3",),
                                                                       sizing.Budget("steps", 3))
    before = dataclasses.astuple(args)
    plan = plan_cells(args)
    assert dataclasses.astuple(args) == before
    for obj, name in [(args, "match"), (args.cells[0], "label"), (plan, "matched")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)
    with pytest.raises(TypeError):
        plan.matched["cd-flm"] = ()
    with pytest.raises(C.CellError, match="not both"):
        parse_args(["--grid", str(g), "--cells", "cd:flm"])


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_match_sizes_the_other_family_by_width_and_depth(kind):
    """The encoder-decoder gets a searched shape within 5% of the decoder's non-embedding
    parameters / FLOPs per token, recomputed here from the config the run would load; the decoder
    keeps its own shape."""
    from train.commands.compare import cell_overrides, parse_args, plan_cells

    args = parse_args(["--cells", "cd:flm:model.overrides.n_layers=4", "ed:mlm", "--match", kind,
                       "--match-to", "cd:flm", *TINY])
    plan = plan_cells(args)
    assert "cd-flm-n_layers4" not in plan.matched  # the named cell keeps its size
    keys = {o.split("=")[0] for o in plan.matched["ed-mlm"]}
    assert keys == {f"model.overrides.{k}" for k in ("d_model", "n_heads", "head_dim", "d_ff", "n_layers")}
    cfg = {c.label: load_config(None, cell_overrides(c, args, plan=plan)) for c in args.cells}
    key = "non_embedding_params" if kind == "params" else "flops_per_token"
    ref, ed = (sizing.cell_facts(cfg[label])[key] for label in ("cd-flm-n_layers4", "ed-mlm"))
    assert abs(ed / ref - 1) <= 0.05
    assert plan.matches["ed-mlm"].gap == pytest.approx(ed / ref - 1) and plan.matches["cd-flm-n_layers4"].gap == 0
    assert cfg["ed-mlm"].model.overrides["head_dim"] == 16  # the debug size's head_dim is kept


def test_a_cells_own_model_override_wins_over_the_search():
    from train.commands.compare import parse_args, plan_cells

    args = parse_args(["--cells", "cd:flm", "ed:mlm:model.overrides.n_heads=2", "--match", "params", *TINY])
    plan = plan_cells(args)
    m = plan.matches["ed-mlm-n_heads2"]
    assert m.shape.n_heads == 2 and abs(m.gap) <= 0.05  # the count checked is the run's, with its own heads
    assert not any(o.startswith("model.overrides.n_heads=") for o in plan.matched["ed-mlm-n_heads2"])
    free = plan_cells(parse_args(["--cells", "cd:flm", "ed:mlm", "--match", "params", *TINY])).matches["ed-mlm"]
    assert m.shape.d_ff > free.shape.d_ff  # fewer heads: the search gave the MLP what attention gave up


def test_a_grid_cell_chooses_its_own_match(tmp_path):
    """su-ed-params' shape: one grid, an ED matched on FLOPs per token, one on parameters, one
    keeping its shape, each against the same decoder."""
    from train.commands.compare import parse_args, plan_cells

    g = tmp_path / "g.yaml"
    g.write_text("match_to: cd:plm\ncells:\n  - cd:plm\n  - {cell: ed:plm, label: ed-flops, match: flops}\n"
                 "  - {cell: ed:plm, label: ed-params, match: params}\n  - {cell: ed:plm, label: ed-own, match: none}\n")
    args = parse_args(["--grid", str(g), *TINY])
    plan = plan_cells(args)
    assert set(plan.matches) == {"ed-flops", "ed-params"} and set(plan.matched) == {"ed-flops", "ed-params"}
    assert [plan.matches[k].kind for k in ("ed-flops", "ed-params")] == ["flops", "params"]
    assert all(abs(m.gap) <= 0.05 and m.searched for m in plan.matches.values())
    assert plan.matches["ed-params"].shape != plan.matches["ed-flops"].shape
    g.write_text("cells:\n  - {cell: ed:plm, match: depth}\n")
    with pytest.raises(C.CellError, match="match 'depth' must be one of params, flops, none"):
        parse_args(["--grid", str(g)])


def test_match_refuses_in_one_line_before_training(tmp_path, capsys):
    """A cell whose own overrides leave the search nothing to move: refused, with the fix."""
    from train.commands.compare import main

    pinned = "model.overrides.n_layers=6,model.overrides.d_model=64,model.overrides.d_ff=128,model.overrides.n_heads=4"
    rc = main(["--out", str(tmp_path / "out"), "--cells", "cd:flm", f"ed:mlm:{pinned}", "--match", "params", *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("error: --match params: no shape of cell ed-mlm")
    assert "within 5%" in err and "leave out --match" in err and not (tmp_path / "out").exists()


def test_sweep_seeds(tmp_path):
    from slurm.submit import Sweep

    (tmp_path / "base.yaml").write_text("{}\n")
    (tmp_path / "s.yaml").write_text("config: base.yaml\ngrid: {model.arch: [cd, nd]}\nseeds: 2\n")
    cells = Sweep.from_yaml(tmp_path / "s.yaml").cells()
    assert [Path(c["run_dir"]).relative_to(tmp_path / "runs" / "s").as_posix() for c in cells] == \
        ["cd/seed-0", "cd/seed-1", "nd/seed-0", "nd/seed-1"]
    assert cells[1]["overrides"][-2:] == ["seed=1", "data.seed=1235"]
    (tmp_path / "s.yaml").write_text("config: base.yaml\ngrid: {model.arch: [cd]}\nseeds: 0\n")
    from slurm.submit import SlurmError

    with pytest.raises(SlurmError, match="seeds=0"):
        Sweep.from_yaml(tmp_path / "s.yaml").cells()


@pytest.mark.slow
def test_compare_seeds_identical_cells_and_report(tmp_path, capsys):
    """Two labels of the same cell, two seeds each: every pairwise difference is exactly 0 ± 0;
    the table shows mean ± std, every budget column and the sizes; report groups the same runs
    into the same cells and prints the same table."""
    from rehearse import inprocess
    from test_trainer import _write_corpus
    from train.commands.compare import main as compare_main
    from train.commands.report import report

    _write_corpus(tmp_path / "corpus")
    data = ["data.source=files", f"data.train_files={json.dumps([str(tmp_path / 'corpus' / '*.txt')])}",
            "data.tokenizer=builtin-bytes", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=0.2",
            "logging.progress_bar=false", "checkpoint.keep_last=0", "eval.window_tokens=32", "eval.windows=8"]
    grid = tmp_path / "grid.yaml"
    grid.write_text("cells:\n  - {cell: cd:flm, label: a}\n  - {cell: cd:flm, label: b}\n")
    out = tmp_path / "out"
    with inprocess():  # the process group and the environment (MASTER_PORT, ...) are put back after
        rc = compare_main(["--out", str(out), "--grid", str(grid), "--seeds", "2", "--budget", "steps=3",
                           "--seq-len", "64", "--micro-batch", "2", "--eval-every", "2", "--set", *data])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "steps = 3" in printed and "±" in printed and "planned FLOPs/step" in printed
    doc = json.loads((out / "comparison.json").read_text())
    assert [len(c["runs"]) for c in doc["cells"]] == [2, 2]
    seeds = doc["cells"][0]["runs"]
    assert seeds[0]["yardstick_nats"] != seeds[1]["yardstick_nats"]  # seeds differ (init and data order)
    assert len(seeds[0]["curve"]) == 2 and seeds[0]["step"] == 3
    # the training is bitwise identical; the scoring forward's float32 reductions may differ in the last bits
    assert doc["pairs"] and all(abs(p["mean"]) < 1e-6 and p["half_width"] < 1e-6 and not p["resolved"]
                                for p in doc["pairs"])
    assert [r["losses"] for r in doc["cells"][0]["runs"]] == [r["losses"] for r in doc["cells"][1]["runs"]]
    assert (out / "curves.png").stat().st_size > 0
    res = report([out], tmp_path / "report")
    assert [c["label"] for c in res["cells"]] == ["a", "b"] and all(len(c["runs"]) == 2 for c in res["cells"])
    assert all(p["half_width"] < 1e-6 for p in res["pairs"])
    page = Path(res["page"]).read_text()
    assert "CD:FLM (a)" in page and "yardstick.png" in page and str(out / "a" / "seed-1") in page
    nats = {round(r["yardstick_nats"], 9) for c in res["cells"] for r in c["runs"]}
    assert nats == {round(r["yardstick_nats"], 9) for c in doc["cells"] for r in c["runs"]}  # the same numbers


@pytest.mark.slow
def test_compare_match_params_prints_both_counts_and_the_gap(tmp_path, capsys):
    """A tiny compare run with --match params: the header names the real data source, the match
    lines give each cell's non-embedding parameters and gap, the table both counts and the
    embedding share, and comparison.json the same numbers."""
    from rehearse import inprocess
    from test_trainer import _write_corpus
    from train.commands.compare import main as compare_main

    _write_corpus(tmp_path / "corpus")
    data = ["data.source=files", f"data.train_files={json.dumps([str(tmp_path / 'corpus' / '*.txt')])}",
            "data.tokenizer=builtin-bytes", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=0.2",
            "logging.progress_bar=false", "checkpoint.keep_last=0", "eval.window_tokens=32", "eval.windows=4"]
    out = tmp_path / "out"
    with inprocess():
        rc = compare_main(["--out", str(out), "--cells", "cd:flm", "ed:mlm", "--match", "params", "--budget", "steps=2",
                           "--seq-len", "64", "--micro-batch", "2", "--eval-every", "2", "--set", *data])
    assert rc == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "comparison.json").read_text())
    cd, ed = doc["cells"]
    assert f"data: files {tmp_path / 'corpus' / '*.txt'}" in printed and "embedded corpus" not in printed
    assert "non-emb params" in printed and "emb share" in printed
    assert "--match to cd-flm: each cell within 5% of its params" in printed
    run = ed["runs"][0]
    assert abs(ed["match"]["gap"]) <= 0.05 and ed["match"]["searched"] and not cd["match"]["searched"]
    assert ed["match"]["value"] == run["non_embedding_params"] and cd["match"]["value"] == ed["match"]["target"]
    assert (f"ED:MLM: non-embedding parameters {run['non_embedding_params']:,.0f} against {cd['match']['value']:,.0f} "
            f"({ed['match']['gap']:+.1%}), searched: d_model=") in printed
    share = 1 - run["non_embedding_params"] / run["params"]
    assert f"{run['non_embedding_params'] / 1e6:.3f}M" in printed and f"{run['params'] / 1e6:.3f}M" in printed
    assert f"{100 * share:.1f}%" in printed
    assert load_config(Path(run["run_dir"]) / "config.yaml").model.overrides == ed["match"]["shape"]


def test_budget_lines_read_the_runs_as_compare_checks_them():
    """Within 2% (compare/sizing.TOLERANCE) or one step where a step is coarser: no line; further: one."""
    from train.commands.comparison import budget_lines

    def cell(name, tokens, steps):
        return {"name": name, "runs": [{"seed": 0, "tokens_seen": tokens, "step": steps}]}

    cells = [cell("near", 101_500, 157), cell("far", 103_000, 157), cell("coarse", 103_000, 10)]
    lines = budget_lines(cells, "tokens-seen", 100_000)
    assert len(lines) == 1 and lines[0].startswith("budget not met: far ran 1.03e+05 tokens-seen (103%")
