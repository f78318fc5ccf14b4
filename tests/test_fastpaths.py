"""The training fast paths of train.engine.runtime.prepare_blocks, on CPU: activation checkpointing
(full and selective) and torch.compile of the blocks, each equal to the plain eager model, the
state-dict keys unchanged, selective checkpointing keeping less than none and more than full,
one compiled graph per stack kind and mask direction (not one per layer), and the trainer
running with both switched on. GPU-only checks (bf16 tolerances, flex backward) are in
tests/test_gpu.py."""
from __future__ import annotations

import ctypes
import gc

import pytest
import torch

import model_zoo
from test_trainer import _write_corpus, base_overrides, losses
from train.engine.runtime import prepare_blocks


def _batch(arch: str, b: int = 2, t: int = 24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 500, (b, t), generator=g)
    seg = torch.ones(b, t, dtype=torch.long)
    seg[:, t * 2 // 3:] = 2  # two packed examples per row
    if arch == "ed":
        return dict(input_ids=ids, segment_ids=seg, labels=ids[:, : t // 2], decoder_segment_ids=seg[:, : t // 2])
    bidir = torch.arange(t)[None, :] < torch.tensor([[5], [9]])
    return dict(input_ids=ids, labels=ids, segment_ids=seg, bidirectional=bidir)


def _pair(arch: str, n_layers: int = 3, **over):
    torch.manual_seed(0)
    ref = model_zoo.build(arch, "debug", n_layers=n_layers, **over)
    other = model_zoo.build(arch, "debug", n_layers=n_layers, **over)
    other.load_state_dict(ref.state_dict())
    return ref, other


def _grads(model, batch) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ref, other, batch, atol=1e-6):
    (la, ga), (lb, gb) = _grads(ref, batch), _grads(other, batch)
    assert la == pytest.approx(lb, abs=atol)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=atol, rtol=1e-5, msg=n)


@pytest.mark.parametrize("policy", ["full", "selective"])
@pytest.mark.parametrize("arch,over", [("ed", {}), ("nd", {"bidirectional_mode": "mixed_layers", "dropout": 0.1})])
def test_checkpointing_keeps_keys_and_gradients(policy, arch, over):
    ref, ckpt = _pair(arch, **over)
    assert prepare_blocks(ckpt, policy) == (6 if arch == "ed" else 3)
    assert list(ckpt.state_dict()) == list(ref.state_dict())  # nothing wrapped: checkpoints unchanged
    batch = _batch(arch)
    if over.get("dropout"):  # the recomputation must replay the same dropout masks
        torch.manual_seed(5)
        la, ga = _grads(ref, batch)
        torch.manual_seed(5)
        lb, gb = _grads(ckpt, batch)
        assert la == lb
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], atol=1e-6, rtol=1e-5, msg=n)
    else:
        _assert_same(ref, ckpt, batch)
    with torch.no_grad():  # evaluation runs the same blocks without recording anything
        torch.testing.assert_close(ref.eval()(**batch).logits, ckpt.eval()(**batch).logits)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="choose one of none, full, selective"):
        prepare_blocks(model_zoo.build("cd", "debug"), "some")


def _malloc_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc.mallinfo2.restype = Info
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd  # heap + mmapped bytes in use (torch's CPU allocator is malloc)


def _kept_after_forward(policy: str) -> int:
    """Bytes the forward pass leaves alive for the backward pass (activations, plus the loss)."""
    torch.manual_seed(0)
    model = model_zoo.build("cd", "debug", d_model=256, n_heads=4, head_dim=64, d_ff=1024, n_layers=4,
                            vocab_size=512)
    prepare_blocks(model, policy)
    ids = torch.randint(2, 500, (4, 256))
    gc.collect()
    before = _malloc_in_use()
    out = model(input_ids=ids, labels=ids)
    gc.collect()
    kept = _malloc_in_use() - before
    out.loss.backward()
    return kept


