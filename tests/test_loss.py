"""model_zoo/loss.py: the fused linear + cross-entropy (+ z-loss) equals the dense reference.

Tolerances (relative to the largest magnitude of the reference tensor):
* fp32: 1e-6 for loss, ce, z and both gradients (measured: <= 3e-7);
* bf16 inputs (the matmuls in bf16, everything else fp32 as in the dense path): 1e-5 for the
  loss terms and grad_hidden; 1e-2 (about two bf16 ulps) for grad_weight, which chunked rounds
  once per chunk to bf16 before its fp32 sum where dense rounds once (measured: <= 4e-3);
* whole models in fp32: every parameter gradient within 1e-5 (they pass through the network).
"""
from __future__ import annotations

import pytest
import torch

import model_zoo
from model_zoo.loss import LMHead, from_liger, linear_cross_entropy, lm_loss, resolve_impl, shift_labels

N, V, D = 77, 301, 24  # N is not a multiple of the chunk sizes below


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def problem(dtype=torch.float32, seed: int = 0, ignore_every: int = 4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::ignore_every] = -100
    return hidden, weight, labels


def run(impl: str, hidden, weight, labels, z_loss: float, chunk_size: int = 16, scale: float = 1.0):
    hidden.grad = weight.grad = None
    loss, ce, z = linear_cross_entropy(hidden, weight, labels, z_loss, impl, chunk_size)
    (loss * scale).backward()
    return loss.detach(), ce.detach(), z.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("chunk_size", [1, 16, 1000])  # one row, uneven chunks, one chunk
def test_chunked_equals_dense_fp32(z_loss, chunk_size):
    h, w, y = problem()
    ref = run("dense", h, w, y, z_loss)
    got = run("chunked", h, w, y, z_loss, chunk_size)
    assert (ref[2] > 0) == (z_loss > 0)
    for name, a, b in zip(("loss", "ce", "z", "grad_hidden", "grad_weight"), got, ref):
        assert rel(a, b) < 1e-6, (name, rel(a, b))
    torch.testing.assert_close(got[0], got[1] + z_loss * got[2])


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_equals_dense_bf16(z_loss):
    h, w, y = problem(torch.bfloat16)
    ref = run("dense", h, w, y, z_loss)
    got = run("chunked", h, w, y, z_loss)
    assert got[3].dtype == got[4].dtype == torch.bfloat16
    for name, a, b, tol in zip(("loss", "ce", "z", "grad_hidden", "grad_weight"), got, ref,
                               (1e-5, 1e-5, 1e-5, 1e-5, 1e-2)):
        assert rel(a, b) < tol, (name, rel(a, b))


def test_incoming_gradient_scales_the_saved_gradients():
    h, w, y = problem()
    ref = run("dense", h, w, y, 1e-3, scale=0.25)
    got = run("chunked", h, w, y, 1e-3, scale=0.25)
    assert rel(got[3], ref[3]) < 1e-6 and rel(got[4], ref[4]) < 1e-6


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_all_labels_ignored_is_nan_with_zero_gradients_like_dense(z_loss):
    """Today's behaviour, kept: F.cross_entropy's mean over no token is 0 / 0."""
    h, w, _ = problem()
    y = torch.full((N,), -100)
    for impl in ("dense", "chunked"):
        loss, ce, z, gh, gw = run(impl, h, w, y, z_loss)
        assert loss.isnan() and ce.isnan() and z == 0, impl
        assert not gh.any() and not gw.any(), impl


def test_weight_without_grad_and_no_grad_mode():
    h, w, y = problem()
    w.requires_grad_(False)
    ref = run("dense", h, w, y, 1e-2)
    got = run("chunked", h, w, y, 1e-2)
    assert got[4] is None and rel(got[3], ref[3]) < 1e-6
    with torch.no_grad():
        loss, _, _ = linear_cross_entropy(h, w, y, 1e-2, "chunked", 16)
    assert loss.grad_fn is None and rel(loss, ref[0]) < 1e-6


