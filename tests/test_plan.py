"""The capacity planner (train/commands/plan/): counts, memory, arithmetic, refusals, JSON.

Every planner number here is compared with something computed independently: models built on
the meta device, DeepSpeed's own ZeRO estimators, the tensors autograd really saves, the state
transformers' Adafactor really keeps, DeepSpeed's pipeline partitioner, or hand arithmetic.
"""
from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import re

import pytest
import torch

import model_zoo
from train.commands import plan
from train import registry
from train.config import load_config


def _unique_params(model) -> int:
    return sum({id(p): p.numel() for p in model.parameters()}.values())


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("arch", ["cd", "nd", "ed"])
def test_param_counts_equal_meta_models_for_every_size(arch):
    from deepspeed.runtime.zero.stage3 import model_to_params

    for size in model_zoo.SIZES:
        config = model_zoo.make_config(arch, size)
        model = model_zoo.build(arch, size, device="meta")
        n = _unique_params(model)
        assert plan.numel(plan.model_shapes(config)) == n == model_zoo.num_params(config), (arch, size)
        assert plan.largest_layer_params(config) == model_to_params(model)[1], (arch, size)
    for alias, key in model_zoo.ALIASES.items():  # 4.8b and 11b are the xxl shape
        assert plan.numel(plan.model_shapes(model_zoo.make_config(arch, alias))) == \
            model_zoo.num_params(model_zoo.make_config(arch, key))
    assert model_zoo.num_params(model_zoo.make_config("cd", "4.8b")) == 4_762_310_656
    assert model_zoo.num_params(model_zoo.make_config("ed", "11b")) == 11_003_736_064


def test_param_counts_follow_options():
    for opts in (dict(tie_embeddings=False), dict(norm="layernorm", mlp="gelu"), dict(position="learned"),
                 dict(position="rope", mlp="swiglu", vocab_size=1000)):
        for arch in ("cd", "ed"):
            model = model_zoo.build(arch, "debug", device="meta", **opts)
            assert plan.numel(plan.model_shapes(model.config)) == _unique_params(model), (arch, opts)


# ------------------------------------------------------------- model states vs DeepSpeed
def _ds_estimates(P, largest, N, stage, off_opt, off_param):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage in (1, 2):  # DeepSpeed's estimator for ZeRO-1 and -2 is this one function
        return estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=N, cpu_offload=off_opt)[1]
    return estimate_zero3_model_states_mem_needs(P, largest, num_gpus_per_node=N, cpu_offload=off_opt,
                                                 cpu_offload_params=off_param)[1]


@pytest.mark.parametrize("stage,off_opt,off_param", [(1, False, False), (1, True, False), (2, False, False),
                                                      (2, True, False), (3, False, False), (3, True, False),
                                                      (3, True, True)])
def test_model_states_agree_with_deepspeed_estimators(stage, off_opt, off_param):
    """Same assumptions as DeepSpeed's estimators: bf16 weights, AdamW (8 bytes of state), fp32
    master, ZeRO's own optimizer (not the `bf16` preset's BF16_Optimizer). Where our count differs
    it is by one documented term each:
      ZeRO-1 keeps full 16-bit gradients (the estimator, shared with ZeRO-2, partitions them):
        + 2P (1 - 1/N) without offload, + 2P with optimizer offload (ZeRO-2 reduces into CPU buffers);
      ZeRO-3 without offload: + 2P/N, the 16-bit gradient partition (stage3.py grad_partitions_flat_buffer).
    """
    for cfg_name in ("xl", "4.8b", "11b"):
        config = model_zoo.make_config("cd" if cfg_name != "11b" else "ed", cfg_name)
        P, largest = model_zoo.num_params(config), plan.largest_layer_params(config)
        for N in (1, 8, 64):
            ms = plan.model_state_bytes(P, zero_stage=stage, dp=N, precision="bf16", optimizer="adamw",
                                        largest_layer=largest, offload_optimizer=off_opt, offload_param=off_param,
                                        sub_group_size=float("inf"))
            ds = _ds_estimates(P, largest, N, stage, off_opt, off_param)
            delta = 0.0
            if stage == 1:
                delta = 2 * P if off_opt else 2 * P * (1 - 1 / N)
            if stage == 3 and not off_opt:
                delta = 2 * P / N
            assert ms.peak == pytest.approx(ds + delta, abs=2.0), (cfg_name, N, stage, off_opt, off_param)
    # the printed "_all_cold" tables say the same as the functions compared above
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        estimate_zero2_model_states_mem_needs_all_cold(4_762_310_656, num_gpus_per_node=8)
    gpu_gb = [float(x) for x in re.findall(r"\|\s*([0-9.]+)GB \|", buf.getvalue())]
    ms = plan.model_state_bytes(4_762_310_656, zero_stage=2, dp=8)
    assert gpu_gb[-1] == pytest.approx(ms.peak / 2 ** 30, abs=0.01)  # offload=none row


def test_model_states_wrapper_table():
    """The wrapper per configuration and its bytes/parameter (module docstring), P = 1e9, N = 4."""
    P, N = 1e9, 4
    ms = plan.model_state_bytes(P, zero_stage=0, dp=N, precision="bf16")  # FP16_UnfusedOptimizer
    assert ms.wrapper == "FP16_UnfusedOptimizer" and ms.persistent == (2 + 2 + 4 + 8) * P and ms.gradients_step == 4 * P
    ms = plan.model_state_bytes(P, zero_stage=0, dp=N, precision="fp32")
    assert ms.wrapper == "none" and ms.peak == (4 + 4 + 8) * P
    ms = plan.model_state_bytes(P, zero_stage=1, dp=N, precision="bf16", grad_accum_dtype="fp32")  # `bf16` preset
    assert ms.wrapper == "BF16_Optimizer" and ms.peak == 2 * P + 4 * P + (4 + 8) * P / N
    ms = plan.model_state_bytes(P, zero_stage=0, dp=N, precision="bf16", pipeline_stages=2, optimizer="adafactor",
                                state_bytes=4 * P)
    assert ms.wrapper == "BF16_Optimizer" and ms.adafactor_flat and ms.peak == 2 * P + 2 * P + (4 + 4) * P / N
    ms = plan.model_state_bytes(P, zero_stage=3, dp=N, offload_optimizer=True, offload_param=True, largest_layer=10)
    assert ms.peak == 40 and ms.host == (2 + 2 + 4 + 4 + 8) * P / N


