"""Attention-matrix spectra: test the low-rank argument on your own models.

A bidirectional attention matrix softmax(QK^T / sqrt(d)) is an n x n matrix built from an
n x d times d x n product, so with n >> d it can be close to low rank; a causal one is
lower-triangular with a positive diagonal and always has full rank. `attention_spectra` runs a
model on a batch through the reference attention path, collects every self-attention matrix
and reports, per stack, layer and head, its singular values and ranks:

* effective rank (Roy & Vetterli 2007): exp(entropy of the normalised singular values), in [1, n];
* numerical rank: singular values above n * eps * s_max (torch.linalg.matrix_rank's default).

Command line (a model directory written by save_pretrained):
    python -m model_zoo.analysis MODEL_DIR [--seq-len 64] [--prefix 32] [--batch 4] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch
from torch import Tensor


def effective_rank(singular_values: Tensor) -> float:
    s = singular_values.double().clamp(min=0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _self_attentions(model):
    """(stack name, layer index, Attention module) of every self-attention."""
    if model.config.arch == "ed":
        stacks = [("encoder", model.encoder), ("decoder", model.decoder)]
    else:
        stacks = [("decoder", model.model)]
    for name, stack in stacks:
        for i, layer in enumerate(stack.layers):
            yield name, i, layer.self_attn


@torch.no_grad()
def attention_spectra(model, batch: dict, top_k: int = 8) -> list[dict]:
    """Per (stack, layer, head): the mean over batch rows of the effective and numerical rank of
    the attention matrix over each row's first segment (the whole row without segment ids),
    and the mean top-`top_k` singular values. `batch` holds the model's forward arguments."""
    model.eval()
    modules = list(_self_attentions(model))
    old_impl = model.config.attn_impl
    model.config.attn_impl = "reference"
    try:
        for _, _, attn in modules:
            attn.record = []
        model(**batch)
        records = [(name, i, attn.record[0]) for name, i, attn in modules]
    finally:
        model.config.attn_impl = old_impl
        for _, _, attn in modules:
            attn.record = None
    seg_key = {"encoder": "segment_ids", "decoder": "decoder_segment_ids" if model.config.arch == "ed"
               else "segment_ids"}
    rows = []
    for name, layer, probs in records:  # probs (B, H, T, T)
        seg = batch.get(seg_key[name])
        for h in range(probs.shape[1]):
            eff, num, tops = [], [], []
            for b in range(probs.shape[0]):
                m = probs[b, h].double()
                if seg is not None:
                    keep = seg[b] == seg[b, 0]
                    m = m[keep][:, keep]
                s = torch.linalg.svdvals(m)
                eff.append(effective_rank(s))
                num.append(int(torch.linalg.matrix_rank(m)))
                tops.append(s[:top_k])
            k = min(t.shape[0] for t in tops)
            rows.append(dict(stack=name, layer=layer, head=h, n=int(m.shape[0]),
                             effective_rank=sum(eff) / len(eff), numerical_rank=sum(num) / len(num),
                             top_singular_values=[float(v) for v in torch.stack([t[:k] for t in tops]).mean(0)]))
    return rows


def summarize(rows: list[dict]) -> str:
    """A table: one line per (stack, layer) with mean / min effective rank over heads."""
    lines = [f"{'stack':8} {'layer':>5} {'n':>5} {'eff.rank mean':>14} {'eff.rank min':>13} {'num.rank mean':>14}"]
    keys = sorted({(r["stack"], r["layer"]) for r in rows}, key=lambda k: (k[0] != "encoder", k[1]))
    for stack, layer in keys:
        rs = [r for r in rows if r["stack"] == stack and r["layer"] == layer]
        eff = [r["effective_rank"] for r in rs]
        lines.append(f"{stack:8} {layer:>5} {rs[0]['n']:>5} {sum(eff) / len(eff):>14.2f} {min(eff):>13.2f} "
                     f"{sum(r['numerical_rank'] for r in rs) / len(rs):>14.2f}")
    return "\n".join(lines)


def random_batch(config, batch: int, seq_len: int, prefix: Optional[int], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, config.vocab_size, (batch, seq_len), generator=g)
    if config.arch == "ed":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, config.vocab_size, (batch, seq_len), generator=g)}
    out = {"input_ids": ids}
    if prefix is not None:
        out["prefix_lengths"] = torch.full((batch,), prefix)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_zoo.analysis", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="a directory written by save_pretrained (CD, ND or ED)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--prefix", type=int, default=None, help="ND: bidirectional prefix length (default: seq-len/2)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every (layer, head) row to this file")
    args = p.parse_args(argv)
    from . import load

    try:
        model = load(args.model_dir)
    except (OSError, ValueError) as e:
        print(f"error: cannot load a model from {args.model_dir}: {e}", file=sys.stderr)
        return 2
    prefix = args.prefix if args.prefix is not None else args.seq_len // 2
    batch = random_batch(model.config, args.batch, args.seq_len, prefix, args.seed)
    rows = attention_spectra(model, batch)
    print(f"{model.config.arch.upper()} model, {args.batch} random rows of {args.seq_len} tokens"
          + (f", prefix {prefix}" if model.config.arch == "nd" else ""))
    print(summarize(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