def test_ce_and_z_are_for_logging_loss_carries_the_gradient():
    h, w, y = problem()
    loss, ce, z = linear_cross_entropy(h, w, y, 1e-2, "chunked", 16)
    assert loss.requires_grad and not ce.requires_grad and not z.requires_grad
    loss, ce, z = linear_cross_entropy(h, w, y, 0.0, "chunked", 16)
    assert ce is loss and z == 0  # as lm_loss: with z_loss 0, ce is the loss


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while fn() runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_chunked_saves_no_logits():
    """Dense keeps fp32 [N, V] tensors for the backward; chunked keeps only grad_hidden [N, D]
    and grad_weight [V, D]."""
    n, v, d = 512, 2048, 32
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    y = torch.randint(0, v, (n,))
    dense = saved_bytes(lambda: linear_cross_entropy(h, w, y, 1e-4, "dense"))
    chunked = saved_bytes(lambda: linear_cross_entropy(h, w, y, 1e-4, "chunked", 128))
    assert dense >= 2 * n * v * 4  # log-softmax output and the logsumexp input, fp32
    assert chunked == (n * d + v * d) * 4 < n * v * 4


# ------------------------------------------------------------------------------- in the models
def batch(arch: str, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if arch == "ed":
        labels = torch.randint(2, vocab, (2, 7), generator=g)
        labels[1, 5:] = -100
        return dict(input_ids=torch.randint(2, vocab, (2, 9), generator=g), labels=labels)
    ids = torch.randint(2, vocab, (2, 11), generator=g)
    labels = ids.clone()
    labels[:, 0] = labels[1, 8:] = -100
    return dict(input_ids=ids, labels=labels, **({"prefix_lengths": torch.tensor([3, 5])} if arch == "nd" else {}))


def loss_and_grads(model, impl: str, kw: dict):
    model.config.loss_impl = impl
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("arch,opts", [("cd", {}), ("nd", {}), ("ed", {}), ("cd", dict(tie_embeddings=False)),
                                       ("ed", dict(tie_embeddings=False, position="rope"))])
def test_models_equal_across_loss_impl(arch, opts):
    torch.manual_seed(0)
    model = model_zoo.build(arch, "debug", z_loss=1e-2, loss_chunk_size=5, **opts)
    model.train()
    kw = batch(arch, model.config.vocab_size)
    ref, ref_grads = loss_and_grads(model, "dense", kw)
    out, grads = loss_and_grads(model, "chunked", kw)
    assert ref.logits is not None and out.logits is None  # the fused path skips the logits
    for k in ("loss", "ce_loss", "z_loss"):
        torch.testing.assert_close(getattr(out, k), getattr(ref, k), rtol=1e-6, atol=0, msg=k)
    assert set(grads) == set(ref_grads)  # tied: the shared matrix gets the head's gradient too
    for k, g in grads.items():
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)
    model.eval()  # eval: logits as before, whatever loss_impl (evaluation reads them with labels)
    with torch.no_grad():
        ev = model(**kw)
    assert ev.logits is not None
    torch.testing.assert_close(ev.loss, ref.loss, rtol=1e-6, atol=0)


def test_auto_is_dense_on_cpu_and_liger_needs_cuda():
    assert resolve_impl("auto", torch.device("cpu")) == "dense"
    assert resolve_impl("chunked", torch.device("cuda")) == "chunked"
    # few tokens (fewer than d_model): dense logits take less memory than the fused [V, D] buffers
    assert resolve_impl("auto", torch.device("cuda"), tokens=456, d_model=4096) == "dense"
    assert resolve_impl("auto", torch.device("cuda"), tokens=8192, d_model=4096) in ("chunked", "liger")
    assert resolve_impl("chunked", torch.device("cuda"), tokens=8, d_model=4096) == "chunked"  # explicit wins
    h, w, y = problem()
    with pytest.raises(RuntimeError, match="loss_impl='liger' needs CUDA"):
        linear_cross_entropy(h, w, y, 0.0, "liger")
    with pytest.raises(ValueError, match="choose one of auto, dense, chunked, liger"):
        linear_cross_entropy(h, w, y, 0.0, "fast")


