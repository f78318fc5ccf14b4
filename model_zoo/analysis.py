"""Attention-matrix spectra: test the low-rank argument on your own models.

A bidirectional attention matrix softmax(QK^T / sqrt(d)) is an n x n matrix built from an
n x d times d x n product, so with n >> d it can be close to low rank; a causal one is
lower-triangular with a positive diagonal and always has full rank. `attention_spectra` runs a
model on a batch through the reference attention path, collects every self-attention matrix
and reports, per stack, layer and head, its singular values and ranks:

* effective rank (Roy & Vetterli 2007): exp(entropy of the normalised singular values), in [1, n];
* singular-value entropy: that entropy over ln n, in [0, 1] (how spread the singular values are);
* threshold ranks: the fewest singular values holding 90% / 99% of the energy (rank_90, rank_99);
* numerical rank: singular values above n * eps * s_max (torch.linalg.matrix_rank's default).

`block="bidirectional"` restricts every matrix to the bidirectional block (ND's prefix, ED's
encoder), where the low-rank argument applies; the default measures each row's whole segment.

Command line (a model directory written by save_pretrained):
    python -m model_zoo.analysis MODEL_DIR [--seq-len 64] [--prefix 32] [--batch 4] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
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


def spectrum_stats(singular_values: Tensor) -> dict:
    """How spread the singular values s_1..s_n of one matrix are:

    * effective_rank: exp(H), H the entropy of p_i = s_i / sum s (Roy & Vetterli 2007), in [1, n];
    * sv_entropy: H / ln n, in [0, 1]: 1 when all singular values are equal, 0 when one holds all
      (the same p as effective_rank: sv_entropy = ln(effective_rank) / ln n);
    * rank_90, rank_99: the fewest singular values holding 90% / 99% of the energy sum s^2
      (threshold ranks, beside numerical_rank's n * eps * s_max).
    """
    s = singular_values.double().clamp(min=0)
    n = s.shape[0]
    eff = effective_rank(s)
    energy = (s * s).sort(descending=True).values.cumsum(0)
    total = float(energy[-1]) if n else 0.0

    def threshold(f: float) -> int:
        return int((energy < f * total * (1 - 1e-12)).sum()) + 1 if total > 0 else 0

    return dict(effective_rank=eff, sv_entropy=math.log(eff) / math.log(n) if n > 1 and eff > 0 else 0.0,
                rank_90=threshold(0.9), rank_99=threshold(0.99))


def _self_attentions(model):
    """(stack name, layer index, Attention module) of every self-attention."""
    if model.config.is_encoder_decoder:
        stacks = [("encoder", model.encoder), ("decoder", model.decoder)]
    else:
        stacks = [("decoder", model.model)]
    for name, stack in stacks:
        for i, layer in enumerate(stack.layers):
            yield name, i, layer.self_attn


def _record(model, batch: dict) -> list:
    """(stack, layer, probs [B, H, T, T]) of every self-attention call of one reference forward.
    A module run by two stacks (share_encoder_decoder) records twice, in stack order."""
    modules = list(_self_attentions(model))
    old_impl = model.config.attn_impl
    model.config.attn_impl = "reference"
    try:
        for _, _, attn in modules:
            attn.record = []
        model(**batch)
        seen: dict[int, int] = {}
        records = []
        for name, i, attn in modules:
            k = seen[id(attn)] = seen.get(id(attn), -1) + 1
            records.append((name, i, attn.record[k]))
    finally:
        model.config.attn_impl = old_impl
        for _, _, attn in modules:
            attn.record = None
    return records


def _bidirectional_tokens(model, batch: dict, t: int) -> Optional[Tensor]:
    """[B, T] flags of a decoder row's bidirectional block (prefix_lengths / bidirectional), or None."""
    if batch.get("bidirectional") is not None:
        return batch["bidirectional"].bool()
    if batch.get("prefix_lengths") is not None:
        return torch.arange(t)[None, :] < batch["prefix_lengths"].cpu()[:, None]
    return None


@torch.no_grad()
def attention_spectra(model, batch: dict, top_k: int = 8, block: str = "segment") -> list[dict]:
    """Per (stack, layer, head): the mean over batch rows of spectrum_stats, the numerical rank
    and the top-`top_k` singular values of the attention matrix over each row's first segment
    (the whole row without segment ids). `batch` holds the model's forward arguments.

    block="bidirectional": only the bidirectional block, where the low-rank argument applies:
    a decoder's prefix (the tokens `prefix_lengths` / `bidirectional` mark, whatever the mask:
    CD's matrix over those tokens is its causal block) and an encoder's whole matrix; the ED
    decoder (causal only) is left out.
    """
    if block not in ("segment", "bidirectional"):
        raise ValueError(f"block={block!r} is not valid; choose segment or bidirectional")
    model.eval()
    records = _record(model, batch)
    ed = model.config.is_encoder_decoder  # an encoder (all bidirectional) and a causal decoder
    seg_key = {"encoder": "segment_ids", "decoder": "decoder_segment_ids" if ed else "segment_ids"}
    rows = []
    for name, layer, probs in records:  # probs (B, H, T, T)
        if block == "bidirectional" and ed and name == "decoder":
            continue
        seg = batch.get(seg_key[name])
        bidir = _bidirectional_tokens(model, batch, probs.shape[-1]) if block == "bidirectional" and not ed else None
        if block == "bidirectional" and not ed and bidir is None:
            raise ValueError("block='bidirectional' on a decoder needs prefix_lengths or bidirectional in the batch")
        for h in range(probs.shape[1]):
            stats, num, tops = [], [], []
            for b in range(probs.shape[0]):
                m = probs[b, h].double()
                keep = torch.ones(m.shape[0], dtype=torch.bool)
                if seg is not None:
                    keep &= (seg[b] == seg[b, 0]).cpu()
                if bidir is not None:
                    keep &= bidir[b]
                m = m[keep][:, keep]
                s = torch.linalg.svdvals(m)
                stats.append(spectrum_stats(s))
                num.append(int(torch.linalg.matrix_rank(m)))
                tops.append(s[:top_k])
            k = min(t.shape[0] for t in tops)
            mean = {key: sum(st[key] for st in stats) / len(stats) for key in stats[0]}
            rows.append(dict(stack=name, layer=layer, head=h, n=int(m.shape[0]), **mean,
                             numerical_rank=sum(num) / len(num),
                             top_singular_values=[float(v) for v in torch.stack([t[:k] for t in tops]).mean(0)]))
    return rows


def summarize(rows: list[dict]) -> str:
    """A table: one line per (stack, layer) with mean / min effective rank over heads, and the
    heads' mean singular-value entropy, 90%-energy rank and numerical rank."""
    lines = [f"{'stack':8} {'layer':>5} {'n':>5} {'eff.rank mean':>14} {'eff.rank min':>13} {'sv.entropy':>10} "
             f"{'rank_90':>8} {'num.rank mean':>14}"]
    keys = sorted({(r["stack"], r["layer"]) for r in rows}, key=lambda k: (k[0] != "encoder", k[1]))
    for stack, layer in keys:
        rs = [r for r in rows if r["stack"] == stack and r["layer"] == layer]
        eff = [r["effective_rank"] for r in rs]
        mean = {k: sum(r[k] for r in rs) / len(rs) for k in ("sv_entropy", "rank_90", "numerical_rank")}
        lines.append(f"{stack:8} {layer:>5} {rs[0]['n']:>5} {sum(eff) / len(eff):>14.2f} {min(eff):>13.2f} "
                     f"{mean['sv_entropy']:>10.3f} {mean['rank_90']:>8.2f} {mean['numerical_rank']:>14.2f}")
    return "\n".join(lines)


def random_batch(config, batch: int, seq_len: int, prefix: Optional[int], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, config.vocab_size, (batch, seq_len), generator=g)
    if config.is_encoder_decoder:
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
    p.add_argument("--block", choices=("segment", "bidirectional"), default="segment",
                   help="bidirectional: only the bidirectional block (ND's prefix, ED's encoder)")
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
    rows = attention_spectra(model, batch, block=args.block)
    print(f"{model.config.arch.upper()} model, {args.batch} random rows of {args.seq_len} tokens"
          + (f", prefix {prefix}" if getattr(model.config, "prefix_attention", False) else ""))
    print(summarize(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
