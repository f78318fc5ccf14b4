"""Model zoo: leakage, packing, equivalence with transformers' Llama and T5, kernels, HF API."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import model_zoo
from model_zoo.analysis import attention_spectra, effective_rank, main as analysis_main
from model_zoo.convert import from_llama, from_t5
from model_zoo.models import DecoderLM

MODES = ["full", "mixed_heads", "mixed_layers"]


def make(arch, seed=0, **kw):
    torch.manual_seed(seed)
    return model_zoo.build(arch, "debug", **kw).eval()


def logits_per_kernel(model, batch) -> dict:
    """{attn_impl: logits} of the same batch through the reference, SDPA and flex attention
    (no grad); the model's attn_impl is put back after."""
    was, out = model.config.attn_impl, {}
    with torch.no_grad():
        for impl in ("reference", "sdpa", "flex"):
            model.config.attn_impl = impl
            out[impl] = model(**batch).logits
    model.config.attn_impl = was
    return out


# ----------------------------------------------------------------------------------- leakage
# One row: example 1 (6 tokens, prefix 3), example 2 (7 tokens, prefix 4), 3 padding tokens.
SEG = torch.tensor([[1] * 6 + [2] * 7 + [0] * 3])
BIDIR = torch.tensor([[1, 1, 1, 0, 0, 0] + [1, 1, 1, 1, 0, 0, 0] + [0, 0, 0]], dtype=torch.bool)


def expected_visibility(seg, bidir, causal=True):
    """V[i, j]: output i may depend on input j, from the definition of each architecture."""
    s = seg[0]
    t = s.shape[0]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    same = s[:, None] == s[None, :]
    if not causal:
        return same
    b = bidir[0]
    return same & ((j <= i) | (b[:, None] & b[None, :]))


def influence(run, ids, positions):
    """changed[i, j]: perturbing input j changes output i (fp64, so 'unchanged' is exact)."""
    base = run(ids)
    t_out = base.shape[1]
    changed = torch.zeros(t_out, ids.shape[1], dtype=torch.bool)
    for j in positions:
        other = ids.clone()
        other[0, j] = (other[0, j] + 7) % 500 + 2
        changed[:, j] = (run(other) - base).abs().amax(-1)[0] > 1e-10
    return changed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["cd", "nd"])
def test_decoder_leakage(arch, mode):
    model = make(arch, bidirectional_mode=mode).double()
    ids = torch.randint(2, 500, SEG.shape)
    with torch.no_grad():
        changed = influence(lambda x: model(x, segment_ids=SEG, bidirectional=BIDIR).logits, ids, range(SEG.shape[1]))
    expect = expected_visibility(SEG, BIDIR if arch == "nd" else torch.zeros_like(BIDIR))
    assert torch.equal(changed, expect)


@pytest.mark.parametrize("position", ["rope", "learned", "none"])
def test_decoder_leakage_other_positions(position):
    model = make("nd", position=position).double()
    ids = torch.randint(2, 500, SEG.shape)
    with torch.no_grad():
        changed = influence(lambda x: model(x, segment_ids=SEG, bidirectional=BIDIR).logits, ids, range(SEG.shape[1]))
    assert torch.equal(changed, expected_visibility(SEG, BIDIR))


@pytest.mark.parametrize("mode", MODES)
def test_ed_leakage(mode):
    model = make("ed", bidirectional_mode=mode).double()
    enc_seg = torch.tensor([[1] * 5 + [2] * 6 + [0] * 2])
    dec_seg = torch.tensor([[1] * 4 + [2] * 3 + [0] * 2])
    x = torch.randint(2, 500, enc_seg.shape)
    y = torch.randint(2, 500, dec_seg.shape)

    def run(enc_ids=x, dec_ids=y):
        return model(input_ids=enc_ids, decoder_input_ids=dec_ids, segment_ids=enc_seg, decoder_segment_ids=dec_seg)

    with torch.no_grad():
        # encoder token j -> encoder outputs: its whole segment (bidirectional, any mode)
        enc_changed = influence(lambda e: run(enc_ids=e).encoder_last_hidden_state, x, range(x.shape[1]))
        assert torch.equal(enc_changed, expected_visibility(enc_seg, None, causal=False))
        # encoder token j -> decoder outputs: exactly the decoder tokens of the same segment
        cross_changed = influence(lambda e: run(enc_ids=e).logits, x, range(x.shape[1]))
        assert torch.equal(cross_changed, dec_seg[0][:, None] == enc_seg[0][None, :])
        # decoder token j -> decoder outputs: causal within the segment
        dec_changed = influence(lambda d: run(dec_ids=d).logits, y, range(y.shape[1]))
        assert torch.equal(dec_changed, expected_visibility(dec_seg, torch.zeros_like(dec_seg, dtype=torch.bool)))


