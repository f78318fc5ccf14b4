"""train/engine/pipeline/: the pipeline layers equal the model_zoo model; real 2-stage DeepSpeed runs
follow the unpipelined loss curve for CD, ND and ED; weight mapping both ways; clear errors.

The single-process tests run the layer chain without DeepSpeed's engine (`LocalPipeline`), and
simulate its stage boundaries (detached activations, gradients sent back per float tensor). The
slow test launches one `torchrun --nproc_per_node=2` over gloo running
tests/workers/pipeline_worker.py, which runs every case and writes a JSON file asserted on here;
another launch (tests/workers/engine_worker.py) holds the trainer's two engines
(train/engine/engines.py, plain and 2-stage pipeline) to one contract: the same calls, the same types.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model_zoo
from train.engine.pipeline import (Carry, LocalPipeline, PipelineConfigError, batch_to_pipeline, check_pipeline,
                            initialize_pipeline_engine, input_fields, layer_names, model_to_pipeline_state_dicts,
                            pipeline_layers, pipeline_loss, pipeline_to_model_state_dict)

ROOT = Path(__file__).resolve().parents[1]
B, T, TI, TO = 2, 12, 12, 8

VARIANTS = [
    {},
    dict(position="rope", bidirectional_mode="mixed_layers"),
    dict(position="learned", tie_embeddings=False, z_loss=1e-3),
    dict(position="none", bidirectional_mode="mixed_heads", scale_tied_logits=False, norm="layernorm"),
]


def packed_batch(arch: str, vocab: int = 512, seed: int = 0) -> dict:
    """Two packed rows: two examples each, padding in the first row, prefixes (ND), counts."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.tensor([[1] * 5 + [2] * 4 + [0] * 3, [1] * 7 + [2] * 5])
    pos = torch.tensor([list(range(5)) + list(range(4)) + list(range(3)), list(range(7)) + list(range(5))])
    counts = dict(num_tokens=torch.tensor(21), num_target_tokens=torch.tensor(9), num_documents=torch.tensor(4))
    if arch == "ed":
        dseg = torch.tensor([[1] * 3 + [2] * 3 + [0] * 2, [1] * 4 + [2] * 4])
        dpos = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3]])
        labels = torch.randint(2, vocab, (B, TO), generator=g).masked_fill(dseg == 0, -100)
        return dict(input_ids=torch.randint(2, vocab, (B, TI), generator=g), segment_ids=seg, position_ids=pos,
                    decoder_input_ids=torch.randint(2, vocab, (B, TO), generator=g), labels=labels,
                    decoder_segment_ids=dseg, decoder_position_ids=dpos, **counts)
    ids = torch.randint(2, vocab, (B, T), generator=g)
    bidir = torch.zeros(B, T, dtype=torch.bool)
    bidir[0, :2] = bidir[0, 5:7] = bidir[1, :4] = True
    labels = ids.masked_fill(seg == 0, -100)
    labels[:, 0] = labels[0, 5] = labels[1, 7] = -100  # first token of every example
    return dict(input_ids=ids, labels=labels, segment_ids=seg, position_ids=pos, bidirectional=bidir, **counts)


def model_and_batch(arch: str, seed: int = 0, **opts):
    torch.manual_seed(seed)
    model = model_zoo.build(arch, "debug", **opts)
    return model, packed_batch(arch, model.config.vocab_size, seed)


def reference(model, batch: dict):
    """Loss and parameter gradients of the unpipelined model."""
    model.zero_grad(set_to_none=True)
    out = model(**{k: v for k, v in batch.items() if not k.startswith("num_")})
    out.loss.backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters()}


