"""The registry owns the per-architecture facts that --dry-run, plan and the trainer share (issue 15):
which objectives fit an architecture (one check, one message, at every entry point) and the
analytic FLOPs of a batch row (one function, the same number in --dry-run and plan)."""
from __future__ import annotations

import json
import re

import pytest

from train import registry
from train.config import ConfigError, load_config
from train.objectives.config import OBJECTIVES

FIT = [(a, o) for a, s in registry.ARCHITECTURES.items() for o in s.objectives]


def test_every_objective_fits_a_decoder_and_ed_refuses_only_flm():
    assert {o for a, o in FIT if a == "cd"} == set(OBJECTIVES) == {o for a, o in FIT if a == "nd"}
    assert {o for a, o in FIT if a == "ed"} == set(OBJECTIVES) - {"flm"}


@pytest.mark.parametrize("arch,objective", FIT)
def test_dry_run_and_plan_report_the_registry_row_flops(arch, objective, capsys):
    from train.commands.dryrun import describe
    from train.commands.plan import plan_config

    cfg = load_config(None, [f"model.arch={arch}", "model.size=base", f"objective.name={objective}",
                             "data.tokenizer=builtin-bytes", "schedule.max_steps=10"])
    spec = registry.get(arch)
    out = describe(cfg, {}, 1)
    vocab = int(re.search(r"vocab (\d+) \(tokenizer builtin-bytes\)", out)[1])  # bytes + specials, padded
    want = spec.row_flops(spec.make_config(cfg.model, vocab), cfg.objective)
    assert want > 0
    m = re.search(r"training FLOPs per token: (\S+) \((\S+) per row of (\d+) tokens, padding computed; x (\d+) rows "
                  r"= (\S+) per step\)", out)
    assert m, out
    assert float(m[2]) == pytest.approx(want, rel=1e-3)  # printed to 4 digits
    assert int(m[3]) == spec.tokens_per_row(cfg.objective)
    p = plan_config(cfg, gpus=1, vocab=vocab, fix=False)
    assert p["time"]["flops_per_row"] == want
    assert float(m[5]) == pytest.approx(want * int(m[4]), rel=1e-3)


def test_ed_plm_row_counts_its_padding_as_computed():
    """The dry run used to count ED:PLM's two packed examples without the padding both rows carry
    (0.40 TFLOP per 626-token row at size base, against plan's 0.88): it now prints plan's figure.
    A row holds k examples of seq_length // k tokens split between encoder and decoder, so each
    row carries on average seq_length - k * n / 2 pad tokens, which the model computes."""
    import model_zoo

    cfg = load_config(None, ["model.arch=ed", "model.size=base", "objective.name=plm"])
    spec = registry.get("ed")
    config = spec.make_config(cfg.model, 8320)
    o = cfg.objective
    n = o.seq_length // o.ed_plm_examples_per_row
    unpadded = o.ed_plm_examples_per_row * model_zoo.train_flops(config, n // 2, target_len=n - n // 2)
    got = spec.row_flops(config, o)
    assert 0.39e12 < unpadded < 0.41e12  # what --dry-run used to print per row (3.18e12 per 8-row step)
    assert 0.80e12 < got < 0.82e12 and got > 1.9 * unpadded


BAD = "objective 'flm' does not fit arch 'ed'"


def test_an_objective_that_does_not_fit_is_refused_by_derive():
    from train.config import derive

    cfg = load_config(None, ["model.arch=ed"])  # the default objective is flm
    with pytest.raises(ConfigError, match=BAD):
        derive(cfg, 1, tokens_per_sequence=626)


@pytest.mark.parametrize("argv", [
    ["train", "model.arch=ed", "--dry-run"],
    ["plan", "model.arch=ed"],
    ["train", "model.arch=ed", "objective.name=flm", "run_dir=/nonexistent/never-made"],
    ["submit", "--dry-run", "--run-dir", "/nonexistent/never-made", "model.arch=ed"],
    ["compare", "--cells", "cd:flm", "ed:flm", "--out", "/nonexistent/never-made"],
])
def test_every_entry_point_refuses_the_same_config_with_the_same_line(argv, capsys, tmp_path, monkeypatch):
    import os

    from train.cli import main
    from train.engine.runtime import teardown_distributed

    monkeypatch.chdir(tmp_path)
    env = dict(os.environ)
    try:
        rc = main(argv)
    finally:
        # `train` sets up a world of one (a TCP store on MASTER_PORT, the rendezvous variables in
        # os.environ) before its config check: a later test's subprocess must not inherit that port
        teardown_distributed()
        os.environ.clear()
        os.environ.update(env)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and BAD in err[0], err
    assert not list(tmp_path.iterdir())  # nothing written


def test_plan_json_of_a_refused_config_names_the_fit(capsys):
    from train.cli import main

    assert main(["plan", "model.arch=ed", "--json"]) != 0
    out = capsys.readouterr()
    text = out.err + out.out
    assert BAD in text
    if out.out.strip().startswith("{"):
        json.loads(out.out)
