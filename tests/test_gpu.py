"""The GPU fast paths against the fp32 reference path (issue 8): flex attention with block masks
and T5-bias score_mods in bf16, compiled blocks with selective checkpointing, block masks that
do not recompile per batch, and no host synchronisation inside a forward + backward pass.

Skipped without CUDA (CI has none); run on a lent GPU with `bash bench/device_run.sh` (which
runs this file first) or `python -m pytest -m gpu tests/test_gpu.py`.

Tolerances, bf16 against fp32 on the same weights (bf16 has an 8-bit mantissa, ~4e-3 relative
per rounding; errors grow with depth and the vocabulary's softmax):
  loss: 1e-2 relative; logits: 3e-2 relative in norm; every parameter's gradient: cosine >= 0.99
  and 1e-1 relative in norm. The same eager bf16 model compiled: 1e-2 / 5e-2.
The no-synchronisation test runs the chunked loss: liger-kernel's fused loss calls .item() on the
token count in its forward and compares the incoming gradient with 1 in its backward (two syncs
per micro-batch, its own).
"""
from __future__ import annotations

import pytest
import torch

import model_zoo

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")]

@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test compiles its own kernels: a shared cache would fill up over the cases (8 entries
    per compiled function by default) and silently fall back to eager flex for the later ones."""
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    yield


B, T = 4, 512  # 4 x 4 flex blocks of 128: sparse block masks, partial blocks at segment edges

# name -> (arch, model_zoo overrides); shapes small enough to take seconds, deep enough to accumulate error
CASES = {
    "cd-rope": ("cd", dict(position="rope", mlp="swiglu")),
    "cd-t5bias": ("cd", {}),
    "nd-full": ("nd", {}),
    "nd-mixed_heads": ("nd", dict(bidirectional_mode="mixed_heads")),
    "nd-mixed_layers": ("nd", dict(bidirectional_mode="mixed_layers")),
    "ed-t5bias": ("ed", {}),
}
SHAPE = dict(d_model=256, n_layers=4, n_heads=4, head_dim=64, d_ff=512, vocab_size=4096)


def _batch(arch: str, seed: int, device="cuda") -> dict:
    """Packed rows: 2-4 examples per row, a random bidirectional prefix in each (ND), padding."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(B, T, dtype=torch.long)
    bidir = torch.zeros(B, T, dtype=torch.bool)
    for r in range(B):
        cuts = sorted(torch.randint(32, T - 32, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist())
        edges = [0] + cuts + [T - int(torch.randint(0, 40, (1,), generator=g))]
        for s, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
            seg[r, a:b] = s + 1
            bidir[r, a:a + int(torch.randint(1, max(b - a, 2), (1,), generator=g))] = True
    ids = torch.randint(2, SHAPE["vocab_size"], (B, T), generator=g)
    labels = ids.masked_fill(seg == 0, -100)
    if arch == "ed":
        tgt = T // 4
        out = dict(input_ids=ids, segment_ids=seg, labels=labels[:, :tgt].masked_fill(seg[:, :tgt] == 0, -100),
                   decoder_segment_ids=seg[:, :tgt])
    else:
        out = dict(input_ids=ids, labels=labels.masked_fill(bidir, -100) if arch == "nd" else labels,
                   segment_ids=seg, bidirectional=bidir & (arch == "nd"))
    return {k: v.to(device) for k, v in out.items()}


def _models(arch: str, over: dict):
    torch.manual_seed(0)
    ref = model_zoo.build(arch, "debug", attn_impl="reference", **SHAPE, **over).cuda().float()
    fast = model_zoo.build(arch, "debug", attn_impl="flex", **SHAPE, **over)
    fast.load_state_dict(ref.state_dict())
    return ref, fast.cuda().to(torch.bfloat16)


def _run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.float().item(), (out.logits.float() if out.logits is not None else None), grads


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _compare(fast_run, ref_run, loss_tol, logit_tol, grad_tol, cos_min=0.99):
    (lf, zf, gf), (lr, zr, gr) = fast_run, ref_run
    assert abs(lf - lr) <= loss_tol * abs(lr), (lf, lr)
    if zf is not None and zr is not None:
        assert _rel(zf, zr) <= logit_tol
    assert gf.keys() == gr.keys()
    for n in gr:
        assert torch.isfinite(gf[n]).all(), n
        cos = torch.nn.functional.cosine_similarity(gf[n].flatten(), gr[n].flatten(), dim=0)
        assert cos >= cos_min and _rel(gf[n], gr[n]) <= grad_tol, (n, float(cos), _rel(gf[n], gr[n]))


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_flex_path_matches_the_fp32_reference(case):
    arch, over = CASES[case]
    ref, fast = _models(arch, over)
    batch = _batch(arch, seed=1)
    with torch.no_grad():  # the fp32 reference gives the logits to compare; evaluation computes them
        ref_logits = ref.eval()(**batch).logits.float()
        fast_logits = fast.eval()(**batch).logits.float()
    assert _rel(fast_logits, ref_logits) <= 3e-2
    ref.train(), fast.train()
    _compare(_run(fast, batch), _run(ref, batch), 1e-2, 3e-2, 1e-1)


def test_flex_block_masks_do_not_recompile_per_batch():
    from torch._dynamo.utils import counters

    _, fast = _models("nd", dict(bidirectional_mode="mixed_heads"))
    _run(fast, _batch("nd", seed=1))
    graphs = counters["stats"]["unique_graphs"]
    for seed in (2, 3, 4):  # other prefixes, other packing, same shapes
        _run(fast, _batch("nd", seed=seed))
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("case", ["nd-mixed_layers", "ed-t5bias"])
def test_compiled_blocks_with_selective_checkpointing_match_eager_bf16(case):
    from train.engine.runtime import prepare_blocks

    arch, over = CASES[case]
    _, eager = _models(arch, over)
    _, fast = _models(arch, over)
    prepare_blocks(fast, "selective", compile=True)
    batch = _batch(arch, seed=5)
    for _ in range(2):
        _compare(_run(fast, batch), _run(eager, batch), 1e-2, 5e-2, 5e-2)


@pytest.mark.parametrize("case", ["cd-rope", "nd-mixed_heads", "ed-t5bias"])
def test_no_host_synchronisation_in_forward_and_backward(case):
    arch, over = CASES[case]
    _, fast = _models(arch, over)
    fast.config.loss_impl = "chunked"  # liger's kernel itself synchronises (.item() on the token count)
    batch = _batch(arch, seed=6)
    _run(fast, batch)  # compile first: compilation itself may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fast(**batch)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
