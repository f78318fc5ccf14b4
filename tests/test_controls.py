"""The controls of issue 17 (docs/model_zoo.md, "Controls"): each one changes what it says it
changes, keeps its setting through save_pretrained / from_pretrained and export, and the
defaults compute what they always did (tests/test_model_zoo.py's Llama / T5 equivalence and
tests/test_golden.py hold the defaults)."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import model_zoo
from model_zoo.analysis import attention_spectra, spectrum_stats
from model_zoo.export import native_form, save_for_transformers
from rehearse import clean_env
from test_model_zoo import logits_per_kernel, make
from train import registry




def influence(run, ids):
    """changed[i, j]: perturbing input j changes output i (fp64, so 'unchanged' is exact)."""
    base = run(ids)
    changed = torch.zeros(base.shape[1], ids.shape[1], dtype=torch.bool)
    for j in range(ids.shape[1]):
        other = ids.clone()
        other[0, j] = (other[0, j] + 7) % 500 + 2
        changed[:, j] = (run(other) - base).abs().amax(-1)[0] > 1e-10
    return changed


def ed_batch(ti=9, to=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.randint(2, 500, (2, ti), generator=g),
                decoder_input_ids=torch.randint(2, 500, (2, to), generator=g))


def roundtrip(model, tmp_path, batch):
    """save_pretrained -> model_zoo.load: the same config and the same logits (bitwise)."""
    model.save_pretrained(tmp_path)
    loaded = model_zoo.load(tmp_path).eval()
    assert loaded.config.to_diff_dict() == model.config.to_diff_dict()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    return loaded


# --------------------------------------------------------------------------- ED structure
def test_ed_encoder_and_decoder_depths(tmp_path):
    model = make("ed", n_encoder_layers=3, n_decoder_layers=1, attn_impl="reference")
    cfg = model.config
    assert (len(model.encoder.layers), len(model.decoder.layers)) == (3, 1)
    assert sum(p.numel() for p in model.parameters()) == model_zoo.num_params(cfg)
    # FLOPs: the formula against torch's counter (the decoder's causal matrices counted whole)
    ti, to, inner = 24, 10, cfg.n_heads * cfg.head_dim
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.randint(2, 500, (1, ti)), decoder_input_ids=torch.randint(2, 500, (1, to)))
    dense_extra = 4 * 1 * inner * (to * to - to * (to + 1) / 2)
    assert counter.get_total_flops() == pytest.approx(model_zoo.train_flops(cfg, ti, target_len=to) / 3 + dense_extra)
    # the registry: blocks, words, pipeline layout
    spec = registry.get("ed")
    assert spec.num_layers(cfg) == 4 and spec.describe_blocks(cfg) == "3 encoder + 1 decoder layers"
    blocks = [(layer.stack.name, layer.index) for layer in spec.pipeline_layers_layout(cfg).layers
              if layer.kind == "block"]
    assert blocks == [("encoder", 0), ("encoder", 1), ("encoder", 2), ("ed_decoder", 0)]
    loaded = roundtrip(model, tmp_path, ed_batch())
    assert (loaded.config.encoder_depth, loaded.config.decoder_depth) == (3, 1)
    # the default: n_layers for both, and n_layers still sets both
    assert (make("ed", n_layers=3).config.encoder_depth, make("ed", n_layers=3).config.decoder_depth) == (3, 3)


@pytest.mark.parametrize("arch,opts", [
    ("ed", dict(n_encoder_layers=3, n_decoder_layers=1, bidirectional_mode="mixed_layers")),
    ("ed", dict(entropy_scale=True, bidirectional_mode="forward")),
    ("nd", dict(entropy_scale=True, position="rope", qk_bias=True)),
])
def test_controls_run_through_the_pipeline_layers(arch, opts):
    from train.engine.pipeline import LocalPipeline, batch_to_pipeline, pipeline_loss
    from tests.test_pipeline import model_and_batch

    model, batch = model_and_batch(arch, **opts)
    with torch.no_grad():
        ref = model(**{k: v for k, v in batch.items() if not k.startswith("num_")})
        pipe = LocalPipeline(model.config)
        pipe.load_model_state_dict(model.state_dict())
        inputs, labels = batch_to_pipeline(batch, model.config)
        loss = pipeline_loss(model.config)(pipe(inputs), labels)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_shared_encoder_decoder_is_parameter_matched(tmp_path):
    model = make("ed", share_encoder_decoder=True)
    c = model.config
    for enc, dec in zip(model.encoder.layers, model.decoder.layers):
        assert dec.self_attn is enc.self_attn and dec.mlp is enc.mlp and dec.cross_attn is not enc.self_attn
    n = sum(p.numel() for p in model.parameters())
    assert n == model_zoo.num_params(c)
    # = the decoder-only model + each decoder block's cross-attention and its norm + the decoder's
    # final norm and T5 bias table
    inner = c.n_heads * c.head_dim
    cross = c.n_layers * (4 * c.d_model * inner + c.d_model)
    cd = sum(p.numel() for p in make("cd").parameters())
    assert n == cd + cross + c.d_model + c.rel_buckets * c.n_heads
    assert n < sum(p.numel() for p in make("ed").parameters())
    keys = model.state_dict().keys()
    assert not any(k.startswith("decoder.layers.0.self_attn") or k.startswith("decoder.layers.0.mlp") for k in keys)
    # one update reaches both uses: the gradient of a shared weight is the sum of both stacks'
    batch = ed_batch()
    model.train()
    model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
    assert model.encoder.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    model.eval()
    roundtrip(model, tmp_path, batch)
    with pytest.raises(ValueError, match="share_encoder_decoder needs as many encoder as decoder layers"):
        make("ed", share_encoder_decoder=True, n_decoder_layers=1)
    from train.engine.pipeline import PipelineConfigError, check_pipeline

    with pytest.raises(PipelineConfigError, match="share_encoder_decoder=true cannot be pipelined"):
        check_pipeline(c, 2, 1)
    check_pipeline(make("ed").config, 2, 1)  # the same model unshared
    assert registry.get("ed").num_layers(c) == 2 * c.n_layers


def test_causal_encoder_never_sees_a_later_token(tmp_path):
    model = make("ed", bidirectional_mode="forward").double()
    x = torch.randint(2, 500, (1, 8))
    y = torch.randint(2, 500, (1, 4))
    with torch.no_grad():
        changed = influence(lambda e: model(input_ids=e, decoder_input_ids=y).encoder_last_hidden_state, x)
    assert torch.equal(changed, torch.ones(8, 8, dtype=torch.bool).tril())
    # every kernel computes the same causal encoder (flash SDPA's plain causal path included)
    seg = torch.tensor([[1] * 5 + [2] * 3, [1] * 8])
    batch = dict(input_ids=torch.randint(2, 500, (2, 8)), decoder_input_ids=torch.randint(2, 500, (2, 4)))
    packed = dict(segment_ids=seg, decoder_segment_ids=torch.tensor([[1, 1, 2, 2], [1] * 4]))
    for position, extra in (("t5_bias", packed), ("rope", {})):  # the dense mask; flash SDPA's plain causal
        m = make("ed", bidirectional_mode="forward", position=position)
        out = {}
        with torch.no_grad():
            for impl in ("reference", "sdpa", "flex"):
                m.config.attn_impl = impl
                out[impl] = m(**batch, **extra).logits
        torch.testing.assert_close(out["sdpa"], out["reference"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["flex"], out["reference"], atol=1e-5, rtol=1e-5)
    roundtrip(model.float(), tmp_path, batch)


def test_forward_nd_is_cd_and_mixed_encoder_heads_are_triangular():
    cd, nd = make("cd"), make("nd", bidirectional_mode="forward")
    ids = torch.randint(2, 500, (2, 10))
    with torch.no_grad():
        assert torch.equal(nd(ids, prefix_lengths=torch.tensor([4, 7])).logits, cd(ids).logits)
    model = make("ed", bidirectional_mode="mixed_heads")
    rows = attention_spectra(model, ed_batch(ti=8))
    enc = [r for r in rows if r["stack"] == "encoder"]
    assert all(r["numerical_rank"] == 8 for r in enc)  # triangular with a positive diagonal: full rank
    attn = model.encoder.layers[0].self_attn
    attn.record, model.config.attn_impl = [], "reference"
    with torch.no_grad():
        model(**ed_batch(ti=8))
    probs, h = attn.record[0][0], model.config.n_heads // 2
    lower = torch.ones(8, 8, dtype=torch.bool).tril()
    assert (probs[:h][:, ~lower] == 0).all() and (probs[h:][:, ~lower.T] == 0).all()


# ------------------------------------------------------------------------------ attention
def test_entropy_scale_multiplies_the_logits_by_log512_of_the_keys_attended():
    model = make("nd", entropy_scale=True, position="none", attn_impl="reference").double()
    attn = model.model.layers[0].self_attn
    ids, p = torch.randint(2, 500, (1, 10)), 4
    attn.record = []
    with torch.no_grad():
        model(ids, prefix_lengths=torch.tensor([p]))
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        q, k = attn._heads(attn.q_proj(x)), attn._heads(attn.k_proj(x))
    probs = attn.record[0]
    t = ids.shape[1]
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) | ((i < p) & (j < p))
    n = allowed.sum(-1).double()  # prefix queries: p keys; target query i: i + 1
    assert n.tolist() == [4.0] * 4 + [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    scale = (n.log() / math.log(512))[:, None] / math.sqrt(model.config.head_dim)
    expected = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
    torch.testing.assert_close(probs, expected.float(), atol=1e-6, rtol=1e-6)  # (scores are fp32 there)
    # off (the default): the plain 1/sqrt(d)
    plain = make("nd", position="none", attn_impl="reference").double()
    plain.load_state_dict(model.state_dict())
    a = plain.model.layers[0].self_attn
    a.record = []
    with torch.no_grad():
        plain(ids, prefix_lengths=torch.tensor([p]))
    unscaled = (q @ k.transpose(-1, -2) / math.sqrt(model.config.head_dim)).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(a.record[0], unscaled.softmax(-1).float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ["cd", "nd", "ed"])
def test_entropy_scale_is_the_same_on_every_kernel(arch, tmp_path):
    model = make(arch, entropy_scale=True, bidirectional_mode="mixed_heads")
    seg = torch.tensor([[1] * 9 + [2] * 10 + [0] * 2, [1] * 21])
    ids = torch.randint(2, 500, seg.shape)
    if arch == "ed":
        batch = dict(input_ids=ids, segment_ids=seg, decoder_input_ids=torch.randint(2, 500, (2, 11)),
                     decoder_segment_ids=torch.tensor([[1] * 5 + [2] * 6, [1] * 11]))
    else:
        bidir = torch.zeros_like(seg, dtype=torch.bool)
        bidir[0, :4], bidir[1, :11] = True, True
        batch = dict(input_ids=ids, segment_ids=seg, bidirectional=bidir)
    out = logits_per_kernel(model, batch)
    with torch.no_grad():
        plain = make(arch, bidirectional_mode="mixed_heads")(**batch).logits
    torch.testing.assert_close(out["sdpa"], out["reference"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["flex"], out["reference"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, out["reference"])  # the control changes the model
    roundtrip(model, tmp_path, batch)


def test_qk_bias_with_rope(tmp_path):
    model = make("cd", position="rope", mlp="swiglu", qk_bias=True)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is None
    assert sum(p.numel() for p in model.parameters()) == model_zoo.num_params(model.config)
    ids = torch.randint(2, 500, (2, 12))

    def moved_by_k_bias(position):
        m = make("cd", position=position, qk_bias=True).double()
        with torch.no_grad():
            before = m(ids).logits
            for layer in m.model.layers:
                layer.self_attn.k_proj.bias.normal_()
            return not torch.allclose(m(ids).logits, before, atol=1e-9, rtol=0)

    # a k bias adds q.b to every logit of a query: softmax ignores it without RoPE; with RoPE the
    # rotated bias differs from key to key, so it changes the attention (the seed's point)
    assert moved_by_k_bias("rope") and not moved_by_k_bias("none")
    with torch.no_grad():
        attn.q_proj.bias.normal_()
        attn.k_proj.bias.normal_()
    roundtrip(model, tmp_path, dict(input_ids=ids))


@pytest.mark.parametrize("arch", ["nd", "ed"])
def test_no_position_encoding_permuting_a_bidirectional_input_permutes_its_output(arch):
    model = make(arch, position="none").double()
    assert not any("rel_bias" in k or "embed_positions" in k for k in model.state_dict())
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    x = torch.randint(2, 500, (1, 6))
    with torch.no_grad():
        if arch == "ed":
            y = torch.randint(2, 500, (1, 3))
            run = lambda e: model(input_ids=e, decoder_input_ids=y)  # noqa: E731
            a, b = run(x), run(x[:, perm])
            torch.testing.assert_close(b.encoder_last_hidden_state, a.encoder_last_hidden_state[:, perm])
            torch.testing.assert_close(b.logits, a.logits)  # cross-attention is order-blind too
        else:  # the 6-token prefix of a 9-token row
            tail = torch.randint(2, 500, (1, 3))
            run = lambda e: model(torch.cat([e, tail], 1), prefix_lengths=torch.tensor([6])).logits  # noqa: E731
            a, b = run(x), run(x[:, perm])
            torch.testing.assert_close(b[:, :6], a[:, perm])
            torch.testing.assert_close(b[:, 6:], a[:, 6:])
    cd = make("cd", position="none")
    assert cd(torch.randint(2, 500, (1, 5))).logits.shape == (1, 5, 512)


# ------------------------------------------------------------------------------- export
@pytest.mark.parametrize("arch,opts,control", [
    ("cd", dict(position="rope", mlp="swiglu", qk_bias=True), "qk_bias=True"),
    ("cd", dict(position="rope", mlp="swiglu", entropy_scale=True), "entropy_scale=True"),
    ("ed", dict(n_decoder_layers=1), "n_decoder_layers=1"),
    ("ed", dict(share_encoder_decoder=True), "share_encoder_decoder=True"),
    ("ed", dict(bidirectional_mode="forward"), "bidirectional_mode='forward'"),
])
def test_a_control_exports_as_remote_code_and_loads_back(arch, opts, control, tmp_path):
    default = model_zoo.make_config(arch, "debug", **{k: v for k, v in opts.items() if k in ("position", "mlp")})
    assert native_form(default)[0] is not None  # without the control: native Llama / T5
    model = make(arch, **opts)
    form, why = native_form(model.config)
    assert form is None and control in why
    assert save_for_transformers(model, tmp_path) == "remote-code"
    loaded = model_zoo.load(tmp_path).eval()
    batch = ed_batch() if arch == "ed" else dict(input_ids=torch.randint(2, 500, (2, 9)))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert all(getattr(loaded.config, k) == v for k, v in opts.items())


# ------------------------------------------------------------------------------ analysis
def test_spectrum_stats_entropy_and_threshold_ranks():
    flat = spectrum_stats(torch.ones(8))
    assert flat["sv_entropy"] == pytest.approx(1.0) and flat["effective_rank"] == pytest.approx(8.0)
    assert flat["rank_90"] == 8 and flat["rank_99"] == 8
    peaked = spectrum_stats(torch.tensor([1.0] + [0.0] * 7))
    assert peaked["sv_entropy"] == pytest.approx(0.0) and peaked["rank_90"] == 1


def test_spectra_restricted_to_the_bidirectional_block():
    model = make("nd")
    ids, p = torch.randint(2, 500, (2, 16)), 6
    rows = attention_spectra(model, {"input_ids": ids, "prefix_lengths": torch.full((2,), p)}, block="bidirectional")
    assert len(rows) == model.config.n_layers * model.config.n_heads
    assert all(r["n"] == p and 1 <= r["effective_rank"] <= p and 0 <= r["sv_entropy"] <= 1 for r in rows)
    assert all({"layer", "head", "rank_90", "rank_99", "numerical_rank"} <= set(r) for r in rows)
    whole = attention_spectra(model, {"input_ids": ids, "prefix_lengths": torch.full((2,), p)})
    assert all(r["n"] == 16 for r in whole)
    # the views archscale analyze compares: CD, ND and mixed-direction over the same prefix block
    views = registry.get("nd").attention_views(model, ids, p)
    blocks = {name.split(":")[0]: rs for name, rs in views.items() if "prefix block" in name}
    assert set(blocks) == {"causal", "bidirectional", "mixed-direction"}
    assert all(r["n"] == p for rs in blocks.values() for r in rs)
    assert all(r["numerical_rank"] == p for r in blocks["causal"] + blocks["mixed-direction"])  # triangular
    torch.testing.assert_close([r["effective_rank"] for r in blocks["bidirectional"]],
                               [r["effective_rank"] for r in rows])  # = attention_spectra's own block
    ed_views = registry.get("ed").attention_views(make("ed"), ids, p)
    assert {"bidirectional (encoder)", "causal: encoder (forward)", "mixed-direction: encoder (mixed_heads)"} \
        <= set(ed_views)
    assert all(r["numerical_rank"] == 8 for r in ed_views["causal: encoder (forward)"])


# ------------------------------------------------------- a real run: train, export, load back
@pytest.mark.slow  # two 3-step CPU runs: 1 to 3 min on the shared 2-core machine
@pytest.mark.parametrize("zero,controls", [
    (1, dict(n_encoder_layers=3, n_decoder_layers=1, bidirectional_mode="forward", entropy_scale=True,
             position="rope", qk_bias=True)),
    (3, dict(share_encoder_decoder=True, bidirectional_mode="mixed_layers")),
])
def test_controls_survive_training_checkpoints_and_export(tmp_path, zero, controls):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from train.commands.export import main as export_main
    from train.trainer.weights import checkpoint_dir, load_model

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    env = clean_env(DS_ACCELERATOR="cpu", TMPDIR=str(tmp_path))
    args = [sys.executable, "-m", "train", "train", f"run_dir={run}", "model.arch=ed", "objective.name=mlm",
            "objective.seq_length=64", "objective.inputs_length=48", "objective.targets_length=12",
            "data.tokenizer=builtin-bytes", "data.max_documents=30", f"data.cache_dir={tmp_path / 'cache'}",
            "parallel.micro_batch_size=2", f"parallel.zero_stage={zero}", "schedule.max_steps=3",
            "checkpoint.every_n_steps=3", "eval.every_n_steps=0", "eval.num_batches=1", "logging.tensorboard=false"]
    args += [f"model.overrides.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in controls.items()]
    done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = load_model(checkpoint_dir(run))[0].eval()
    assert all(getattr(trained.config, k) == v for k, v in controls.items())
    assert export_main([str(run), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "archscale_export.json").read_text())["form"] == "remote-code"
    model = model_zoo.load(tmp_path / "hf").eval()
    assert all(getattr(model.config, k) == getattr(trained.config, k) for k in model_zoo.option_names("ed"))
    ids = torch.randint(3, 200, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits,
                                   trained(input_ids=ids, decoder_input_ids=ids[:, :5]).logits, atol=1e-5, rtol=1e-5)


def test_every_model_option_is_documented():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "model_zoo.md").read_text()
    assert [o for o in model_zoo.option_names("ed") if f"`{o}`" not in text] == []


@pytest.mark.parametrize("arch,opts", [("nd", dict(entropy_scale=True, position="rope", qk_bias=True)),
                                       ("ed", dict(entropy_scale=True, bidirectional_mode="forward")),
                                       ("ed", dict(share_encoder_decoder=True, n_layers=3))])
def test_generate_with_a_kv_cache_equals_without(arch, opts):
    """The cache's offset enters every control (entropy_scale's n counts the cached keys)."""
    model = make(arch, seed=1, **opts)
    prompt = torch.randint(2, 500, (2, 7))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    args = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, use_cache=True, **args), model.generate(prompt, use_cache=False, **args))


def test_a_t5_with_a_shallower_decoder_converts_with_n_decoder_layers():
    from transformers import T5Config, T5ForConditionalGeneration

    from model_zoo.convert import from_t5

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=1, num_heads=4,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   decoder_start_token_id=0)
    ref = T5ForConditionalGeneration(cfg).eval()
    ours = from_t5(ref).eval()
    assert (ours.config.encoder_depth, ours.config.decoder_depth) == (3, 1)
    x, y = torch.randint(2, 300, (2, 20)), torch.randint(2, 300, (2, 9))
    with torch.no_grad():
        expected, got = ref(input_ids=x, labels=y), ours(input_ids=x, labels=y)
    assert ((got.logits - expected.logits).abs().max() / expected.logits.abs().max()) < 1e-6


@pytest.mark.parametrize("arch,opts", [("ed", dict(n_encoder_layers=3, n_decoder_layers=1)),
                                       ("ed", dict(share_encoder_decoder=True, qk_bias=True)),
                                       ("cd", dict(qk_bias=True, position="rope"))])
def test_the_planner_counts_the_controls_parameters(arch, opts):
    from train.commands.plan.shapes import model_shapes, numel

    model = make(arch, **opts)
    assert numel(model_shapes(model.config)) == sum(p.numel() for p in model.parameters())


def test_analysis_cli_measures_the_bidirectional_block(tmp_path, capsys):
    import json

    from model_zoo.analysis import main

    make("nd").save_pretrained(tmp_path / "nd")
    assert main([str(tmp_path / "nd"), "--seq-len", "12", "--prefix", "5", "--batch", "2", "--block", "bidirectional",
                 "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    assert "sv.entropy" in out and "rank_90" in out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows and all(r["n"] == 5 for r in rows)