# ------------------------------------------------------------------- single process: the chain
@pytest.mark.parametrize("arch", ["cd", "nd", "ed"])
@pytest.mark.parametrize("opts", VARIANTS, ids=["t5_bias", "rope_mixed_layers", "learned_untied_zloss", "none_mixed_heads"])
def test_layer_chain_equals_model(arch, opts):
    model, batch = model_and_batch(arch, **opts)
    ref, ref_grads = reference(model, batch)
    pipe = LocalPipeline(model.config)
    pipe.load_model_state_dict(model.state_dict())
    inputs, labels = batch_to_pipeline(batch, model.config)
    logits = pipe(inputs)
    loss = pipeline_loss(model.config)(logits, labels)
    loss.backward()
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, ref.loss, rtol=0, atol=1e-6)
    names = dict(pipe.named_model_parameters())
    assert set(names) == set(ref_grads)  # tied: the embedding appears once
    for k, p in names.items():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=0, atol=1e-6, msg=k)
    # one mask context per stack and micro-batch, shared by its layers
    assert pipe.cache.builds == (2 if arch == "ed" else 1)


@pytest.mark.parametrize("arch", ["cd", "nd", "ed"])
@pytest.mark.parametrize("opts", VARIANTS[:3], ids=["t5_bias", "rope_mixed_layers", "learned_untied_zloss"])
def test_every_layer_as_its_own_stage(arch, opts):
    """Simulate DeepSpeed with a stage boundary after every layer: each stage receives detached
    copies (floats require grad), and sends back the gradient of every float it received (the
    engine asserts that each one has a gradient). Integers only cross as int64 / uint8, and no
    [T, T]-sized tensor ever crosses: masks are rebuilt on every stage."""
    model, batch = model_and_batch(arch, **opts)
    ref, ref_grads = reference(model, batch)
    pipe = LocalPipeline(model.config)
    pipe.load_model_state_dict(model.state_dict())
    inputs, labels = batch_to_pipeline(batch, model.config)
    c = model.config
    stages = []  # (received, sent) per layer
    x = inputs
    for fn in pipe.forward_funcs:
        received = tuple(t.detach().clone().requires_grad_(t.is_floating_point())
                         for t in (x if isinstance(x, tuple) else (x,)))
        out = fn(received if len(received) > 1 else received[0])
        stages.append((received, out))
        x = out
    loss = pipeline_loss(c)(x, labels)
    torch.testing.assert_close(loss, ref.loss, rtol=0, atol=1e-6)
    for received, _ in stages[1:]:
        for t in received:
            assert t.dtype in (torch.float32, torch.int64, torch.uint8), t.dtype
            if t.is_floating_point():  # hidden (B, T, D) / encoder output / T5 table (2*max_distance+1, H)
                assert t.shape in {(B, T, c.d_model), (B, TI, c.d_model), (B, TO, c.d_model),
                                   (2 * c.rel_max_distance + 1, c.n_heads)}, t.shape
            else:
                assert t.dim() == 2 and t.shape[0] == B, t.shape  # per-token
    loss.backward()  # the last stage
    for i in range(len(stages) - 1, 0, -1):  # send grads back stage by stage, as the engine does
        received = stages[i][0]
        prev_out = stages[i - 1][1]
        prev_out = prev_out if isinstance(prev_out, tuple) else (prev_out,)
        floats = [(o, r) for o, r in zip(prev_out, received) if r.is_floating_point()]
        for o, r in floats:
            assert r.grad is not None, f"layer {i} ({layer_names(c)[i]}) received a float it gives no gradient"
        torch.autograd.backward([o for o, _ in floats], [r.grad for _, r in floats])
    for k, p in pipe.named_model_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=0, atol=1e-6, msg=k)