@pytest.mark.parametrize("form", ["tuple", "object"])
def test_liger_output_read_in_lm_loss_conventions(form):
    """On CPU, the adapter alone: liger's loss includes the scaled z term, its z is scaled by
    lse_square_scale (a tuple in older releases, a CrossEntropyOutput later), and it returns 0
    where every label is ignored."""
    from types import SimpleNamespace

    h, w, y = problem()
    ref = lm_loss(h @ w.T, y, 1e-2)
    out = (ref[0], 1e-2 * ref[2]) if form == "tuple" else SimpleNamespace(loss=ref[0], z_loss=1e-2 * ref[2])
    for a, b in zip(from_liger(out, y, 1e-2), ref):
        torch.testing.assert_close(a, b)
    loss, ce, z = from_liger(ref[1], y, 0.0)  # z_loss 0: liger returns the loss tensor alone
    assert ce is loss and z == 0 and torch.equal(loss, ref[1])
    none = torch.full_like(y, -100)
    loss, ce, z = from_liger((torch.tensor(0.0), torch.tensor(0.0)), none, 1e-2)
    assert loss.isnan() and ce.isnan() and z == 0


def test_config_validates_loss_options():
    with pytest.raises(ValueError, match="loss_impl='fast' is not valid"):
        model_zoo.make_config("cd", "debug", loss_impl="fast")
    with pytest.raises(ValueError, match="loss_chunk_size"):
        model_zoo.make_config("cd", "debug", loss_chunk_size=0)
    from train.config import ModelConfig
    from train.registry import get

    assert get("ed").make_config(ModelConfig(arch="ed", loss_impl="chunked")).loss_impl == "chunked"


def test_shift_labels_and_lm_head():
    y = torch.tensor([[-100, 5, 6, 7]])
    assert shift_labels(y).tolist() == [[5, 6, 7, -100]]
    head = LMHead(D, V)
    h, _, labels = problem()
    torch.testing.assert_close(head(h), h @ head.weight.T)
    torch.testing.assert_close(head(h, labels, impl="chunked")[0], lm_loss(h @ head.weight.T, labels, 0.0)[0])


@pytest.mark.parametrize("arch", ["cd", "ed"])
def test_pipeline_last_stage_fuses_the_same_way(arch):
    """LocalPipeline in training mode with loss_impl=chunked: its head hands (hidden, weight) to
    the pipeline loss; loss and gradients equal the unpipelined dense model."""
    from train.engine.pipeline import LocalPipeline, batch_to_pipeline, pipeline_loss

    torch.manual_seed(0)
    model = model_zoo.build(arch, "debug", z_loss=1e-3)
    kw = batch(arch, model.config.vocab_size)
    ref, ref_grads = loss_and_grads(model, "dense", kw)
    config = model_zoo.make_config(arch, "debug", z_loss=1e-3, loss_impl="chunked", loss_chunk_size=4)
    pipe = LocalPipeline(config)
    pipe.load_model_state_dict(model.state_dict())
    full = {**kw, "segment_ids": torch.ones_like(kw["input_ids"])}
    if arch == "ed":
        full.update(decoder_input_ids=model.shift_right(kw["labels"]),
                    decoder_segment_ids=torch.ones_like(kw["labels"]))
    inputs, labels = batch_to_pipeline(full, config)
    outputs = pipe(inputs)
    assert isinstance(outputs, tuple)  # (hidden, head weight), no logits
    loss = pipeline_loss(config)(outputs, labels)
    loss.backward()
    torch.testing.assert_close(loss, ref.loss, rtol=1e-6, atol=0)
    for k, p in pipe.named_model_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-5, atol=1e-7, msg=k)


# ----------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_fused_equals_dense_on_cuda_bf16(impl):
    """bf16 at a real vocabulary. Tolerances: loss and ce 1e-3 relative; z 2e-2 (liger sums its
    z terms in bf16); gradients 2e-2 of their largest magnitude (bf16 products, different
    summation order)."""
    if impl == "liger":
        pytest.importorskip("liger_kernel")
    g = torch.Generator(device="cuda").manual_seed(0)
    n, v, d = 4096, 32128, 512
    h = (torch.randn(n, d, device="cuda", generator=g)).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[::5] = -100
    ref = run("dense", h, w, y, 1e-4)
    got = run(impl, h, w, y, 1e-4, chunk_size=1024)
    for name, a, b, tol in zip(("loss", "ce", "z", "grad_hidden", "grad_weight"), got, ref,
                               (1e-3, 1e-3, 2e-2, 2e-2, 2e-2)):
        assert rel(a, b) < tol, (impl, name, rel(a, b))