def test_selective_checkpointing_keeps_less_than_none_and_more_than_full():
    try:
        _malloc_in_use()
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2 to measure CPU memory")
    none, full, selective = (_kept_after_forward(p) for p in ("none", "full", "selective"))
    # seen on CPU (4 x 256 tokens, d 256, 4 layers): none 139 MiB, selective 83 MiB, full 11 MiB
    assert full < 0.2 * none
    assert full < selective < 0.8 * none


@pytest.mark.slow
def test_compiled_blocks_equal_eager_with_one_graph_per_stack_and_direction():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref, fast = _pair("nd", n_layers=4, bidirectional_mode="mixed_layers")
    prepare_blocks(fast, "none", compile=True)
    for _ in range(2):  # the second step reuses the graphs
        _assert_same(ref, fast, _batch("nd"), atol=2e-5)
    graphs_nd = counters["stats"]["unique_graphs"]
    # not one per layer (4): one, or one per mask direction where the direction is code (flex's
    # mask_mod on GPUs); on CPU the direction is only the dense mask's values
    assert 1 <= graphs_nd <= 2

    ref, fast = _pair("ed", n_layers=4)
    prepare_blocks(fast, "selective", compile=True)  # checkpointing inside the compiled function
    _assert_same(ref, fast, _batch("ed"), atol=2e-5)
    assert counters["stats"]["unique_graphs"] - graphs_nd == 2  # encoder block, decoder block


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("fastpaths")
    _write_corpus(w / "corpus", n_docs=8)
    return w


@pytest.mark.slow
def test_trainer_with_compiled_blocks_and_selective_checkpointing_follows_the_eager_run(work):
    from test_trainer import run_inproc

    import os

    env, threads = dict(os.environ), torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        base = base_overrides(work) + ["model.arch=ed", "objective.name=mlm", "objective.inputs_length=64",
                                       "objective.targets_length=14", "schedule.max_steps=3",
                                       "checkpoint.every_n_steps=100"]
        run_inproc(base + [f"run_dir={work / 'eager'}"])
        run_inproc(base + [f"run_dir={work / 'fast'}", "model.compile=true", "parallel.activation_checkpointing=true",
                           "parallel.checkpoint_policy=selective"])
    finally:
        torch.set_num_threads(threads)
        from train.engine.runtime import teardown_distributed

        teardown_distributed()
        os.environ.clear()
        os.environ.update(env)
    eager, fast = losses(work / "eager"), losses(work / "fast")
    assert sorted(eager) == [1, 2, 3]
    for step in eager:
        assert fast[step] == pytest.approx(eager[step], abs=1e-5)


def test_compile_with_zero3_is_refused_before_any_work():
    from train.config import ConfigError, derive, load_config

    cfg = load_config(None, ["model.compile=true", "parallel.zero_stage=3", "schedule.max_steps=10"])
    with pytest.raises(ConfigError, match="model.compile=true with ZeRO-3"):
        derive(cfg, 1)
    derive(load_config(None, ["model.compile=true", "parallel.zero_stage=2", "schedule.max_steps=10"]), 1)


@pytest.mark.parametrize("arch", ["nd", "ed"])
def test_pipeline_layers_take_selective_checkpointing(arch):
    """The pipeline's BlockLayers are Blocks: prepare_blocks reaches them (train.engine.runtime does so
    on every stage), and the chain with selective checkpointing equals the model."""
    from test_pipeline import VARIANTS, model_and_batch, reference
    from train.engine.pipeline import LocalPipeline, batch_to_pipeline, pipeline_loss

    model, batch = model_and_batch(arch, **VARIANTS[1])  # RoPE, mixed-direction layers
    ref, ref_grads = reference(model, batch)
    pipe = LocalPipeline(model.config)
    pipe.load_model_state_dict(model.state_dict())
    assert prepare_blocks(pipe, "selective") == model.config.n_layers * (2 if arch == "ed" else 1)
    inputs, labels = batch_to_pipeline(batch, model.config)
    loss = pipeline_loss(model.config)(pipe(inputs), labels)
    loss.backward()
    torch.testing.assert_close(loss, ref.loss, rtol=0, atol=1e-6)
    for k, p in pipe.named_model_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=0, atol=1e-6, msg=k)