def test_mask_context_is_reused_by_a_stage_and_rebuilt_per_micro_batch():
    model, batch = model_and_batch("nd", position="rope", bidirectional_mode="mixed_layers")
    pipe = LocalPipeline(model.config)
    pipe.load_model_state_dict(model.state_dict())
    inputs, _ = batch_to_pipeline(batch, model.config)
    first = pipe(inputs)
    assert pipe.cache.builds == 1  # 2 blocks, one context
    # recomputation under activation checkpointing: detached views of the same tensors hit the cache
    hidden = pipe(inputs, 0, 2)
    again = pipe(tuple(t.detach() for t in hidden), 2)
    assert pipe.cache.builds == 1 and torch.equal(again, first)
    # the next micro-batch: new per-token tensors, a new context
    pipe(tuple(t.clone() for t in inputs))
    assert pipe.cache.builds == 2
    # changed contents of the same tensor (in place) are not mistaken for the old ones
    inputs[1][0, :4] = 9  # segment ids
    pipe(inputs)
    assert pipe.cache.builds == 3


# ---------------------------------------------------------------------------- data interface
def test_batch_to_pipeline_fields_and_dtypes():
    for arch in ("cd", "nd", "ed"):
        config = model_zoo.make_config(arch, "debug")
        batch = packed_batch(arch)
        inputs, labels = batch_to_pipeline(batch, config)
        assert len(inputs) == len(input_fields(config))
        assert all(t.dtype in (torch.int64, torch.uint8) for t in inputs)  # never bool (not sendable)
        assert torch.equal(labels, batch["labels"])
        assert set(batch) >= {"num_tokens"}  # the caller's batch is untouched
    assert input_fields(model_zoo.make_config("cd", "debug")) == ("input_ids", "segment_ids", "position_ids")
    assert input_fields(model_zoo.make_config("nd", "debug"))[-1] == "bidirectional"
    assert input_fields(model_zoo.make_config("ed", "debug")) == (
        "input_ids", "segment_ids", "position_ids", "decoder_input_ids", "decoder_segment_ids", "decoder_position_ids")

    nd = model_zoo.make_config("nd", "debug")
    ids = torch.arange(12).view(2, 6)
    (i, seg, pos, bidir), _ = batch_to_pipeline(dict(input_ids=ids, labels=ids, prefix_lengths=torch.tensor([2, 4])), nd)
    assert bidir.tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]] and bidir.dtype == torch.uint8
    assert seg.eq(1).all() and pos.tolist() == [list(range(6))] * 2
    with pytest.raises(KeyError, match="attention_mask"):
        batch_to_pipeline(dict(input_ids=ids, labels=ids, attention_mask=ids), nd)
    with pytest.raises(KeyError, match="decoder_input_ids"):
        batch_to_pipeline(dict(input_ids=ids, labels=ids), model_zoo.make_config("ed", "debug"))


def test_carry_names_its_tensors():
    c = Carry("hidden", "segment_ids")
    h, s = torch.zeros(1), torch.ones(1)
    assert c.unpack(c.pack(dict(hidden=h, segment_ids=s, other=h))) == dict(hidden=h, segment_ids=s)
    with pytest.raises(ValueError, match="expected 2 tensors .hidden, segment_ids., got 1"):
        c.unpack(h)
    assert Carry("hidden").pack(dict(hidden=h)) is h  # one tensor travels bare


# ---------------------------------------------------------------------------- weights mapping
@pytest.mark.parametrize("arch,opts", [("cd", {}), ("nd", dict(tie_embeddings=False, position="learned")),
                                       ("ed", {}), ("ed", dict(tie_embeddings=False))])
def test_weight_mapping_both_ways(arch, opts):
    model, _ = model_and_batch(arch, **opts)
    state = model.state_dict()
    layers = model_to_pipeline_state_dicts(model.config, state)  # as DeepSpeed's layer files hold them
    assert len(pipeline_layers(model.config)) == len(layer_names(model.config))
    back = pipeline_to_model_state_dict(model.config, layers)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    pipe = LocalPipeline(model.config)
    pipe.load_model_state_dict(state)
    exported = pipe.model_state_dict()
    assert set(exported) == set(state) and all(torch.equal(exported[k], v) for k, v in state.items())
    fresh = model_zoo.build(arch, "debug", **opts)
    fresh.load_state_dict(back, strict=True)
    with pytest.raises(KeyError, match="layer index 99"):
        pipeline_to_model_state_dict(model.config, {99: {}})