def test_mixed_heads_attention_is_triangular_in_the_model():
    model = make("nd", bidirectional_mode="mixed_heads")
    attn = model.model.layers[0].self_attn
    attn.record = []
    model.config.attn_impl = "reference"
    with torch.no_grad():
        model(torch.randint(2, 500, (1, 8)), prefix_lengths=torch.tensor([5]))
    probs = attn.record[0][0]  # (H, T, T)
    prefix = probs[:, :5, :5]
    h = probs.shape[0] // 2
    lower = torch.ones(5, 5, dtype=torch.bool).tril()
    assert (prefix[:h][:, ~lower] == 0).all() and (prefix[:h][:, lower] > 0).all()
    assert (prefix[h:][:, ~lower.T] == 0).all() and (prefix[h:][:, lower.T] > 0).all()
    assert (probs[:, :5, 5:] == 0).all()  # the prefix never sees the targets


# ----------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("position", ["t5_bias", "rope", "learned"])
@pytest.mark.parametrize("arch", ["cd", "nd"])
def test_decoder_packed_equals_alone(arch, position):
    model = make(arch, position=position)
    a, b = torch.randint(2, 500, (1, 5)), torch.randint(2, 500, (1, 7))
    ids = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], 1)
    seg = torch.tensor([[1] * 5 + [2] * 7 + [0] * 2])
    bidir = torch.tensor([[1, 1, 0, 0, 0] + [1, 1, 1, 0, 0, 0, 0] + [0, 0]], dtype=torch.bool)
    with torch.no_grad():
        packed = model(ids, segment_ids=seg, bidirectional=bidir).logits
        alone_a = model(a, prefix_lengths=torch.tensor([2])).logits
        alone_b = model(b, prefix_lengths=torch.tensor([3])).logits
    torch.testing.assert_close(packed[:, :5], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 5:12], alone_b, atol=1e-5, rtol=1e-5)


def test_ed_packed_equals_alone():
    model = make("ed")
    xa, xb = torch.randint(2, 500, (1, 6)), torch.randint(2, 500, (1, 4))
    ya, yb = torch.randint(2, 500, (1, 3)), torch.randint(2, 500, (1, 5))
    x = torch.cat([xa, xb, torch.zeros(1, 2, dtype=torch.long)], 1)
    y = torch.cat([ya, yb], 1)
    with torch.no_grad():
        packed = model(input_ids=x, decoder_input_ids=y, segment_ids=torch.tensor([[1] * 6 + [2] * 4 + [0] * 2]),
                       decoder_segment_ids=torch.tensor([[1] * 3 + [2] * 5])).logits
        alone_a = model(input_ids=xa, decoder_input_ids=ya).logits
        alone_b = model(input_ids=xb, decoder_input_ids=yb).logits
    torch.testing.assert_close(packed[:, :3], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 3:], alone_b, atol=1e-5, rtol=1e-5)


def test_ed_shift_right_restarts_every_packed_example():
    model = make("ed")
    labels = torch.tensor([[5, 6, 7, 8, 9, -100]])
    seg = torch.tensor([[1, 1, 1, 2, 2, 0]])
    start = model.config.decoder_start_token_id
    assert model.shift_right(labels, seg).tolist() == [[start, 5, 6, start, 8, start]]


# ------------------------------------------------------------------------------ equivalence
def test_cd_equals_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      max_position_embeddings=256)
    ref = LlamaForCausalLM(cfg).eval()
    ours = from_llama(ref).eval()
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        expected = ref(ids, labels=ids)
        got = ours(ids, labels=ids)
        got_dense = ours(ids, labels=ids, segment_ids=torch.ones_like(ids))  # the masked (non-flash) path
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_dense.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)


