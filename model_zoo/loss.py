"""The LM loss: cross-entropy + z-loss, from logits or fused with the LM head.

    loss = CE + z_loss * Z,   CE = mean_i (lse_i - x_i[y_i]),   Z = mean_i lse_i^2,
    x_i = h_i W^T (the logits of token i), lse_i = logsumexp(x_i), means over tokens y_i != -100.

`lm_loss(logits, labels, z_loss)` is the reference: it needs the logits [N, V]; in training,
autograd then keeps an fp32 copy of them (log-softmax output, 4 N V bytes) and a second one with
z-loss (logsumexp input), on top of the bf16 logits the model output holds (2 N V bytes); at
vocab 32128 that is the largest activation of a small model.

`linear_cross_entropy(hidden, weight, labels, z_loss, impl, chunk_size)` computes the same three
numbers from the hidden states [N, D] and the head matrix W [V, D] without materialising [N, V]:
* "dense":   logits = hidden @ W^T, then lm_loss. The reference.
* "chunked": `ChunkedLinearCrossEntropy`, plain torch. Walks N in chunks of `chunk_size` rows; per
  chunk the logits are computed in the input dtype, upcast to fp32, reduced to the CE and Z sums,
  and, in the forward already, turned into that chunk's gradient
      dL/dx_i = ((1 + 2 z_loss lse_i) softmax(x_i) - onehot(y_i)) / n_valid   (0 for ignored rows)
  which is cast to the input dtype (as autograd casts the fp32 logits' gradient back) and
  multiplied into grad_hidden[chunk] = g W and grad_W += g^T h (fp32 accumulator). Backward only
  scales these by the incoming gradient (the "gradient in forward" trick of Liger's and Apple's
  cut-cross-entropy kernels). Memory: O(chunk_size x V) transient, N x D + V x D kept until
  backward. Equal to dense within fp32 rounding (tests/test_loss.py).
* "liger":   liger-kernel's fused linear cross-entropy (Triton, CUDA only; `pip install
  archscale[gpu]`), whose `lse_square_scale` is this z_loss (mean over the same tokens).
* "auto":    liger on CUDA when liger-kernel imports, else chunked on CUDA; dense elsewhere, so
  that CPU runs and the test suite keep today's numbers bit for bit.

Pitfalls:
* All labels ignored: like F.cross_entropy, loss = ce = nan (0 / 0) and z = 0; the gradients are
  zero. The fused paths reproduce this (liger by itself would return 0).
* With z_loss > 0 the fused paths return `ce` and `z` detached (they are logged, never
  backpropagated; backpropagate `loss`); with z_loss == 0, `ce` is `loss`, as in lm_loss.
* The fused backward runs once (no double backward, no create_graph).
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
LOSS_IMPLS = ("auto", "dense", "chunked", "liger")


def lm_loss(logits: Tensor, labels: Tensor, z_loss: float) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy over labels != -100, plus z_loss * mean(logsumexp(logits)^2) over the
    same tokens (PaLM / the reference experiment's z-loss keeps the softmax normaliser near 1).
    Returns (loss, ce, z)."""
    logits = logits.float().reshape(-1, logits.shape[-1])  # (N, V) fp32
    labels = labels.reshape(-1)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    if z_loss == 0:
        zero = ce.new_zeros(())
        return ce, ce, zero
    # masked mean without boolean indexing or a branch on the data: no host synchronisation
    keep = (labels != IGNORE_INDEX).float()
    z = (torch.logsumexp(logits, dim=-1).square() * keep).sum() / keep.sum().clamp(min=1.0)
    return ce + z_loss * z, ce, z