# ------------------------------------------------------------------------------- clear errors
def test_clear_errors_before_any_work():
    cd, ed = model_zoo.make_config("cd", "debug"), model_zoo.make_config("ed", "debug")
    for zero in (2, 3):
        with pytest.raises(PipelineConfigError, match=f"ZeRO stage {zero} cannot be combined with pipeline"):
            check_pipeline(cd, 2, zero_stage=zero)
    with pytest.raises(PipelineConfigError, match="3 pipeline stages for a model of 2 layers: use at most 2"):
        check_pipeline(cd, 3)
    with pytest.raises(PipelineConfigError, match="5 pipeline stages .* 2 encoder \\+ 2 decoder layers"):
        check_pipeline(ed, 5)
    check_pipeline(ed, 4, zero_stage=1)  # encoder + decoder blocks
    with pytest.raises(PipelineConfigError, match="partition method 'balanced'"):
        check_pipeline(cd, 2, partition_method="balanced")
    with pytest.raises(PipelineConfigError, match="boundaries .* from 0 to 6"):
        check_pipeline(cd, 2, partition_method=[0, 6, 6])
    check_pipeline(cd, 2, partition_method=[0, 1, 6])
    check_pipeline(cd, 2, partition_method="type:BlockLayer")
    with pytest.raises(PipelineConfigError, match="positive integer"):
        check_pipeline(cd, 0)
    # the engine builder checks before it touches torch.distributed or DeepSpeed
    with pytest.raises(PipelineConfigError, match="ZeRO stage 2"):
        initialize_pipeline_engine(model_zoo.build("cd", "debug"), {"zero_optimization": {"stage": 2}},
                                   num_stages=2, optimizer=lambda m: None)


# ---------------------------------------------------------------- real DeepSpeed, 2 processes
@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "results.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", TMPDIR=str(tmp), PYTHONPATH=str(ROOT),
               TORCH_EXTENSIONS_DIR=str(tmp / "ext"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "workers" / "pipeline_worker.py"), str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and out.exists(), r.stdout[-4000:] + r.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_stage_pipeline_follows_the_unpipelined_model(pipeline_runs):
    cases = pipeline_runs["cases"]
    assert {c["arch"] for c in cases.values()} == {"cd", "nd", "ed"}
    assert {c["zero"] for c in cases.values()} == {0, 1}
    for name, c in cases.items():
        diffs = c["loss_diffs"]
        assert diffs[0] < 1e-5, (name, c["pipeline_losses"], c["reference_losses"])  # same weights, same loss
        assert max(diffs) < 1e-4, (name, c["pipeline_losses"], c["reference_losses"])  # after optimizer steps
        assert c["eval_diff"] < 1e-4, name
        assert c["weight_change"] > 1e-3, name  # the weights did move ...
        assert c["weight_diff"] < 1e-4, (name, c["weight_diff"])  # ... identically
        # the checkpoint's layer files convert to the full model_zoo state dict (loaded strictly)
        assert c["checkpoint_weight_diff"] < 1e-4 and not c["missing_keys"] and not c["extra_keys"], name
        # resumed from the checkpoint (weights and optimizer state): the same eval and next step
        assert c["resumed_eval_diff"] == 0 and c["resumed_step_diff"] == 0, name
        if c["clip"]:
            assert max(c["reference_grad_norms"]) > c["clip"], name  # clipping was active
        # masks: one context per stack held by the stage, per micro-batch (recomputation included)
        for rank in c["ranks"]:
            assert rank["builds"] == c["micro_batches"] * len(rank["stacks"]), (name, rank)