def test_ed_equals_transformers_t5_v1_1():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   decoder_start_token_id=0)
    ref = T5ForConditionalGeneration(cfg).eval()
    ours = from_t5(ref).eval()
    # long enough that relative distances reach the logarithmic buckets and beyond max_distance
    x, y = torch.randint(2, 300, (2, 150)), torch.randint(2, 300, (2, 140))
    mask = torch.ones_like(x)
    mask[1, 100:] = 0
    with torch.no_grad():
        expected = ref(input_ids=x, attention_mask=mask, labels=y)
        got = ours(input_ids=x, attention_mask=mask, labels=y)
    scale = expected.logits.abs().max()
    assert ((got.logits - expected.logits).abs().max() / scale) < 1e-6
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["cd", "nd", "ed"])
def test_flex_and_sdpa_equal_reference(arch, mode):
    model = make(arch, bidirectional_mode=mode)
    seg = torch.tensor([[1] * 9 + [2] * 10 + [0] * 2, [1] * 21])
    ids = torch.randint(2, 500, seg.shape)
    if arch == "ed":
        dseg = torch.tensor([[1] * 5 + [2] * 6, [1] * 11])
        batch = dict(input_ids=ids, segment_ids=seg, decoder_input_ids=torch.randint(2, 500, dseg.shape),
                     decoder_segment_ids=dseg)
    else:
        bidir = torch.zeros_like(seg, dtype=torch.bool)
        bidir[0, :4], bidir[0, 9:15], bidir[1, :11] = True, True, True
        batch = dict(input_ids=ids, segment_ids=seg, bidirectional=bidir)
    out = logits_per_kernel(model, batch)
    torch.testing.assert_close(out["sdpa"], out["reference"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["flex"], out["reference"], atol=1e-5, rtol=1e-5)


def test_plain_causal_uses_flash_path_and_matches_reference():
    model = make("cd", position="rope")
    ids = torch.randint(2, 500, (2, 12))
    with torch.no_grad():
        model.config.attn_impl = "sdpa"
        fast = model(ids).logits
        model.config.attn_impl = "reference"
        ref = model(ids).logits
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- HF surface
@pytest.mark.parametrize("arch", ["cd", "nd", "ed"])
def test_save_load_roundtrip(arch, tmp_path):
    model = make(arch, bidirectional_mode="mixed_layers", z_loss=1e-4)
    model.save_pretrained(tmp_path)
    loaded = model_zoo.load(tmp_path).eval()
    assert loaded.config.arch == arch and loaded.config.bidirectional_mode == "mixed_layers"
    assert loaded.config.z_loss == 1e-4
    ids = torch.randint(2, 500, (2, 9))
    kw = dict(decoder_input_ids=ids[:, :5]) if arch == "ed" else dict(prefix_lengths=torch.tensor([3, 4]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, **kw).logits, model(ids, **kw).logits, atol=0, rtol=0)


def test_cd_checkpoint_loads_as_nd_unchanged(tmp_path):
    cd = make("cd")
    cd.save_pretrained(tmp_path)
    nd = DecoderLM.from_pretrained(tmp_path, prefix_attention=True).eval()
    assert nd.config.arch == "nd"
    cd_state, nd_state = cd.state_dict(), nd.state_dict()
    assert cd_state.keys() == nd_state.keys()
    assert all(torch.equal(cd_state[k], nd_state[k]) for k in cd_state)
    ids = torch.randint(2, 500, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(nd(ids).logits, cd(ids).logits)  # no prefix: the same model
        with_prefix = nd(ids, prefix_lengths=torch.tensor([6])).logits
    assert not torch.allclose(with_prefix[:, :5], cd(ids).logits[:, :5])  # the mask is what differs


@pytest.mark.parametrize("arch", ["cd", "nd", "ed"])
def test_generate_cached_equals_uncached(arch):
    model = make(arch, seed=1)
    prompt = torch.randint(2, 500, (2, 7))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding in the second row
    args = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **args)
        uncached = model.generate(prompt, use_cache=False, **args)
    assert cached.shape[1] == (9 if arch == "ed" else 15)
    assert torch.equal(cached, uncached)


def test_nd_generate_treats_the_prompt_as_prefix():
    model = make("nd", seed=2)
    prompt = torch.randint(2, 500, (1, 6))
    with torch.no_grad():
        default = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)
        explicit = model.generate(prompt, prefix_lengths=torch.tensor([6]), max_new_tokens=4, do_sample=False,
                                  eos_token_id=None)
        step = model(prompt, prefix_lengths=torch.tensor([6])).logits[:, -1].argmax(-1)
    assert torch.equal(default, explicit)
    assert default[0, 6] == step[0]


# ------------------------------------------------------------------------ sizes and counts
@pytest.mark.parametrize("size", list(model_zoo.SIZES))
@pytest.mark.parametrize("arch", ["cd", "nd", "ed"])
def test_analytic_params_equal_instantiated(arch, size):
    model = model_zoo.build(arch, size, device="meta")
    assert sum(p.numel() for p in model.parameters()) == model_zoo.num_params(model.config)


@pytest.mark.parametrize("overrides", [dict(tie_embeddings=False), dict(norm="layernorm", mlp="gelu"),
                                       dict(position="learned", mlp="swiglu"), dict(position="rope")])
def test_analytic_params_other_options(overrides):
    for arch in ("cd", "ed"):
        model = model_zoo.build(arch, "debug", **overrides)
        assert sum(p.numel() for p in model.parameters()) == model_zoo.num_params(model.config)


