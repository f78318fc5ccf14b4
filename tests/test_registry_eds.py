"""Adding an architecture is one registry entry (issue 28, docs/design.md "Adding an
architecture"): `eds`, ED whose decoder runs the encoder's weights, is one line in
train/registry/__init__.py, and then builds, trains, resumes, exports, compares and plans like
any entry. model_zoo builds it from its classes and fields, never from its name."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import model_zoo
from model_zoo import DecoderConfig, DecoderLM, EncoderDecoderConfig, EncoderDecoderLM
from train import registry
from train.config import load_config


def _model_section(*overrides):
    return load_config(None, ["model.arch=eds", "objective.name=plm", *overrides]).model


def _unique_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ------------------------------------------------------------------------------- the entry
def test_eds_is_ed_with_shared_weights_built_from_its_classes():
    eds, ed = registry.get("eds"), registry.get("ed")
    assert (eds.model_class, eds.config_class) == (EncoderDecoderLM, EncoderDecoderConfig)
    config = eds.make_config(_model_section(), vocab_size=512)
    assert type(config) is EncoderDecoderConfig and config.share_encoder_decoder
    model = eds.build(_model_section(), vocab_size=512)
    enc, dec = model.encoder.layers[0], model.decoder.layers[0]
    assert dec.self_attn is enc.self_attn and dec.mlp is enc.mlp  # one set of weights, run by both stacks
    assert eds.num_params(config) == _unique_params(model)
    plain = ed.make_config(load_config(None, ["model.arch=ed", "objective.name=plm"]).model, vocab_size=512)
    assert not plain.share_encoder_decoder and ed.num_params(plain) > eds.num_params(config)
    # the meta device builds the same structure
    assert _unique_params(eds.build(_model_section(), vocab_size=512, device="meta")) == _unique_params(model)


def test_an_override_that_contradicts_the_entry_fails_with_one_line():
    with pytest.raises(ValueError, match=r"share_encoder_decoder=False contradicts .*share_encoder_decoder=True") as e:
        registry.get("eds").make_config(_model_section("model.overrides.share_encoder_decoder=false"))
    assert "\n" not in str(e.value)
    # the same override on ED is what it always was (no key changes meaning)
    ed = load_config(None, ["model.arch=ed", "objective.name=plm", "model.overrides.share_encoder_decoder=true"]).model
    assert registry.get("ed").make_config(ed).share_encoder_decoder


def test_what_eds_takes_is_stated_once():
    eds, ed = registry.get("eds"), registry.get("ed")
    assert eds.objectives == ed.objectives and "flm" not in eds.objectives
    with pytest.raises(ValueError, match=r"objective 'flm' does not fit arch 'eds' .*flm has no encoder input"):
        eds.check_objective("flm")
    assert eds.unfit_reason("flm") == "objective flm has no encoder input for EDS"
    # weights: eds and ed have different parameters; CD -> ND adaptation stays
    assert not eds.accepts_weights_of(ed) and not ed.accepts_weights_of(eds) and eds.accepts_weights_of(eds)
    assert registry.get("nd").accepts_weights_of(registry.get("cd"))
    assert eds.pipeline_refusal(eds.make_config(_model_section()))  # shared weights cannot be split


def test_a_pipelined_eds_is_refused_in_one_line():
    from train.engine.pipeline import PipelineConfigError, check_pipeline

    config = registry.get("eds").make_config(_model_section())
    with pytest.raises(PipelineConfigError, match=r"^share_encoder_decoder=true cannot be pipelined .*pipeline_stages=1"):
        check_pipeline(config, 2, 1)
    check_pipeline(registry.get("ed").make_config(load_config(None, ["model.arch=ed"]).model), 2, 1)  # ED splits


def test_a_config_alone_finds_its_entry_by_class_and_fields():
    """Code handed a model_zoo config alone (the pipeline plan, the planner's shapes) finds its entry
    by class and fields: an EDS config is eds, though its own label says ed."""
    from train.commands.plan.shapes import pipeline_layout
    from train.engine.pipeline.specs import arch_spec

    for name, spec in registry.ARCHITECTURES.items():
        config = spec.make_config(load_config(None, [f"model.arch={name}", "objective.name=plm"]).model)
        assert registry.entry_of(config) is spec and arch_spec(config) is spec
        assert pipeline_layout(config) == spec.pipeline_layers_layout(config)
    assert registry.get("eds").make_config(_model_section()).arch == "ed"  # the label, which nothing reads back
    with pytest.raises(ValueError, match="matches no registry entry"):
        registry.entry_of(object())


# --------------------------------------------------------------------- model_zoo, by class
def test_model_zoo_follows_the_config_class_not_a_name():
    with pytest.raises(ValueError, match=r"^unknown architecture 'eds'; choose one of cd, nd, ed$"):
        model_zoo.build("eds", "debug")  # the notebook table has no eds: an entry needs no model_zoo name
    shared = model_zoo.sized_config(EncoderDecoderConfig, "debug", {"share_encoder_decoder": True})
    model = model_zoo.instantiate(model_zoo.model_class(shared), shared)
    assert type(model) is EncoderDecoderLM and model_zoo.num_params(shared) == _unique_params(model)
    assert model_zoo.model_class(DecoderConfig()) is DecoderLM
    with pytest.raises(ValueError, match="is not an archscale config"):
        model_zoo.model_class(object())
    # ND's FLOPs follow prefix_attention: the bidirectional prefix attends more pairs than CD's causal one
    nd, cd = model_zoo.make_config("nd", "debug"), model_zoo.make_config("cd", "debug")
    assert model_zoo.train_flops(nd, 16, prefix_len=8) > model_zoo.train_flops(cd, 16, prefix_len=8)
    assert model_zoo.option_names(EncoderDecoderConfig) == model_zoo.option_names("ed")


# ---------------------------------------------------------- train, resume, export, compare, plan
@pytest.fixture(scope="module")
def eds_runs(tmp_path_factory):
    """EDS:PLM for 3 steps straight, and 2 steps then resumed to 3 (in this process)."""
    from rehearse import inprocess
    from test_trainer import _write_corpus, base_overrides, run_inproc

    work = tmp_path_factory.mktemp("eds")
    _write_corpus(work / "corpus")
    base = base_overrides(work) + ["model.arch=eds", "objective.name=plm", "checkpoint.every_n_steps=2"]
    runs = {"straight": work / "straight", "resumed": work / "resumed"}
    with inprocess():
        run_inproc(base + [f"run_dir={runs['straight']}", "schedule.max_steps=3"])
        run_inproc(base + [f"run_dir={runs['resumed']}", "schedule.max_steps=2"])
        run_inproc(base + [f"run_dir={runs['resumed']}", "schedule.max_steps=3"])
    return work, base, runs


@pytest.mark.slow  # three 2-3 step CPU runs of the debug model: ~20 s
def test_eds_trains_checkpoints_and_resumes_exactly(eds_runs):
    from test_trainer import losses, state
    from train.trainer.weights import load_model

    _, _, runs = eds_runs
    assert state(runs["resumed"])["step"] == 3 and state(runs["resumed"], 2)["step"] == 2
    assert losses(runs["resumed"]) == losses(runs["straight"])
    a, b = (load_model(runs[r] / "checkpoints" / "step-00000003")[0] for r in ("straight", "resumed"))
    assert a.config.share_encoder_decoder and a.decoder.layers[0].self_attn is a.encoder.layers[0].self_attn
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_eds_exports_and_loads_back(eds_runs):
    from train.commands.export import main as export_main
    from train.trainer.weights import checkpoint_dir, load_model

    work, _, runs = eds_runs
    out = work / "hf"
    assert export_main([str(runs["resumed"]), "--out", str(out)]) == 0
    record = json.loads((out / "archscale_export.json").read_text())
    assert record["form"] == "remote-code" and "share_encoder_decoder=True" in record["why_not_native"]
    assert record["arch"] == "eds"  # the run's entry (the model's own label says ed), for whoever scores it
    trained = load_model(checkpoint_dir(runs["resumed"]))[0].eval()
    model = model_zoo.load(out).eval()
    assert model.config.share_encoder_decoder and model_zoo.num_params(model.config) == _unique_params(model)
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits,
                                   trained.float()(input_ids=ids, decoder_input_ids=ids[:, :5]).logits)


@pytest.mark.slow
def test_eds_is_compared_beside_cd(eds_runs, capsys):
    from rehearse import inprocess
    from train.commands.compare import main as compare_main

    work, base, _ = eds_runs
    data = [o for o in base if o.startswith(("data.", "logging.", "checkpoint.keep"))]
    out = work / "compare"
    with inprocess():
        rc = compare_main(["--out", str(out), "--cells", "eds:plm", "cd:flm", "--budget", "steps=2", "--seq-len", "64",
                           "--micro-batch", "2", "--eval-every", "2", "--set", "eval.window_tokens=32",
                           "eval.windows=4", *data])
    assert rc == 0
    assert "EDS:PLM" in capsys.readouterr().out
    doc = json.loads((out / "comparison.json").read_text())
    cells = {c["label"]: c for c in doc["cells"]}
    assert set(cells) == {"eds-plm", "cd-flm"} and cells["eds-plm"]["arch"] == "eds"
    assert [r["step"] for c in cells.values() for r in c["runs"]] == [2, 2]


def test_eds_is_planned(capsys):
    from train.commands import plan

    args = ["model.arch=eds", "objective.name=plm", "model.size=xl", "schedule.max_steps=1"]
    eds, ed = plan.plan(None, args), plan.plan(None, ["model.arch=ed", *args[1:]])
    assert eds["model"]["parameters"] < ed["model"]["parameters"]
    config = registry.get("eds").make_config(load_config(None, args).model, vocab_size=eds["model"]["vocab_size"])
    assert eds["model"]["parameters"] == registry.get("eds").num_params(config)
    assert plan.main(args) in (0, 1) and "eds" in capsys.readouterr().out.lower()
    # two pipeline stages: refused as the trainer refuses them, in one line
    assert plan.main(args + ["parallel.pipeline_stages=2", "parallel.zero_stage=1", "--gpus", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be pipelined" in err and len(err.splitlines()) == 1