@pytest.mark.slow
def test_pipeline_splits_where_asked_and_refuses_zero2(pipeline_runs):
    cases = pipeline_runs["cases"]
    parts = {name: c["ranks"][0]["parts"] for name, c in cases.items()}
    assert parts["ed_zero1_clip_split_in_decoder"] == [0, 8, 11]
    assert parts["ed_zero1_split_in_encoder_zloss"] == [0, 3, 11]
    assert parts["cd_zero1_rope_head_alone"] == [0, 5, 6]
    assert parts["cd_zero0"] == [0, 3, 6]  # by parameters: one block per stage
    assert cases["ed_zero1_clip_split_in_decoder"]["ranks"][0]["stacks"] == ["ed_decoder", "encoder"]
    assert "ZeRO stage 2 cannot be combined with pipeline parallelism" in pipeline_runs["zero2_error"]


# ------------------------------------------------------- the trainer's engine: one contract, two kinds
@pytest.fixture(scope="module")
def engine_answers(tmp_path_factory):
    """tests/workers/engine_worker.py: a plain (2 data-parallel ranks) and a 2-stage pipeline
    engine of the same debug CD model, built by train.engine.engines.build_engine, answer every
    call of the contract on the same global batches."""
    tmp = tmp_path_factory.mktemp("engines")
    out = tmp / "answers.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", TMPDIR=str(tmp), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a fresh rendezvous: torchrun sets these for its children
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "workers" / "engine_worker.py"), str(out), str(tmp / "checkpoints")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and out.exists(), r.stdout[-4000:] + r.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_plain_and_pipeline_engines_answer_alike(engine_answers):
    plain, pipe = engine_answers["plain"], engine_answers["pipeline"]
    for rank in plain + pipe:  # the same calls, the same types, on every rank of both kinds
        types = dict(rank["types"])
        assert types.pop("ce_loss") in ("float", "NoneType") and types.pop("z_loss") in ("float", "NoneType")
        assert types.pop("whole_model") in ("DecoderLM", "NoneType")
        assert types == {"train_batch": "StepLosses", "loss": "float", "held_out_loss": "float",
                         "grad_norm": "float", "lr": "float", "module": True}, rank["types"]
        # save, then load into an engine built from other weights: the same model again
        assert rank["reloaded_held_out_loss"] == rank["held_out_loss"]
    # a term the engine does not measure is None, never 0.0: a pipeline reports only the total loss
    assert all(r["types"]["ce_loss"] == r["types"]["z_loss"] == "NoneType" for r in pipe)
    assert all(r["types"]["ce_loss"] == "float" and r["ce_loss"] == r["losses"][0] for r in plain)  # z_loss 0
    # the whole model where a rank runs all of it (the non-finite locator, the yardstick), else None
    assert all(r["whole_model_is_the_model"] for r in plain) and all(r["types"]["whole_model"] == "NoneType"
                                                                     for r in pipe)
    # data parallel: plain ranks read their own rows, pipeline stages the same rows, counted once
    assert [r["dp"] for r in plain] == [[0, 2], [1, 2]] and [r["dp"] for r in pipe] == [[0, 1], [0, 1]]
    assert [r["counts_rows"] for r in plain] == [True, True] and [r["counts_rows"] for r in pipe] == [True, False]
    # the same model and global batches: the same step losses (mean over ranks) and held-out loss
    # (every micro-batch has as many targets, so the pipeline's per-micro-batch mean equals the per-token one)
    for a, b in zip(plain[0]["mean_losses"], pipe[0]["mean_losses"]):
        assert abs(a - b) < 1e-5, (plain[0]["mean_losses"], pipe[0]["mean_losses"])
    assert pipe[0]["losses"] == pipe[1]["losses"]  # known on every stage
    assert abs(plain[0]["held_out_loss"] - pipe[0]["held_out_loss"]) < 1e-5
    assert plain[0]["held_out_loss"] == plain[1]["held_out_loss"] and pipe[0]["held_out_loss"] == pipe[1]["held_out_loss"]