def test_reference_sizes():
    cd = model_zoo.make_config("cd", "4.8b")
    ed = model_zoo.make_config("ed", "11b")
    assert (cd.n_layers, cd.d_model, cd.n_heads, cd.head_dim, cd.d_ff, cd.vocab_size) == (24, 4096, 64, 64, 10240, 32128)
    assert cd.mlp == "geglu" and cd.position == "t5_bias" and cd.tie_embeddings
    assert 4.7e9 < model_zoo.num_params(cd) < 4.9e9
    assert 10.9e9 < model_zoo.num_params(ed) < 11.1e9


@pytest.mark.parametrize("arch", ["cd", "ed"])
def test_flops_formula_matches_counted_matmuls(arch):
    """FlopCounterMode counts the full QK^T / AV matrices (reference path: explicit matmuls); the
    formula counts the pairs the mask allows. Everything else must agree exactly."""
    model = make(arch, attn_impl="reference")
    cfg = model.config
    t_in, t_out = 24, 10
    inner, L = cfg.n_heads * cfg.head_dim, cfg.n_layers
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if arch == "ed":
            model(input_ids=torch.randint(2, 500, (1, t_in)), decoder_input_ids=torch.randint(2, 500, (1, t_out)))
            formula = model_zoo.train_flops(cfg, t_in, target_len=t_out) / 3
            dense_extra = 4 * L * inner * (t_out * t_out - t_out * (t_out + 1) / 2)  # decoder causal, counted full
        else:
            model(torch.randint(2, 500, (1, t_in)))
            formula = model_zoo.train_flops(cfg, t_in) / 3
            dense_extra = 4 * L * inner * (t_in * t_in - t_in * (t_in + 1) / 2)
    assert counter.get_total_flops() == pytest.approx(formula + dense_extra, rel=1e-9)


def test_flops_prefix_costs_more_attention_than_causal():
    cd, nd = model_zoo.make_config("cd", "base"), model_zoo.make_config("nd", "base")
    assert model_zoo.train_flops(nd, 626, prefix_len=313) > model_zoo.train_flops(cd, 626, prefix_len=313)
    assert model_zoo.train_flops(nd, 626, prefix_len=0) == model_zoo.train_flops(cd, 626)


# ---------------------------------------------------------------------------------- errors
def test_unknown_choices_are_clear_errors():
    with pytest.raises(ValueError, match="unknown architecture 'gpt'; choose one of cd, nd, ed"):
        model_zoo.build("gpt", "debug")
    with pytest.raises(ValueError, match="unknown size 'huge'; choose one of debug, tiny"):
        model_zoo.build("cd", "huge")
    with pytest.raises(ValueError, match=r"unknown model option\(s\) n_layer; valid options: .*n_layers"):
        model_zoo.build("cd", "debug", n_layer=3)
    with pytest.raises(ValueError, match="mlp='relu' is not valid; choose one of geglu, swiglu, gelu"):
        model_zoo.build("ed", "debug", mlp="relu")
    with pytest.raises(ValueError, match="mixed_heads' needs an even n_heads"):
        model_zoo.build("nd", "debug", bidirectional_mode="mixed_heads", n_heads=3)
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['prefix_length'\]"):
        make("nd")(torch.ones(1, 3, dtype=torch.long), prefix_length=torch.tensor([1]))


def test_z_loss_is_added():
    model = make("cd", z_loss=1e-2)
    ids = torch.randint(2, 500, (2, 8))
    out = model(ids, labels=ids)
    assert out.z_loss > 0
    torch.testing.assert_close(out.loss, out.ce_loss + 1e-2 * out.z_loss)


# -------------------------------------------------------------------------------- analysis
def test_effective_rank_extremes():
    assert effective_rank(torch.linalg.svdvals(torch.eye(6))) == pytest.approx(6.0)
    assert effective_rank(torch.linalg.svdvals(torch.full((6, 6), 1 / 6))) == pytest.approx(1.0, abs=1e-6)


def test_causal_attention_is_full_rank_and_analysis_cli(tmp_path, capsys):
    model = make("cd")
    rows = attention_spectra(model, {"input_ids": torch.randint(2, 500, (2, 16))})
    assert len(rows) == model.config.n_layers * model.config.n_heads
    assert all(r["numerical_rank"] == 16 for r in rows)  # triangular with a positive diagonal
    model.save_pretrained(tmp_path)
    assert analysis_main([str(tmp_path), "--seq-len", "12", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "eff.rank mean" in out and out.count("decoder") == model.config.n_layers
    assert analysis_main([str(tmp_path / "missing")]) == 2
