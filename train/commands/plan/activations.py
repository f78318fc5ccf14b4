"""Activation bytes: what each block, the head and its loss keep for the backward pass and the
largest transient of the backward (tests/test_plan.py checks them against autograd on CPU)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

from .mfu import CHECKPOINT_POLICIES
from .shapes import pipeline_layout

if TYPE_CHECKING:
    from ...registry import Lengths


def layer_activation_bytes(config, tokens: int, batch: int, a: float, *, cross_tokens: int = 0,
                           dense_attention: bool = False, cpu_mask: bool = False) -> float:
    """Bytes one block saves for its backward pass, for `batch` rows of `tokens` tokens.

    Per block (B rows, T tokens, D = d_model, I = heads x head_dim, F = d_ff, H heads, a = 2 bf16
    or 4 fp32 activation bytes; the whole model runs in the training precision, no autocast):
      each RMSNorm: (4 + 2a) B T D + 4 B T    its fp32 upcast of the input (which is also the
                                       stored residual stream), the normalised x in the model dtype,
                                       the weighted output (the matmul input), the fp32 1/rms
      self-attention: 4 a B T I + 4 B H T   q, k, v, the kernel output (flash / flex keep no T x T
                                       matrix; the output is laid out (B, T, H, hd), so o_proj's input
                                       is a view of it), the fp32 log-sum-exp
      cross-attention (ED decoder): 2 a B T I + 2 a B Tk I + 4 B H T    q, out; k, v over the encoder
      GEGLU / SwiGLU MLP: 4 a B T F    gate, act(gate), up, and their product (the down_proj input)
      GELU MLP: 2 a B T F
      dropout > 0: 1 byte per element of each dropout mask (2 or 3 of B T D)
      attn_impl=reference: + (4 + a) B H T Tk per attention (fp32 scores -> probabilities, their copy)
      cpu_mask (SDPA on CPU with a mask tensor): + 4 B Hm T T (+ 4 B T Tk cross) per block: CPU SDPA
                                       turns the bool mask into an fp32 additive one in each call and
                                       saves it for the backward (measured: 64 MiB per call at B=1,
                                       T=4096); Hm = H with position=t5_bias (the bias is in the mask), else 1
    """
    B, T, D, I, F, H = batch, tokens, config.d_model, config.n_heads * config.head_dim, config.d_ff, config.n_heads
    cross = cross_tokens > 0
    norm = ((4 + 2 * a) * B * T * D + 4 * B * T) * (3 if cross else 2)
    attn = 4 * a * B * T * I + 4 * B * H * T
    if cross:
        attn += 2 * a * B * T * I + 2 * a * B * cross_tokens * I + 4 * B * H * T
    mlp = (4 if config.mlp in ("geglu", "swiglu") else 2) * a * B * T * F
    drop = (3 if cross else 2) * B * T * D if config.dropout > 0 else 0
    dense = 0.0
    if dense_attention:
        dense = (4 + a) * B * H * T * T + ((4 + a) * B * H * T * cross_tokens if cross else 0)
    elif cpu_mask:
        dense = 4 * B * (H if config.position == "t5_bias" else 1) * T * T + 4 * B * T * cross_tokens
    return norm + attn + mlp + drop + dense


def layer_selective_bytes(config, tokens: int, batch: int, a: float, *, cross_tokens: int = 0,
                          dense_attention: bool = False) -> tuple[float, float]:
    """(kept, shared): bytes one block keeps under selective activation checkpointing, besides
    its input, and how many of layer_activation_bytes' bytes are those same tensors.

    train/engine/runtime.py `_selective_policy` runs each block under non-reentrant torch.utils.checkpoint
    with a policy that MUST_SAVEs the outputs of aten mm / addmm / bmm and of the SDPA / flex
    attention kernels and recomputes everything else; autograd's own saved tensors are dropped
    (recomputed in the backward), and the block's input is kept by the checkpoint to re-run it.
    nn.Linear on a [B, T, *] input is one aten.mm on [B T, *], so per block:
      self-attention: q, k, v, o_proj outputs a B T (3 I + D) + the kernel output a B T I and its
        fp32 log-sum-exp 4 B H T (flash / flex; the kernel's other outputs are scalars);
        attn_impl=reference: the two bmm outputs instead, q k^T a B H T Tk and probs v a B T I;
      cross-attention (ED decoder): q a B T I, k, v a B Tk I each, o_proj a B T D, kernel output
        a B T I + 4 B H T;
      GEGLU / SwiGLU MLP: gate, up a B T F each, down a B T D; GELU MLP: up a B T F, down a B T D.
    Not kept: norms (and their fp32 copies), RoPE'd q and k, the activation and gate product,
    residual sums, dropout masks (their RNG state is replayed).
    shared: v, the kernel output, the log-sum-exp, q and k unless RoPE rotates them (RoPE makes
      new tensors), the cross-attention's q, k, v, output, log-sum-exp, and the MLP's gate and up
      (GELU: up): in the backward, recomputing the block re-creates only the rest.
    tests/test_plan.py measures what stays alive after a selective forward on CPU."""
    B, T, D, I, F, H = batch, tokens, config.d_model, config.n_heads * config.head_dim, config.d_ff, config.n_heads
    gated = config.mlp in ("geglu", "swiglu")
    lse = 4 * B * H * T
    kernel = a * B * T * I + (a * B * H * T * T if dense_attention else lse)
    kept = a * B * T * (3 * I + D) + kernel
    shared = a * B * T * I * (1 if config.position == "rope" else 3) + a * B * T * I + (0 if dense_attention else lse)
    if cross_tokens:
        Tk = cross_tokens
        cross = a * B * T * I + 2 * a * B * Tk * I + a * B * T * D + a * B * T * I \
            + (a * B * H * T * Tk if dense_attention else lse)
        kept += cross
        shared += cross - a * B * T * D - (a * B * H * T * Tk if dense_attention else 0)
    kept += a * B * T * ((2 if gated else 1) * F + D)
    shared += a * B * T * (2 if gated else 1) * F
    return kept, shared


def resolve_loss_impl(loss_impl: str, device: str = "cuda", tokens: Optional[int] = None,
                      d_model: Optional[int] = None) -> str:
    """The loss implementation a model runs for `loss_impl` on `device`, as the model resolves it
    (model_zoo.loss.resolve_impl): auto = liger on CUDA when liger-kernel imports (here, where the
    planner runs: install the `gpu` extra here too, or set model.loss_impl), else chunked on
    CUDA, or dense for fewer tokens per micro-batch than d_model; dense on CPU."""
    from model_zoo.loss import resolve_impl

    return resolve_impl(loss_impl, device, tokens, d_model)


def head_loss_bytes(config, tokens: int, a: float, impl: str) -> dict:
    """Bytes of the LM head + loss for `tokens` = B x T positions (model_zoo/loss.py), by the
    resolved loss implementation `impl`, V = vocab, D = d_model, a = activation / weight bytes:

    dense: the logits [N, V] a N V kept by the model output + their fp32 log-softmax 4 N V
      (F.cross_entropy) + with z-loss 4 N V: logsumexp saves its fp32 input (a copy made by the
      upcast, or by a shifting loss's (the decoders') reshape; the own logits of an fp32 model whose
      loss does not shift (ED), counted already);
      working: the logits' gradient, (4 + a) N V. Norm before it: as a block's norm (its output
      is the head matmul's saved input).
    chunked / liger (training; fused head + loss, the gradients computed in the forward): saved
      = grad_hidden a N D + grad_weight a V D (ChunkedLinearCrossEntropy / liger's function save
      only these; no logits, no head input); the norm before it keeps (4 + a) N D + 4 N (its
      output is not saved). working, during the loss's forward, over what is saved afterwards:
        the head input, alive but not saved: a N D (+ a N D more for its t5x rescaled copy when
          the head is the tied embedding with scale_tied_logits),
        + (4 - a) V D: the fp32 grad_weight accumulator beside the a V D copy that is kept
          (fp32: the accumulator is that copy),
        + the largest of the loss's own transients, C = min(loss_chunk_size, N) rows per chunk,
          c = 4 + a bytes per logit (fp32 logits, then the softmax gradient cast to the dtype;
          fp32: c = 4, one tensor):
          chunked: one chunk alive at a time (the loop frees each chunk's logits before the
            next matmul); while the chunk's gradient is multiplied out, c C V + max(a C D, a V D)
            (a V D: bf16's g^T h product before it is added to the fp32 accumulator; fp32 adds in
            place); at the final cast of grad_weight to the dtype, a V D + c C_last V.
          liger (read from liger-kernel's fused_linear_cross_entropy_forward, accum_dtype fp32
            as model_zoo asks for it): chunks of C = min(N, next_pow2(ceil(N / ceil(V / D)))) rows,
            one chunk's logits in the dtype (its gradient written in place) + a C D, or the cast
            copy a V D. Not measured here (CUDA only).
    Returns {"saved", "working", "norm"}: norm = the bytes the norm before the head keeps."""
    c = config
    N, D, V = float(tokens), c.d_model, c.vocab_size
    full_norm = (4 + 2 * a) * N * D + 4 * N
    if impl == "dense":
        copied = a != 4 or pipeline_layout(c).shift_labels  # fp32 logits that are not shifted are not copied
        z = 4 * N * V if c.z_loss > 0 and copied else 0.0
        return {"saved": (a + 4) * N * V + z, "working": (4 + a) * N * V, "norm": full_norm}
    if impl not in ("chunked", "liger"):
        raise ValueError(f"loss_impl {impl!r} is not valid here; choose one of dense, chunked, liger "
                         f"(resolve auto with resolve_loss_impl)")
    head_in = a * N * D * (2 if c.tie_embeddings and c.scale_tied_logits else 1)
    low = a < 4  # bf16: a separate fp32 accumulator and a cast copy
    if impl == "chunked":
        C = min(int(c.loss_chunk_size), int(N))
        last = int(N) - (math.ceil(N / C) - 1) * C
        per = (4 + a) if low else 4.0
        loss = max(per * C * V + max(a * C * D, a * V * D if low else 0.0),
                   (a * V * D + per * last * V) if low else 0.0)
    else:
        rows = math.ceil(N / math.ceil(V / D))
        C = min(int(N), 1 << (rows - 1).bit_length())  # triton.next_power_of_2(rows), at most N
        loss = max(a * C * V + a * C * D, a * V * D if low else 0.0)
    return {"saved": a * N * D + a * V * D, "working": head_in + (4 - a) * V * D + loss,
            "norm": (4 + a) * N * D + 4 * N}


def activation_bytes(config, lengths: "Lengths", batch: int, precision: str, checkpointing,
                     layers: Sequence[int], attn_impl: str = "auto", device: str = "cuda",
                     cpu_mask: bool = False) -> dict:
    """Activation bytes of one micro-batch on the pipeline layers `layers` (all: no pipeline).

    checkpointing: "none" / False, "full" / True, or "selective" (parallel.checkpoint_policy).
    saved: what the forward pass leaves for the backward. Without checkpointing: every block's
      saved tensors (layer_activation_bytes). Full checkpointing (every block): each block's input
      (a B T D); the block is recomputed in the backward. Selective: each block's input + what
      layer_selective_bytes keeps (matmul and attention-kernel outputs).
    working: the largest transient of the backward pass: one block's activation gradients (about
      its saved size), plus its recomputed activations under checkpointing (full: all of them;
      selective: those not kept, layer_activation_bytes - shared); or the loss: the logits'
      gradient, (4 + a) B T V.
    Stack-level tensors: nothing for the embedding (the first norm keeps its own fp32 copy); the
    ED encoder's final norm as a block's norm ((4 + 2a) B T D + 4 B T: its output is what every
    decoder layer reads); the head, its loss and the norm before it: head_loss_bytes, by
    config.loss_impl as the model resolves it on `device` (the plan's: "cuda"; "cpu" for what a CPU
    run does): dense keeps the logits and their fp32 log-softmax, chunked / liger keep the two
    gradients they compute in the forward.
    cpu_mask: SDPA on CPU with a mask tensor (layer_activation_bytes' cpu_mask), what a training
      batch of packed documents has on CPU (segment ids make every mask a tensor); the planner's
      device="cpu" sets it, also for a plain causal row (no tensor): a CPU plan errs high there.
    tests/test_plan.py checks all of this against the tensors autograd saves on CPU.
    """
    if checkpointing is True or checkpointing is False:
        checkpointing = "full" if checkpointing else "none"
    if checkpointing not in CHECKPOINT_POLICIES:
        raise ValueError(f"activation checkpointing {checkpointing!r} is not valid; choose one of "
                         f"{', '.join(CHECKPOINT_POLICIES)}")
    a = 2.0 if precision == "bf16" else 4.0
    c, B, D = config, batch, config.d_model
    dense = attn_impl == "reference"
    cpu_mask = cpu_mask and not dense and attn_impl != "flex"  # auto and sdpa run SDPA on CPU
    layers = set(layers)
    saved = working = 0.0
    head = head_loss_bytes(c, B * lengths.decoder, a, resolve_loss_impl(getattr(c, "loss_impl", "dense"), device,
                                                                       B * lengths.decoder, c.d_model))
    pipeline = pipeline_layout(c).layers
    for i in sorted(layers):
        layer = pipeline[i]
        kind, T = layer.kind, getattr(lengths, layer.side)  # the tokens of its row
        if kind == "block":
            cross_tokens = lengths.encoder if layer.stack.cross else 0
            full = layer_activation_bytes(c, T, B, a, cross_tokens=cross_tokens, dense_attention=dense,
                                          cpu_mask=cpu_mask)
            if checkpointing == "full":
                saved += a * B * T * D
                working = max(working, 2 * full)
            elif checkpointing == "selective":
                kept, shared = layer_selective_bytes(c, T, B, a, cross_tokens=cross_tokens, dense_attention=dense)
                saved += a * B * T * D + kept
                working = max(working, 2 * full - shared)
            else:
                saved += full
                working = max(working, full)
        elif kind == "norm":
            saved += (4 + 2 * a) * B * T * D + 4 * B * T
        elif kind == "head_norm":
            saved += head["norm"]
        elif kind == "head":
            saved += head["saved"]
            working = max(working, head["working"])
    return {"saved": saved, "working": working}
