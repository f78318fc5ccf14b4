"""Generation (issue 20): the ED decoder computes the encoder output's cross-attention keys and
values once per generation and reuses them; cached, uncached and transformers' T5 / Llama greedy
outputs on the same weights are equal."""
import pytest
import torch

import model_zoo
from model_zoo.export import to_llama, to_t5

GREEDY = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # noqa: E402  (conftest's one-thread fixture)


@pytest.mark.parametrize("opts", [{}, dict(scale_attn=False, scale_tied_logits=False)])
def test_ed_greedy_cached_uncached_and_hf_t5_agree(opts):
    torch.manual_seed(0)
    ours = model_zoo.build("ed", "debug", **opts).eval()
    ref = to_t5(ours)
    x = torch.randint(3, 500, (3, 17))
    mask = torch.ones_like(x)
    mask[2, 11:] = 0  # a padded row: cross-attention must ignore its padding, cached or not
    with torch.no_grad():
        cached = ours.generate(input_ids=x, attention_mask=mask, use_cache=True, **GREEDY)
        uncached = ours.generate(input_ids=x, attention_mask=mask, use_cache=False, **GREEDY)
        hf = ref.generate(input_ids=x, attention_mask=mask, **GREEDY)
    assert cached.shape == (3, 13)
    assert cached.tolist() == uncached.tolist() == hf.tolist()


def test_ed_cross_attention_keys_and_values_are_computed_once_per_generation():
    torch.manual_seed(0)
    model = model_zoo.build("ed", "debug").eval()
    calls = []
    for i, layer in enumerate(model.decoder.layers):
        layer.cross_attn.k_proj.register_forward_hook(lambda m, a, out, i=i: calls.append(i))
    x = torch.randint(3, 500, (2, 9))
    with torch.no_grad():
        model.generate(input_ids=x, use_cache=True, **GREEDY)
        assert sorted(calls) == list(range(len(model.decoder.layers)))  # once per layer, not per step
        calls.clear()
        model.generate(input_ids=x, use_cache=False, **GREEDY)
        assert len(calls) == len(model.decoder.layers) * GREEDY["max_new_tokens"]  # without a cache: every step


def test_cd_greedy_equals_hf_llama():
    torch.manual_seed(0)
    ours = model_zoo.build("cd", "debug", position="rope", mlp="swiglu").eval()
    ref = to_llama(ours)
    x = torch.randint(3, 500, (2, 10))
    with torch.no_grad():
        a = ours.generate(input_ids=x, **GREEDY)
        b = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), **GREEDY)
    assert a.tolist() == b.tolist()


def test_logits_to_keep_gives_the_last_positions_only():
    torch.manual_seed(0)
    model = model_zoo.build("cd", "debug").eval()
    x = torch.randint(3, 500, (2, 8))
    with torch.no_grad():
        full = model(input_ids=x).logits
        torch.testing.assert_close(model(input_ids=x, logits_to_keep=1).logits, full[:, -1:], atol=1e-6, rtol=1e-5)
        assert torch.equal(model(input_ids=x, logits_to_keep=0).logits, full)  # 0: all, as transformers means it
        assert model(input_ids=x, labels=x, logits_to_keep=1).logits.shape == full.shape  # a loss needs them all


@pytest.mark.slow  # ~10 s: four models timed against transformers' at the debug size
def test_bench_generate_smoke(tmp_path, capsys):
    import json

    from bench.generate import main

    assert main(["--smoke", "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["ED generate", "ED train step", "CD generate", "CD train step"]
    assert all(r["ratio"] > 0 and r["hf"] in ("T5ForConditionalGeneration", "LlamaForCausalLM") for r in rows)
    assert "ratio" in capsys.readouterr().out
    assert main(["--repeats", "0"]) == 2
