"""The shape search behind `compare --match` (train/commands/compare/matching.py): a shape within
5% on non-embedding parameters and on training FLOPs per token, its counts recomputed here
without the search (parameters from the built model, FLOPs from model_zoo's formula), the choice
nearest the reference's proportions against a brute-force enumeration, and the refusal."""
from __future__ import annotations

import math

import pytest

import model_zoo
from train import registry
from train.commands.compare.matching import MatchError, Shape, quantity, search_shape
from train.objectives.config import ObjectiveConfig

MLM = ObjectiveConfig(name="mlm", seq_length=128, inputs_length=104, targets_length=24)
FLM = ObjectiveConfig(name="flm", seq_length=128)
VOCAB = 512


def _measure(kind: str, arch: str, objective, size: str = "debug"):
    spec = registry.get(arch)

    def measure(shape: Shape):
        try:
            mc = model_zoo.make_config(arch, size, vocab_size=VOCAB, **shape.overrides())
        except ValueError:
            return None
        return quantity(kind, spec, mc, objective)
    return measure


def _non_embedding_of_built_model(arch: str, shape: Shape, size: str = "debug") -> int:
    """Unique parameters of the model built on the meta device, less its token embedding (the LM
    head is tied in every named size)."""
    model = model_zoo.build(arch, size, device="meta", vocab_size=VOCAB, **shape.overrides())
    assert model.config.tie_embeddings
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


@pytest.mark.parametrize("size,layers", [("debug", 2), ("debug", 3), ("tiny", 4)])
def test_params_match_within_5_percent_counted_on_the_built_model(size, layers):
    ref_cfg = model_zoo.make_config("cd", size, vocab_size=VOCAB, n_layers=layers)
    target = quantity("params", registry.get("cd"), ref_cfg, FLM)
    assert target == _non_embedding_of_built_model("cd", Shape.of(ref_cfg), size)
    m = search_shape("params", _measure("params", "ed", MLM, size), Shape.of(ref_cfg), target, max_layers=4 * layers)
    assert m.searched and abs(m.gap) <= 0.05
    assert m.shape.head_dim == ref_cfg.head_dim and m.shape.d_model % ref_cfg.head_dim == 0
    assert m.shape.d_ff % ref_cfg.head_dim == 0
    assert _non_embedding_of_built_model("ed", m.shape, size) == m.value  # the printed count is the model's
    assert m.shape.n_layers < layers  # an encoder-decoder matched on parameters is shallower per stack


def test_flops_match_within_5_percent_recomputed_from_the_formula():
    ref_cfg = model_zoo.make_config("cd", "debug", vocab_size=VOCAB, n_layers=3)
    target = quantity("flops", registry.get("cd"), ref_cfg, FLM)
    assert target == model_zoo.train_flops(ref_cfg, FLM.seq_length) / FLM.seq_length
    m = search_shape("flops", _measure("flops", "ed", MLM), Shape.of(ref_cfg), target, max_layers=12)
    mc = model_zoo.make_config("ed", "debug", vocab_size=VOCAB, **m.shape.overrides())
    per_token = model_zoo.train_flops(mc, MLM.inputs_length, target_len=MLM.targets_length) / (
        MLM.inputs_length + MLM.targets_length)
    assert per_token == pytest.approx(m.value, rel=1e-12) and abs(per_token / target - 1) <= 0.05


def test_the_choice_is_nearest_the_reference_proportions():
    """Brute force over every width, depth and d_ff multiple of head_dim (debug size): no shape
    within 5% is nearer the reference's width and d_ff / d_model ratio than the chosen one."""
    ref_cfg = model_zoo.make_config("cd", "debug", vocab_size=VOCAB)
    ref = Shape.of(ref_cfg)
    target = quantity("params", registry.get("cd"), ref_cfg, FLM)
    measure = _measure("params", "ed", MLM)
    m = search_shape("params", measure, ref, target, max_layers=8)

    def score(s):
        return abs(math.log(s.d_model / ref.d_model)) + abs(math.log(s.d_ff / s.d_model / (ref.d_ff / ref.d_model)))

    u = ref.head_dim
    best = min(score(s) for d in range(u, 2 * ref.d_model + 1, u) for n in range(1, 9)
               for ff in range(u, 6 * ref.d_ff + 1, u)
               for s in [Shape(d, max(1, round(d * ref.n_heads / ref.d_model)), u, ff, n)]
               if abs(measure(s) / target - 1) <= 0.05)
    assert score(m.shape) == pytest.approx(best)


def test_no_shape_within_5_percent_is_refused_in_one_line():
    ref = Shape(64, 4, 16, 128, 2)

    def coarse(shape: Shape):  # doubles with every layer, whatever the width or d_ff: never within 5%
        return 1000.0 * 2 ** shape.n_layers

    with pytest.raises(MatchError) as e:
        search_shape("params", coarse, ref, 3000.0, max_layers=6, what="cell ed-mlm")
    text = str(e.value)
    assert "\n" not in text and "cell ed-mlm" in text and "within 5%" in text
    assert "nearest" in text and "+33.3% off" in text and "leave out --match" in text
    with pytest.raises(MatchError, match="not one of"):
        search_shape("depth", coarse, ref, 3000.0, max_layers=6)