def shift_labels(labels: Tensor) -> Tensor:
    """Decoder labels for a loss over every position: labels[:, 1:] followed by -100, [B, T].
    Position t predicts token t + 1 and the last position predicts nothing, so the loss over all
    T positions equals lm_loss(logits[:, :-1], labels[:, 1:]) with no copy of the hidden states."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def align_labels(labels: Tensor, shift: bool, logits: Optional[Tensor] = None) -> tuple[Optional[Tensor], Tensor]:
    """The label shift, written once: the models (models._PreTrained._head_and_loss), the
    pipeline's last stage (train/engine/pipeline/loss.py) and the held-out token count
    (train/engine/runtime.eval_loss) all call it. Whether a model shifts is its class's
    `shifts_labels` (the registry's pipeline layout says the same for the last stage).

    shift=True (decoders, Hugging Face convention: labels[t] is token t's own id, position t
    predicts token t + 1):
        with logits [B, T, V]: (logits[:, :-1], labels[:, 1:]), the T - 1 positions that predict;
        without: (None, shift_labels(labels)) [B, T], -100 at the last position: a loss over every
        position (the fused loss: no copy of the hidden states).
    shift=False (ED, T5: labels are aligned with the decoder outputs): (logits, labels) unchanged.
    Either form holds the same targets, so `(aligned != -100).sum()` counts the tokens the loss
    averages over. Pitfall: counting `labels != -100` unshifted over-counts a decoder row by its
    first token whenever that one carries a label."""
    if not shift:
        return logits, labels
    if logits is None:
        return None, shift_labels(labels)  # (B, T)
    return logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)


@functools.lru_cache(maxsize=None)
def liger_available() -> bool:
    """liger-kernel's fused loss imports here (installed, and its triton works with this torch):
    `auto` falls back to chunked otherwise instead of failing inside a training step."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except Exception as e:  # a triton / torch mismatch surfaces as any kind of import error
        import logging

        logging.getLogger(__name__).warning("liger-kernel is installed but does not import (%s: %s); "
                                            "loss_impl=auto uses the chunked loss", type(e).__name__, e)
        return False
    return True


def resolve_impl(impl: str, device: torch.device, tokens: Optional[int] = None,
                 d_model: Optional[int] = None) -> str:
    """The implementation `impl` runs as on `device` ("auto" -> liger / chunked / dense) for a
    loss over `tokens` rows of width `d_model` (when given)."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl={impl!r} is not valid; choose one of {', '.join(LOSS_IMPLS)}")
    if impl != "auto":
        return impl
    if torch.device(device).type != "cuda":
        return "dense"  # CPU: exactly today's numbers; memory is not what limits a CPU run
    if tokens is not None and d_model is not None and tokens < d_model:
        # few tokens (an ED decoder of 114 x a small micro-batch): their (4 + a) x tokens x V
        # logits take less memory than the fused path's [V, D] weight gradient and accumulator
        return "dense"
    return "liger" if liger_available() else "chunked"


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, z_loss: float = 0.0,
                         impl: str = "auto", chunk_size: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    """lm_loss(hidden @ weight.T, labels, z_loss) -> (loss, ce, z), computed by `impl` (see the
    module docstring). hidden [N, D], weight [V, D] (may be tied to an embedding: its gradient is
    accumulated into the shared parameter), labels [N] long with -100 = no loss."""
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1 or labels.shape[0] != hidden.shape[0] \
            or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy wants hidden [N, D], weight [V, D], labels [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    impl = resolve_impl(impl, hidden.device, hidden.shape[0], hidden.shape[1])
    if impl == "dense":
        return lm_loss(F.linear(hidden, weight), labels, z_loss)  # (N, V) logits
    if impl == "liger":
        return _liger(hidden, weight, labels, z_loss)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"loss_chunk_size={chunk_size!r} must be a positive integer")
    grad = torch.is_grad_enabled()
    loss, ce, z = ChunkedLinearCrossEntropy.apply(hidden, weight, labels, float(z_loss), chunk_size,
                                                  grad and hidden.requires_grad, grad and weight.requires_grad)
    return (loss, loss, z) if z_loss == 0 else (loss, ce, z)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """(loss, ce, z) of hidden @ weight.T over chunks of rows, gradients computed in the forward.
    `ce` and `z` are marked non-differentiable; see linear_cross_entropy."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, z_loss: float, chunk_size: int,
                grad_hidden_needed: bool, grad_weight_needed: bool):
        n = hidden.shape[0]
        keep = labels != IGNORE_INDEX  # (N,)
        n_valid = keep.sum()
        # the gradient's 1 / n_valid; all ignored: every row's gradient is 0 (as F.cross_entropy's)
        inv = 1.0 / n_valid.clamp(min=1).to(torch.float32)
        safe = labels.clamp(min=0)  # ignored rows gather class 0, then get weight 0
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        z_sum = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None  # (N, D)
        # fp32 accumulator over chunks; cast to the weight's dtype at the end
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if grad_weight_needed else None  # (V, D)
        for s in range(0, n, chunk_size):
            h = hidden[s:s + chunk_size]  # (C, D)
            k = keep[s:s + chunk_size].to(torch.float32)  # (C,)
            y = safe[s:s + chunk_size, None]  # (C, 1)
            x = (h @ weight.t()).float()  # (C, V) fp32, the matmul in the input dtype like the dense head
            lse = torch.logsumexp(x, dim=-1)  # (C,)
            ce_sum += ((lse - x.gather(1, y).squeeze(1)) * k).sum()
            if z_loss:
                z_sum += (lse.square() * k).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            g = x.sub_(lse[:, None]).exp_()  # (C, V) softmax, in place of the logits
            row = k * inv  # (C,) 1 / n_valid on kept rows, 0 on ignored ones
            g.mul_((row * (1 + 2 * z_loss * lse) if z_loss else row)[:, None])
            g.scatter_add_(1, y, -row[:, None])  # - onehot(y) / n_valid
            g = g.to(hidden.dtype)  # autograd casts the fp32 logits' gradient back to the matmul dtype
            if grad_hidden is not None:
                grad_hidden[s:s + chunk_size] = g @ weight  # (C, D)
            if grad_weight is not None:
                if g.dtype == torch.float32:
                    grad_weight.addmm_(g.t(), h)  # (V, D)
                else:
                    grad_weight += g.t() @ h
            del x, g  # free this chunk's [C, V] before the next one's matmul: one chunk alive at a time
        ce = ce_sum / n_valid  # all ignored: 0 / 0 = nan, like F.cross_entropy
        z = z_sum / n_valid.clamp(min=1)  # all ignored: 0, like lm_loss
        loss = ce + z_loss * z if z_loss else ce.clone()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(ce, z)
        return loss, ce, z

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_ce, _grad_z):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = grad_weight * grad_loss.to(grad_weight.dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None, None


def _liger(hidden: Tensor, weight: Tensor, labels: Tensor, z_loss: float) -> tuple[Tensor, Tensor, Tensor]:
    """liger-kernel's fused linear cross-entropy, in lm_loss's conventions. Its loss is
    mean(CE_i + lse_square_scale * lse_i^2) over non-ignored tokens (= ce + z_loss * z); the z it
    returns is already scaled by lse_square_scale, summed in the input dtype."""
    if hidden.device.type != "cuda":
        raise RuntimeError(f"loss_impl='liger' needs CUDA tensors, got {hidden.device}; use 'chunked' or 'dense'")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        raise ImportError(f"loss_impl='liger' needs liger-kernel ({e}): pip install 'archscale[gpu]', "
                          f"or use loss_impl='chunked'") from None
    kwargs = dict(ignore_index=IGNORE_INDEX, lse_square_scale=float(z_loss), reduction="mean",
                  return_z_loss=z_loss > 0)
    params = _liger_params(liger_fused_linear_cross_entropy)
    if "return_z_loss" not in params:
        raise ImportError("loss_impl='liger' needs a liger-kernel whose fused linear cross-entropy returns the "
                          "z-loss: pip install -U 'archscale[gpu]'")
    if "accum_dtype" in params:
        kwargs["accum_dtype"] = torch.float32  # grad_weight summed over chunks in fp32 (default: weight dtype)
    return from_liger(liger_fused_linear_cross_entropy(hidden, weight, labels, **kwargs), labels, z_loss)


def from_liger(out, labels: Tensor, z_loss: float) -> tuple[Tensor, Tensor, Tensor]:
    """liger's output -> (loss, ce, z) as lm_loss gives them. `out`: the loss tensor (z_loss 0),
    else (loss, scaled z) in older liger-kernel releases or a CrossEntropyOutput in later ones."""
    if z_loss == 0:
        loss, z_scaled = out, None
    elif isinstance(out, tuple):
        loss, z_scaled = out
    else:
        loss, z_scaled = out.loss, out.z_loss
    # liger returns 0 when every label is ignored; lm_loss returns nan (0 / 0). The gradient is 0 either way.
    loss = loss.float()
    loss = torch.where((labels != IGNORE_INDEX).any(), loss, torch.full_like(loss, float("nan")))
    if z_loss == 0:
        return loss, loss, loss.new_zeros(())
    z_scaled = z_scaled.detach().float()
    return loss, loss.detach() - z_scaled, z_scaled / z_loss


@functools.lru_cache(maxsize=None)
def _liger_params(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


class LMHead(nn.Linear):
    """The LM head matrix W [V, D] (no bias). `forward(hidden)` gives the logits; `forward(hidden
    [N, D], labels [N], ...)` gives linear_cross_entropy's (loss, ce, z) without the logits. The
    loss runs inside this module's forward so that wrappers that gather parameters around a
    module's call (DeepSpeed ZeRO-3) see W in use, tied or not."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__(d_model, vocab_size, bias=False)

    def forward(self, hidden: Tensor, labels: Optional[Tensor] = None, z_loss: float = 0.0, impl: str = "auto",
                chunk_size: int = 1024):
        if labels is None:
            return super().forward(hidden)  # (..., V)
        return linear_cross_entropy(hidden, self.weight, labels, z_loss, impl, chunk_size)