def test_adafactor_state_equals_transformers_adafactor():
    """Factored: what transformers' Adafactor keeps after a step on the debug model, per parameter;
    flat: what it keeps for one 1-D partition (DeepSpeed ZeRO >= 1)."""
    from transformers.optimization import Adafactor

    for beta1 in (None, 0.9):
        model = model_zoo.build("ed", "debug")
        opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=True, beta1=beta1)
        sum(p.float().pow(2).sum() for p in model.parameters()).backward()
        opt.step()
        kept = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                   if torch.is_tensor(v) and v.dim() > 0)
        assert plan.adafactor_state_bytes(plan.model_shapes(model.config), flat=False, beta1=beta1 is not None) == kept
        flat = torch.nn.Parameter(torch.zeros(1000))
        opt = Adafactor([flat], lr=1e-3, relative_step=False, beta1=beta1)
        flat.grad = torch.ones(1000)
        opt.step()
        kept = sum(v.numel() * v.element_size() for v in opt.state[flat].values() if torch.is_tensor(v) and v.dim() > 0)
        assert plan.adafactor_state_bytes([(1000,)], flat=True, beta1=beta1 is not None) == kept


# --------------------------------------------------------------------------- activations
def _saved_bytes(model, run) -> int:
    """Bytes of the non-parameter tensors autograd saves during `run()` (each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        k = t.untyped_storage().data_ptr()
        if k not in params:
            seen[k] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_activations_equal_autograd_saved_tensors(dtype):
    """The per-block formula is exact against what autograd keeps (CPU SDPA flash kernel with a
    plain causal mask, which saves what the GPU kernels save: q, k, v, output, log-sum-exp)."""
    a = 2 if dtype == torch.bfloat16 else 4
    B, T, Ti = 2, 32, 48
    for arch, mlp in (("cd", "geglu"), ("cd", "gelu"), ("ed", "geglu")):
        model = model_zoo.build(arch, "debug", position="none", mlp=mlp, attn_impl="sdpa").to(dtype)
        stack = model.decoder if arch == "ed" else model.model
        x = torch.randn(B, T, model.config.d_model, dtype=dtype, requires_grad=True)
        kw = {}
        if arch == "ed":
            enc = torch.randn(B, Ti, model.config.d_model, dtype=dtype, requires_grad=True)
            kw = dict(encoder_hidden=enc, encoder_segments=None, cross_segments=None)
        ctx = stack.build_context(x, segments=None, positions=torch.arange(T).expand(B, T), bidirectional=None,
                                  offset=0, **kw)
        n, _, seen = _saved_bytes(model, lambda: stack.layers[0](x, ctx, 0))
        if arch == "ed":
            n -= seen.get(enc.untyped_storage().data_ptr(), 0)  # the encoder output is the stack's, not the block's
        assert plan.layer_activation_bytes(model.config, T, B, a, cross_tokens=Ti if arch == "ed" else 0) == n, (arch, mlp)


def _debug_inputs(arch: str, B: int, T: int = 32, Ti: int = 40) -> tuple[dict, "registry.Lengths"]:
    """Random model inputs for a debug-size model and the row lengths the planner is given."""
    if arch == "ed":
        kw = dict(input_ids=torch.randint(2, 500, (B, Ti)), labels=torch.randint(2, 500, (B, T)))
        return kw, registry.Lengths(decoder=T, encoder=Ti)
    ids = torch.randint(2, 500, (B, T))
    return dict(input_ids=ids, labels=ids), registry.Lengths(decoder=T)


@pytest.mark.parametrize("arch", ["cd", "ed"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_model_activations_close_to_autograd_saved_tensors(arch, z_loss):
    """Whole model incl. final norms and the logits the output keeps (the dense loss): within 1%
    (the formula ignores integer labels and the decoder's one-token shift of the loss). z-loss:
    logsumexp keeps its fp32 input, a copy except for an fp32 ED model's own logits."""
    for dtype, precision in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        model = model_zoo.build(arch, "debug", position="none", attn_impl="sdpa", z_loss=z_loss).to(dtype)
        B = 2
        kw, lengths = _debug_inputs(arch, B)
        n, out, seen = _saved_bytes(model, lambda: model(**kw))
        if out.logits.untyped_storage().data_ptr() not in seen:
            n += out.logits.untyped_storage().nbytes()  # kept by the output until the backward
        pred = plan.activation_bytes(model.config, lengths, B, precision, False,
                                     range(len(plan.param_shapes(model.config))), device="cpu")  # auto: dense
        assert pred["saved"] == pytest.approx(n, rel=0.01), (arch, precision)


class _Alive:
    """What a forward pass leaves alive, exactly: a dispatch mode records the storage of every
    tensor an aten op returns inside it (below autograd, so it sees the ops that checkpointed
    blocks run and the outputs selective checkpointing caches); `bytes()` sums those storages
    still alive, each once, parameters and `exclude` (tensors) not counted. With peak=True,
    `peak` is the most bytes alive after any op (what the forward's transients add on top)."""

    def __init__(self, model, peak: bool = False):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.refs: dict = {}
        self.peak = 0
        refs, outer = self.refs, self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        st, old = t.untyped_storage(), refs.get(t.untyped_storage().data_ptr())
                        if old is None or old[0].expired():  # a freed storage's address is reused
                            refs[st.data_ptr()] = (StorageWeakRef(st), st.nbytes(), str(func))
                if peak:
                    now = sum(v[1] for k, v in refs.items() if k not in outer.params and not v[0].expired())
                    outer.peak = max(outer.peak, now)
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def alive(self, exclude=()) -> dict:
        gc.collect()
        skip = self.params | {t.untyped_storage().data_ptr() for t in exclude}
        return {k: v for k, v in self.refs.items() if k not in skip and not v[0].expired()}

    def bytes(self, exclude=()) -> int:
        return sum(v[1] for v in self.alive(exclude).values())


# (arch, mlp, position, attn_impl): plain causal flash SDPA as on GPUs, RoPE, the ungated MLP,
# the ED decoder block with cross-attention, and the reference (bmm) attention
SELECTIVE_CASES = [("cd", "geglu", "none", "sdpa"), ("cd", "swiglu", "rope", "sdpa"), ("cd", "gelu", "none", "sdpa"),
                   ("ed", "geglu", "none", "sdpa"), ("cd", "geglu", "rope", "reference")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_checkpointed_block_keeps_what_the_formula_says(policy, dtype):
    """A block run as the trainer runs it (train.engine.runtime.prepare_blocks: non-reentrant
    torch.utils.checkpoint, with the selective policy's cache of matmul and attention-kernel
    outputs) leaves alive exactly the formula's bytes: full = its input; selective = its input +
    layer_selective_bytes. Measured with _Alive: every storage created during the forward that
    the autograd graph (or the checkpoint's cache) still holds; the block's input is made inside
    the measurement and dropped by the test, so only the checkpoint can keep it."""
    from train.engine.runtime import prepare_blocks

    a = 2 if dtype == torch.bfloat16 else 4
    B, T, Ti = 2, 32, 48
    for arch, mlp, position, impl in SELECTIVE_CASES:
        torch.manual_seed(0)
        model = model_zoo.build(arch, "debug", position=position, mlp=mlp, attn_impl=impl).to(dtype)
        assert prepare_blocks(model, policy) > 0
        stack = model.decoder if arch == "ed" else model.model
        x0 = torch.randn(B, T, model.config.d_model, dtype=dtype, requires_grad=True)
        kw = {}
        if arch == "ed":  # the encoder output is the stack's (counted once, as the final norm's output)
            enc = torch.randn(B, Ti, model.config.d_model, dtype=dtype, requires_grad=True)
            kw = dict(encoder_hidden=enc, encoder_segments=None, cross_segments=None)
        ctx = stack.build_context(x0, segments=None, positions=torch.arange(T).expand(B, T), bidirectional=None,
                                  offset=0, **kw)
        with _Alive(model) as m:
            x = x0 * 1.0  # the block's input, made here: alive afterwards only if the checkpoint keeps it
            y = stack.layers[0](x, ctx, 0)
            del x
        # not the block's: its output (the next block's input) and what came in from outside
        measured = m.bytes(exclude=[y, x0] + list(kw.values())[:1] + list(ctx.rope or ()))
        cross = Ti if arch == "ed" else 0
        pred = a * B * T * model.config.d_model
        if policy == "selective":
            pred += plan.layer_selective_bytes(model.config, T, B, a, cross_tokens=cross,
                                               dense_attention=impl == "reference")[0]
        assert measured == pred, (arch, mlp, position, impl, policy, measured, pred)
        y.float().pow(2).sum().backward()  # and the block still trains
        assert x0.grad is not None and all(p.grad is not None for p in stack.layers[0].parameters())


@pytest.mark.parametrize("policy", ["none", "full", "selective"])
@pytest.mark.parametrize("arch", ["cd", "ed"])
def test_checkpointed_model_activations_close_to_what_stays_alive(arch, policy):
    """The whole model with its blocks prepared as the trainer prepares them, the logits kept by
    the output: activation_bytes(..., policy)["saved"] within 1.5% of what _Alive measures after
    the forward. What the formula leaves out is a few KB whatever the policy (integer labels,
    position tensors; the decoder's loss runs over T - 1 rows, the formula counts T), so the
    smallest total (full checkpointing, bf16) is the furthest off. Seen (debug shapes, B 2, T 32):
    CD selective +0.46% fp32 / +0.75% bf16, full +0.90% / +1.27%, none +0.34% / +0.55%; ED within
    -0.34% .. -0.05%."""
    from train.engine.runtime import prepare_blocks

    for dtype, precision in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        torch.manual_seed(0)
        model = model_zoo.build(arch, "debug", position="none", attn_impl="sdpa").to(dtype)
        prepare_blocks(model, policy)
        B = 2
        kw, lengths = _debug_inputs(arch, B)
        with _Alive(model) as m:
            out = model(**kw)
        measured = m.bytes()
        layers = range(len(plan.param_shapes(model.config)))
        pred = plan.activation_bytes(model.config, lengths, B, precision, policy, layers, device="cpu")
        assert pred["saved"] == pytest.approx(measured, rel=0.015), (arch, precision, measured, pred["saved"])
        out.loss.backward()


@pytest.mark.parametrize("arch,tied", [("cd", True), ("cd", False), ("ed", True)])
def test_fused_loss_keeps_two_gradients_and_one_chunk(arch, tied):
    """model.loss_impl=chunked (model_zoo/loss.py) on CPU, as CUDA's auto runs it: no logits; the
    forward leaves grad_hidden (a N D) and grad_weight (a V D) for the backward, and the norm before
    the head no longer keeps its output. Saved (what stays alive after the forward) within 1% of
    activation_bytes; working (the most alive during the forward - what stays) within 2% of
    head_loss_bytes' working, for one chunk, several chunks with an uneven last one, fp32 and
    bf16, tied (t5x-rescaled head input) and untied heads. The few KB the formula leaves out are
    the integer labels (shifted, clamped) and masks."""
    for dtype, precision in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        a = 2 if dtype == torch.bfloat16 else 4
        for chunk in (1024, 24):
            torch.manual_seed(0)
            model = model_zoo.build(arch, "debug", position="none", attn_impl="sdpa", loss_impl="chunked",
                                    loss_chunk_size=chunk, tie_embeddings=tied).to(dtype)
            B = 2
            kw, lengths = _debug_inputs(arch, B)
            with _Alive(model, peak=True) as m:
                out = model(**kw)
            assert out.logits is None  # the fused path ran
            saved = m.bytes()
            layers = range(len(plan.param_shapes(model.config)))
            pred = plan.activation_bytes(model.config, lengths, B, precision, "none", layers, device="cpu")
            assert pred["saved"] == pytest.approx(saved, rel=0.01), (precision, chunk, saved, pred["saved"])
            T = lengths.decoder
            head = plan.head_loss_bytes(model.config, B * T, a, "chunked")
            assert head["saved"] == a * B * T * 64 + a * 512 * 64
            # + up to 2 KiB: a chunk's per-row fp32 vectors (lse, row weights, gathered logits),
            # tens of bytes per row, not modelled
            assert head["working"] == pytest.approx(m.peak - saved, rel=0.02, abs=2048), \
                (precision, chunk, m.peak - saved)
            assert pred["working"] >= head["working"]
            out.loss.backward()
    # the planner resolves auto as a CUDA model does; dense keeps the logits, fused does not
    config = model_zoo.make_config("cd", "4.8b")
    L, layers = registry.Lengths(decoder=626), range(len(plan.param_shapes(config)))
    fused = plan.activation_bytes(config, L, 8, "bf16", "none", layers)
    assert plan.resolve_loss_impl("auto", "cuda") in ("chunked", "liger")
    assert plan.resolve_loss_impl("auto", "cpu") == "dense"
    dense = plan.activation_bytes(config, L, 8, "bf16", "none", layers, device="cpu")
    N, V, D = 8 * 626, config.vocab_size, config.d_model
    # logits + fp32 log-softmax, against grad_weight (grad_hidden replaces the norm's kept output)
    assert dense["saved"] - fused["saved"] == pytest.approx((2 + 4) * N * V - 2 * V * D)
    with pytest.raises(ValueError, match="choose one of auto, dense, chunked, liger"):
        plan.resolve_loss_impl("fused")
    # an ED decoder of 114 tokens x 4 rows (< d_model): auto stays dense on CUDA too, as the model does
    assert plan.resolve_loss_impl("auto", "cuda", 4 * 114, config.d_model) == "dense"
    ed = model_zoo.make_config("ed", "11b")
    Led = registry.Lengths(decoder=114, encoder=512)
    layers_ed = range(len(plan.param_shapes(ed)))
    assert plan.activation_bytes(ed, Led, 4, "bf16", "none", layers_ed) == \
        plan.activation_bytes(ed, Led, 4, "bf16", "none", layers_ed, device="cpu")


def test_loss_impl_in_plan_output_and_memory(capsys):
    """The plan says which loss it planned (auto resolved for CUDA), and a fused loss moves the
    head's bytes: the reference CD 4.8B row (micro-batch 8, z-loss) keeps 1.5 GiB less with it."""
    args = ["model.size=4.8b", "model.z_loss=1e-4", "parallel.micro_batch_size=8", "schedule.max_steps=1"]
    fused, dense = _plan(args, gpus=8), _plan(args + ["model.loss_impl=dense"], gpus=8)
    assert fused["model"]["loss_impl"] == "auto" and fused["model"]["loss_impl_resolved"] in ("chunked", "liger")
    assert dense["model"]["loss_impl_resolved"] == "dense"
    N, V, D = 8 * 626, 32128, 4096
    diff = dense["memory"]["stages"][0]["activations_saved_per_micro_batch"] - \
        fused["memory"]["stages"][0]["activations_saved_per_micro_batch"]
    assert diff == pytest.approx(((2 + 4 + 4) * N * V - 2 * V * D) / 2 ** 30)
    assert plan.main(args + ["model.loss_impl=chunked", "model.overrides.loss_chunk_size=512", "--gpus", "8"]) in (0, 1)
    assert "loss chunked, chunks of 512 rows" in capsys.readouterr().out
    assert plan.main(args + ["model.loss_impl=fused"]) == 2
    err = capsys.readouterr().err
    assert "model.loss_impl" in err and len(err.strip().splitlines()) == 1


def test_activation_checkpointing_keeps_block_inputs_only():
    config = model_zoo.make_config("cd", "4.8b", loss_impl="dense")  # the logits head (CUDA's auto fuses it)
    L = registry.Lengths(decoder=626)
    layers = range(len(plan.param_shapes(config)))
    full = plan.activation_bytes(config, L, 4, "bf16", False, layers)
    ckpt = plan.activation_bytes(config, L, 4, "bf16", True, layers)
    block = plan.layer_activation_bytes(config, 626, 4, 2)
    head_and_norm = full["saved"] - 24 * block
    assert ckpt["saved"] == pytest.approx(head_and_norm + 24 * 2 * 4 * 626 * 4096)
    assert ckpt["working"] == 2 * block and full["working"] == max(block, (4 + 2) * 4 * 626 * config.vocab_size)
    assert plan.activation_bytes(config, L, 4, "bf16", "full", layers) == ckpt  # True is "full"
    # selective: the input + the matmul and attention-kernel outputs; the backward recomputes the rest
    sel = plan.activation_bytes(config, L, 4, "bf16", "selective", layers)
    kept, shared = plan.layer_selective_bytes(config, 626, 4, 2)
    B, T, D, I, F, H = 4, 626, 4096, 64 * 64, config.d_ff, 64
    assert (config.n_heads * config.head_dim, config.d_model, config.n_heads) == (I, D, H)
    assert kept == 2 * B * T * (3 * I + D) + 2 * B * T * I + 4 * B * H * T + 2 * B * T * (2 * F + D)
    assert sel["saved"] == pytest.approx(head_and_norm + 24 * (2 * B * T * D + kept))
    assert sel["working"] == 2 * block - shared
    assert ckpt["saved"] < sel["saved"] < full["saved"]
    with pytest.raises(ValueError, match="choose one of none, full, selective"):
        plan.activation_bytes(config, L, 4, "bf16", "partial", layers)


# ------------------------------------------------------------ pipeline and batch arithmetic
def test_pipeline_bubble_by_hand():
    assert plan.pipeline_bubble(1, 8) == 0
    assert plan.pipeline_bubble(2, 1) == 0.5
    assert plan.pipeline_bubble(4, 8) == 3 / 11
    assert plan.pipeline_bubble(8, 64) == 7 / 71


def test_partition_equals_deepspeed():
    from deepspeed.runtime.utils import partition_balanced

    for weights, parts in (([1, 2, 3, 4, 5, 6], 3), ([10, 1, 1, 1, 1, 10], 2), ([5, 5], 4), ([3, 1, 4, 1, 5, 9, 2, 6], 4)):
        assert plan.partition_balanced(weights, parts) == list(partition_balanced(weights, parts))
    for arch, size in (("cd", "4.8b"), ("ed", "11b")):
        counts = [plan.numel(s) for s in plan.param_shapes(model_zoo.make_config(arch, size))]
        for s in (2, 4, 8):
            assert plan.pipeline_parts(model_zoo.make_config(arch, size), s) == list(partition_balanced(counts, s))


def _plan(overrides, **kw):
    return plan.plan(None, overrides, **kw)


def test_batch_arithmetic_and_in_flight_micro_batches_by_hand():
    # 8 GPUs = 2 stages x 4 data-parallel; 64 rows = micro 4 x accumulation 4 x dp 4
    p = _plan(["model.size=tiny", "parallel.pipeline_stages=2", "parallel.micro_batch_size=4",
               "parallel.global_batch_size=64", "schedule.train_tokens=1000000"], gpus=8, mfu=0.5)
    par, t = p["parallel"], p["time"]
    assert (par["data_parallel"], par["gradient_accumulation_steps"], par["global_batch_size"]) == (4, 4, 64)
    assert t["tokens_per_step"] == 64 * 626 and t["max_steps"] == math.ceil(1e6 / (64 * 626)) == 25
    assert t["pipeline_bubble"] == 1 / 5
    assert [s["micro_batches_in_flight"] for s in p["memory"]["stages"]] == [2, 1]
    # step time = FLOPs / (GPUs x MFU x peak) / (1 - bubble) + communication
    flops = model_zoo.train_flops(model_zoo.make_config("cd", "tiny"), 626) * 64
    assert t["flops_per_step"] == pytest.approx(flops)
    assert t["compute_seconds"] == pytest.approx(flops / 8 / (0.5 * 989e12) / (1 - 1 / 5))
    assert t["gpu_hours"] == pytest.approx(25 * t["step_seconds"] * 8 / 3600)
    p = _plan(["model.size=tiny", "parallel.pipeline_stages=4", "parallel.micro_batch_size=1",
               "parallel.gradient_accumulation_steps=2", "schedule.max_steps=10"], gpus=4, mfu=0.5)
    assert [s["micro_batches_in_flight"] for s in p["memory"]["stages"]] == [2, 2, 2, 1]
    assert p["time"]["pipeline_bubble"] == 3 / 5


def test_comm_by_hand():
    """ZeRO-2 on 8 GPUs in one node: per micro-batch a reduce-scatter and one all-gather, bf16."""
    p = _plan(["model.size=tiny", "parallel.zero_stage=2", "parallel.micro_batch_size=2",
               "parallel.gradient_accumulation_steps=3", "schedule.max_steps=1"], gpus=8, mfu=0.5)
    P = model_zoo.num_params(model_zoo.make_config("cd", "tiny"))
    assert p["time"]["comm_bytes_per_gpu"] == pytest.approx((3 + 1) * 7 / 8 * 2 * P)
    assert p["time"]["comm_seconds"] == pytest.approx((3 + 1) * 7 / 8 * 2 * P / 450e9)


# ------------------------------------------------------------------- refusals and fixes
def test_ed_11b_adamw_zero0_on_one_80gb_gpu_is_refused_with_the_fix(capsys):
    args = ["model.arch=ed", "model.size=11b", "objective.name=mlm", "optim.name=adamw", "parallel.micro_batch_size=4",
            "schedule.max_steps=100"]
    p = _plan(args, gpus=1, gpu="h100-80gb")
    assert not p["memory"]["fits"]
    # 16 bytes/parameter of AdamW states alone: weights 2 + grads 2 + master 4 + moments 8
    assert p["memory"]["stages"][0]["optimizer_states"] == pytest.approx(8 * 11_003_736_064 / 2 ** 30)
    fix = p["fix"]
    assert fix["change"] and fix["peak_gib"] <= p["memory"]["usable_gib"]
    fixed = _plan(args + fix["overrides"], gpus=1, gpu="h100-80gb", fix=False)
    assert fixed["memory"]["fits"]
    assert plan.main(args + ["--gpus", "1"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "fix: " in out and fix["change"] in out


def test_fix_order_prefers_the_cheapest_change():
    # CD 4.8B AdamW on 8 x 80GB: ZeRO-0 needs 16 B/param (71 GiB + activations): ZeRO-1 is the first fix
    p = _plan(["model.size=4.8b", "parallel.micro_batch_size=1", "schedule.max_steps=1"], gpus=8)
    assert not p["memory"]["fits"] and p["fix"]["change"] == "parallel.zero_stage=1"
    # an activation-bound run: micro-batch first (ZeRO does not shrink activations)
    p = _plan(["model.size=xl", "parallel.micro_batch_size=64", "schedule.max_steps=1"], gpus=8)
    assert not p["memory"]["fits"] and p["fix"]["change"] == "parallel.micro_batch_size=32"
    assert "parallel.global_batch_size=512" in p["fix"]["overrides"]  # the global batch is kept


def test_fix_tries_selective_checkpointing_before_full():
    """Long rows of CD 4.8B at micro-batch 1 (ZeRO-2, 8 GPUs): activation-bound, so checkpointing
    is the first fix; at 16k tokens selective fits and is chosen (less recompute than full), at
    32k only full fits; a run already selective is offered full."""
    base = ["model.size=4.8b", "parallel.micro_batch_size=1", "parallel.zero_stage=2", "schedule.max_steps=1"]
    p = _plan(base + ["objective.seq_length=16384"], gpus=8)
    fix = p["fix"]
    assert not p["memory"]["fits"]
    assert fix["change"] == "parallel.activation_checkpointing=true parallel.checkpoint_policy=selective"
    fixed = _plan(base + ["objective.seq_length=16384"] + fix["overrides"], gpus=8, fix=False)
    assert fixed["memory"]["fits"] and fixed["parallel"]["checkpoint_policy"] == "selective"
    full = _plan(base + ["objective.seq_length=16384", "parallel.activation_checkpointing=true"], gpus=8, fix=False)
    assert full["memory"]["peak_gib"] < fixed["memory"]["peak_gib"]  # full keeps less ...
    assert fixed["time"]["step_seconds"] < full["time"]["step_seconds"]  # ... and costs more time

    p = _plan(base + ["objective.seq_length=32768"], gpus=8)
    assert p["fix"]["change"] == "parallel.activation_checkpointing=true parallel.checkpoint_policy=full"
    p = _plan(base + ["objective.seq_length=32768", "parallel.activation_checkpointing=true",
                      "parallel.checkpoint_policy=selective"], gpus=8)
    assert p["fix"]["change"] == "parallel.activation_checkpointing=true parallel.checkpoint_policy=full"
    assert p["fix"]["overrides"][-1] == "parallel.checkpoint_policy=full"


def test_checkpoint_policy_in_time_output_and_json(tmp_path, capsys):
    """The recompute factor follows the policy (none 1, full 4/3, selective SELECTIVE_RECOMPUTE),
    divided by the one the bench/ MFU was measured with; the policy is printed and in the JSON."""
    args = ["model.size=tiny", "schedule.max_steps=1"]
    ac = ["parallel.activation_checkpointing=true"]
    t = {pol: _plan(args + ac + [f"parallel.checkpoint_policy={pol}"], mfu=0.5)["time"]
         for pol in ("full", "selective")}
    t["none"] = _plan(args, mfu=0.5)["time"]
    assert t["none"]["recompute_factor"] == 1.0 and t["full"]["recompute_factor"] == pytest.approx(4 / 3)
    assert t["selective"]["recompute_factor"] == plan.SELECTIVE_RECOMPUTE == plan.recompute_factor("selective")
    assert 1 < plan.SELECTIVE_RECOMPUTE < 1.1
    assert t["selective"]["compute_seconds"] == pytest.approx(t["none"]["compute_seconds"] * plan.SELECTIVE_RECOMPUTE)
    # an MFU measured with selective checkpointing already includes its recompute
    (tmp_path / "RESULTS.md").write_text("| gpu | arch | mfu | checkpointing |\n|---|---|---|---|\n"
                                         "| H100 | cd | 40% | selective |\n")
    p = _plan(args + ac + ["parallel.checkpoint_policy=selective"], bench_dir=tmp_path)
    assert p["time"]["recompute_factor"] == 1.0 and p["time"]["mfu_checkpoint_policy"] == "selective"
    p = _plan(args + ac, bench_dir=tmp_path)
    assert p["time"]["recompute_factor"] == pytest.approx(4 / 3 / plan.SELECTIVE_RECOMPUTE)
    with pytest.raises(ValueError, match="choose one of none, full, selective"):
        plan.recompute_factor("some")

    assert plan.main(args + ac + ["parallel.checkpoint_policy=selective", "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "activation checkpointing selective" in out and "recompute (selective checkpointing)" in out
    assert plan.main(args + ["--json"]) == 0
    par = json.loads(capsys.readouterr().out)["parallel"]
    assert par["activation_checkpointing"] is False and par["checkpoint_policy"] == "none"
    assert plan.main(args + ["parallel.checkpoint_policy=partial"]) == 2  # one-line config error
    assert "checkpoint_policy" in capsys.readouterr().err


def test_factored_adafactor_is_kept_or_the_reason_given():
    """ED 11B with Adafactor on one H100: nothing keeps Adafactor factored (ZeRO >= 1 and bf16
    pipelines flatten it), so no fix, and the reason says how to accept the flat variant."""
    p = _plan(["model.arch=ed", "model.size=11b", "objective.name=mlm", "optim.name=adafactor",
               "parallel.micro_batch_size=1", "schedule.max_steps=1"], gpus=1)
    assert not p["memory"]["fits"] and p["fix"]["change"] is None
    assert "allow_flat_adafactor" in p["fix"]["reason"]
    # the same on one H200 (141 GB) fits factored at ZeRO-0, as issue 9 expects of the 11B preset
    p = _plan(["model.arch=ed", "model.size=11b", "objective.name=mlm", "optim.name=adafactor",
               "parallel.micro_batch_size=1", "schedule.max_steps=1"], gpus=1, gpu="h200")
    assert p["memory"]["fits"] and not p["warnings"]


def test_bf16_pipeline_flattens_adafactor_and_says_so():
    # the config refuses it (flat partitions) unless allowed; allowed, the plan counts and says it
    with pytest.raises(plan.PlanError, match="bf16 with pipeline stages"):
        _plan(["model.size=tiny", "optim.name=adafactor", "parallel.pipeline_stages=2", "schedule.max_steps=1"], gpus=2)
    p = _plan(["model.size=tiny", "optim.name=adafactor", "parallel.pipeline_stages=2", "schedule.max_steps=1",
               "optim.allow_flat_adafactor=true"], gpus=2)
    assert p["parallel"]["optimizer_wrapper"] == "BF16_Optimizer" and p["warnings"]
    p = _plan(["model.size=tiny", "optim.name=adafactor", "parallel.precision=fp32", "parallel.pipeline_stages=2",
               "schedule.max_steps=1"], gpus=2)
    assert p["parallel"]["optimizer_wrapper"] == "none" and not p["warnings"]


def test_config_errors_are_one_line():
    with pytest.raises(plan.PlanError, match="ZeRO stage 2 with parallel.pipeline_stages=2"):
        _plan(["parallel.zero_stage=2", "parallel.pipeline_stages=2", "schedule.max_steps=1"], gpus=2)
    with pytest.raises(plan.PlanError, match="no training length"):
        _plan([], gpus=1)
    assert plan.main(["model.arch=ed", "schedule.max_steps=1"]) == 2  # ED with flm: a one-line error


# ------------------------------------------------------------------------------ MFU, JSON
def test_mfu_from_bench_when_the_device_matches(tmp_path):
    (tmp_path / "RESULTS.md").write_text("| gpu | arch | size | mfu |\n|---|---|---|---|\n| NVIDIA H100 80GB HBM3 | cd | 4.8b | 47% |\n")
    (tmp_path / "a100.json").write_text(json.dumps([{"device": "A100-SXM4-80GB", "mfu": 0.33, "arch": "ed"}]))
    args = ["model.size=tiny", "schedule.max_steps=1"]
    assert _plan(args, bench_dir=tmp_path)["time"]["mfu"] == 0.47
    assert _plan(args, gpu="a100-80gb", bench_dir=tmp_path)["time"]["mfu"] == 0.33
    p = _plan(args, gpu="h200", bench_dir=tmp_path)
    assert p["time"]["mfu"] == plan.DEFAULT_MFU and "assumed" in p["time"]["mfu_source"]


def test_mfu_from_a_bench_json_run(tmp_path):
    """`python -m bench --json` output dropped under bench/: its archscale rows give the MFU (model
    TFLOP/s over the datasheet peak), matched by arch; smoke (CPU) runs and other rows are ignored."""
    def row(name, tflops, checkpointing="none"):
        return {"group": "archscale", "name": name, "shape": "", "ms": 1.0, "tflops": tflops,
                "checkpointing": checkpointing}

    (tmp_path / "run.json").write_text(json.dumps({
        "env": {"device": "NVIDIA H100 80GB HBM3", "smoke": False},
        "rows": [{"group": "peak", "name": "matmul", "shape": "", "ms": 1.0, "tflops": 791.0},
                 row("CD:FLM", 494.5), row("ED:MLM", 395.6), row("CD:FLM selective AC", 400.0, "selective")]}))
    (tmp_path / "smoke.json").write_text(json.dumps({"env": {"device": "NVIDIA H100", "smoke": True},
                                                     "rows": [row("ND:PLM", 900.0)]}))
    ed = plan.measured_mfu("h100-80gb", "ed", "11b", bench_dir=tmp_path)
    assert ed["mfu"] == pytest.approx(395.6 / 989.0) and ed["checkpoint_policy"] == "none"
    cd = plan.measured_mfu("h100-80gb", "cd", "4.8b", bench_dir=tmp_path)
    assert cd["mfu"] in (pytest.approx(0.5), pytest.approx(400.0 / 989.0))
    nd = plan.measured_mfu("h100-80gb", "nd", "4.8b", bench_dir=tmp_path)  # no ND row: another arch's, not the smoke one
    assert nd["mfu"] != pytest.approx(900.0 / 989.0)
    assert plan.measured_mfu("a100-80gb", "cd", "4.8b", bench_dir=tmp_path) is None


def test_json_round_trips(capsys):
    args = ["model.arch=nd", "model.size=small", "objective.name=plm", "parallel.zero_stage=1",
            "schedule.train_tokens=1e9", "--gpus", "4", "--gpu", "a100-40gb", "--json", "--mfu", "0.3"]
    assert plan.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    direct = _plan(args[:5], gpus=4, gpu="a100-40gb", mfu=0.3)
    assert printed == json.loads(json.dumps(direct))
    assert json.loads(json.dumps(printed)) == printed
    assert printed["memory"]["fits"] and printed["parallel"]["zero_stage"] == 1


def test_reference_plan_shape():
    ref = plan.reference_plan(64, "h100-80gb", mfu=0.4)
    rows = {r["run"]: r for r in ref["rows"]}
    assert rows["ED:FLM"]["status"].startswith("not available")
    ok = [r for r in ref["rows"] if r["status"] == "ok"]
    assert len(ok) == 8 + 3 + 1 + 9  # pretraining cells, LM-A of the 3 MLM models, NC-A, MT-F of each pretrained + NC-A
    assert ref["total_gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for r in ok))
    assert all(r["peak_gib"] <= 80 * 0.9 for r in ok)
    assert rows["CD:FLM"]["tokens"] >= 168e9 and rows["CD:FLM -> NC-A (ND:MLM)"]["tokens"] >= 51e9


# ------------------------------------------------------------------------------ any GPU (issue 31 item 3)
NEW_GPUS = ["b200", "gb200", "mi300x", "l40s", "a10g", "v100-16gb", "v100-32gb"]


@pytest.mark.parametrize("gpu", NEW_GPUS)
def test_every_new_gpu_plans_debug_fits_and_the_48b_verdict_follows_its_memory(gpu):
    g = plan.get_gpu(gpu)
    assert g.source and g.memory_gib > 0 and (g.peak_tflops or g.fp32_tflops)
    debug = _plan(["model.size=debug", "schedule.max_steps=10"], gpu=gpu)
    assert debug["memory"]["fits"] and debug["hardware"]["gpu"] == gpu
    assert debug["hardware"]["memory_gib"] == g.memory_gib
    big = _plan(["model.size=4.8b", "schedule.max_steps=1"], gpus=8, gpu=gpu, fix=False)
    # 4.8B at ZeRO-0 needs ~92 GiB per GPU in bf16 (more in fp32): only the >= 179 GiB GPUs hold it
    assert big["memory"]["fits"] == (g.memory_gib * 0.9 > big["memory"]["peak_gib"])
    assert big["memory"]["fits"] == (gpu in ("b200", "gb200", "mi300x"))


def test_normalise_device_knows_the_new_gpus():
    for text, name in [("NVIDIA B200", "b200"), ("NVIDIA GB200", "gb200"), ("AMD Instinct MI300X", "mi300x"),
                       ("NVIDIA L40S", "l40s"), ("NVIDIA A10G", "a10g"), ("Tesla V100-SXM2-16GB", "v100-16gb"),
                       ("Tesla V100-SXM2-32GB", "v100-32gb"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
                       ("NVIDIA H100 80GB HBM3", "h100-80gb")]:
        assert plan.normalise_device(text) == name, text
    assert plan.normalise_device("NVIDIA L40") is None  # not an L40S


def test_v100_plans_in_fp32_at_the_fp32_peak_and_says_so(capsys):
    args = ["model.size=small", "schedule.max_steps=10"]
    v, h = _plan(args, gpu="v100-16gb", mfu=0.4), _plan(args, gpu="a100-80gb", mfu=0.4)
    assert v["parallel"]["precision"] == "fp32" and h["parallel"]["precision"] == "bf16"
    assert v["hardware"]["peak_tflops"] == 15.7 and v["hardware"]["bf16_tflops"] is None
    t = v["time"]  # compute at the fp32 peak: FLOPs / (MFU x 15.7 TFLOP/s)
    assert t["compute_seconds"] == pytest.approx(t["flops_per_step"] / (0.4 * 15.7e12))
    # fp32 sizes: 4-byte weights (ZeRO-0, no optimizer wrapper) against bf16's 2
    assert v["memory"]["stages"][0]["weights"] == pytest.approx(2 * h["memory"]["stages"][0]["weights"])
    assert "v100-16gb has no bf16: planned in fp32 at 15.7 TFLOP/s" in v["hardware"]["precision_note"]
    assert h["hardware"]["precision_note"] is None
    assert plan.main(args + ["--gpu", "v100-16gb"]) == 0
    out = capsys.readouterr().out
    precision = [line for line in out.splitlines() if line.startswith("precision")]
    assert len(precision) == 1 and "no fp16 path" in precision[0]
    assert "15.7 TFLOP/s fp32 dense" in out
    assert plan.main(args + ["--gpu", "v100-16gb", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["hardware"]["precision"] == printed["parallel"]["precision"] == "fp32"
    assert printed["hardware"]["precision_note"].startswith("v100-16gb has no bf16")


def test_bf16_on_a_gpu_without_it_is_refused_in_one_line_with_the_fix(capsys):
    with pytest.raises(plan.PlanError, match="parallel.precision=bf16 on v100-32gb, which has no bf16.*precision=fp32"):
        _plan(["model.size=debug", "schedule.max_steps=1", "parallel.precision=bf16"], gpu="v100-32gb")
    with pytest.raises(plan.PlanError, match="ds_preset=bf16 .*no bf16.*preset without bf16"):
        _plan(["model.size=debug", "schedule.max_steps=1", "parallel.ds_preset=bf16"], gpu="v100-16gb")
    assert plan.main(["model.size=debug", "schedule.max_steps=1", "--gpu", "v100-16gb",
                      "parallel.precision=bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "set parallel.precision=fp32" in err


def test_explicit_fp32_on_a_bf16_gpu_uses_its_fp32_peak():
    p = _plan(["model.size=debug", "schedule.max_steps=1", "parallel.precision=fp32"], gpu="h100-80gb")
    assert p["hardware"]["peak_tflops"] == 67.0 and p["hardware"]["precision"] == "fp32"


def test_gpu_spec_numbers_show_up_in_the_plan(capsys):
    args = ["model.size=small", "schedule.max_steps=10", "--mfu", "0.5"]
    assert plan.main(args + ["--gpu-spec", "memory_gib=23.5,bf16_tflops=123,bandwidth_gbs=17"]) == 0
    out = capsys.readouterr().out
    assert "1 x custom (--gpu-spec memory_gib=23.5,bf16_tflops=123,bandwidth_gbs=17): 23.5 GiB, 123 TFLOP/s bf16" in out
    assert "usable: 23.5 GiB - 10% headroom = 21.15 GiB" in out
    assert plan.main(args + ["--gpu-spec", "memory_gib=23.5,bf16_tflops=123,bandwidth_gbs=17", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["hardware"]["memory_gib"] == 23.5 and p["hardware"]["peak_tflops"] == 123.0
    assert p["hardware"]["interconnect_gbs"] == 17.0
    assert p["time"]["compute_seconds"] == pytest.approx(p["time"]["flops_per_step"] / (0.5 * 123e12))
    # without bf16_tflops: a GPU without bf16, planned in fp32 at fp32_tflops
    g = plan.parse_gpu_spec("memory_gib=16,fp32_tflops=14,bandwidth_gbs=16")
    p = _plan(["model.size=small", "schedule.max_steps=10"], gpu=g)
    assert p["parallel"]["precision"] == "fp32" and p["hardware"]["peak_tflops"] == 14.0
    assert "custom has no bf16: planned in fp32 at 14 TFLOP/s" in p["hardware"]["precision_note"]


def test_gpu_spec_with_gpu_overrides_those_fields_only():
    g = plan.parse_gpu_spec("memory_gib=10,network_gbs=12.5", plan.get_gpu("a100-80gb"))
    base = plan.get_gpu("a100-80gb")
    assert (g.name, g.memory_gib, g.network_gbs) == ("a100-80gb", 10.0, 12.5)
    assert (g.peak_tflops, g.nvlink_gbs, g.gpus_per_node) == (base.peak_tflops, base.nvlink_gbs, base.gpus_per_node)
    p = _plan(["model.size=debug", "schedule.max_steps=1"], gpus=16, gpu=g)
    assert p["hardware"]["memory_gib"] == 10.0 and p["hardware"]["interconnect_gbs"] == 12.5
    assert p["hardware"]["gpu_spec"] == "memory_gib=10,network_gbs=12.5"


@pytest.mark.parametrize("spec,message", [
    ("memory_gib=24,bf16_tflop=30,bandwidth_gbs=16", "unknown key 'bf16_tflop'; valid keys: memory_gib, bf16_tflops"),
    ("memory_gib=lots,bf16_tflops=30,bandwidth_gbs=16", "memory_gib='lots' is not a number"),
    ("memory_gib=24,bf16_tflops=-3,bandwidth_gbs=16", "bf16_tflops=-3 must be a positive number"),
    ("memory_gib=24,bf16_tflops=30,bandwidth_gbs=16,gpus_per_node=4.5", "gpus_per_node='4.5' is not a whole number"),
    ("memory_gib=24,bf16_tflops=30,bandwidth_gbs", "item 'bandwidth_gbs' is not KEY=VALUE"),
    ("memory_gib=24,memory_gib=30,bf16_tflops=1,bandwidth_gbs=1", "memory_gib is given twice"),
    ("memory_gib=24,bandwidth_gbs=16", "needs bf16_tflops (or fp32_tflops for a GPU without bf16)"),
    ("bf16_tflops=30", "needs memory_gib, bandwidth_gbs"),
])
def test_bad_gpu_specs_are_one_line_errors(spec, message, capsys):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan.parse_gpu_spec(spec)
    assert plan.main(["model.size=debug", "schedule.max_steps=1", "--gpu-spec", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --gpu-spec") and "\n" not in err


def test_unknown_gpu_names_the_table_and_gpu_spec(capsys):
    assert plan.main(["model.size=debug", "schedule.max_steps=1", "--gpu", "v100"]) == 2
    err = capsys.readouterr().err
    assert "unknown GPU 'v100'" in err and "v100-16gb" in err and "--gpu-spec memory_gib=" in err


def test_gpu_spec_across_nodes_needs_a_network_figure():
    g = plan.parse_gpu_spec("memory_gib=80,bf16_tflops=300,bandwidth_gbs=100,gpus_per_node=4")
    with pytest.raises(plan.PlanError, match="no network_gbs: add network_gbs="):
        _plan(["model.size=debug", "schedule.max_steps=1"], gpus=8, gpu=g)
    assert _plan(["model.size=debug", "schedule.max_steps=1"], gpus=4, gpu=g)["hardware"]["interconnect_gbs"] == 100
    assert _plan(["model.size=debug", "schedule.max_steps=1"], gpus=8, gpu=g, bandwidth_gbs=5)["hardware"][
        "interconnect_gbs"] == 5


def test_a_bench_run_on_a_v100_gives_its_mfu_over_the_fp32_peak(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({
        "env": {"device": "Tesla V100-SXM2-32GB", "smoke": False},
        "rows": [{"group": "archscale", "name": "CD:FLM", "shape": "", "ms": 1.0, "tflops": 7.85,
                  "checkpointing": "none"}]}))
    assert plan.measured_mfu("v100-32gb", "cd", "small", bench_dir=tmp_path)["mfu"] == pytest.approx(7.85 / 15.7)
    assert plan.measured_mfu("v100-16gb", "cd", "small", bench_dir=tmp_path) is None
    p = _plan(["model.size=small", "schedule.max_steps=10"], gpu="v100-32gb", bench_dir=tmp_path)
    assert p["time"]["mfu"] == pytest.approx(0.5) and "measured" in p["time"]["mfu_source"]
