"""`archscale analyze RUN_DIR`: the low-rank argument, measured on a run's checkpoint.

    archscale analyze runs/cd-flm [--step N] [--rows 4] [--seq-len 128] [--prefix 64] [--out DIR]

Takes held-out text of the run's own data, and measures every self-attention matrix of the
checkpoint's model, per layer and head (model_zoo.analysis): its effective rank, singular-value
entropy, threshold ranks and numerical rank. A decoder's weights are measured on the same rows
with the causal mask (CD) and with the first `--prefix` tokens bidirectional (ND; CD and ND share
every parameter, so only the mask differs), then on the prefix block alone (where the low-rank
argument applies) under the CD, ND and mixed-direction ND masks; an encoder-decoder's encoder
(bidirectional) is compared with its decoder (causal), and with itself as a causal and as a
mixed-direction encoder (the registry's attention_views). Prints a table per view and layer and
writes RUN_DIR/plots/attention_rank.png and attention_rank.json (or under --out).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def text_rows(cfg, tok, rows: int, seq_len: int) -> torch.Tensor:
    """[rows, seq_len] token ids of held-out (else training) documents of the run's data."""
    from ..data import prepare

    prepared = prepare(cfg.data, None)
    split = prepared.eval or prepared.train
    out = []
    for d in split.doc_ids:
        ids = split.store.tokens(int(d))
        if len(ids) >= seq_len:
            out.append(torch.tensor(ids[:seq_len].tolist(), dtype=torch.long))
        if len(out) == rows:
            break
    if len(out) < rows:
        raise ValueError(f"fewer than {rows} documents of at least {seq_len} tokens in the run's data: "
                         f"lower --seq-len or --rows")
    return torch.stack(out)


def measure(arch, model, ids: torch.Tensor, prefix: int) -> dict[str, list[dict]]:
    """{mask name: attention_spectra rows} on the same token rows (`arch`, the run's registry
    entry, says which masks its architecture compares)."""
    return arch.attention_views(model, ids, prefix)


def per_layer(rows: list[dict], key: str = "effective_rank") -> dict[int, float]:
    """The mean of `key` over heads, per layer."""
    layers: dict[int, list[float]] = {}
    for r in rows:
        layers.setdefault(r["layer"], []).append(r[key])
    return {k: sum(v) / len(v) for k, v in sorted(layers.items())}


def plot(results: dict[str, list[dict]], n: int, path: Path, title: str) -> None:
    """Effective rank (with each view's full rank, dotted) and singular-value entropy per layer."""
    from .plots import pyplot, save

    plt = pyplot()
    fig, (ax, ax_h) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, rows in results.items():
        layers = per_layer(rows)
        line, = ax.plot(list(layers), list(layers.values()), marker="o", label=name)
        size = rows[0]["n"] if rows else n
        if size != n:
            ax.axhline(size, color=line.get_color(), ls=":", lw=0.8)
        h = per_layer(rows, "sv_entropy")
        ax_h.plot(list(h), list(h.values()), marker="o", color=line.get_color(), label=name)
    ax.axhline(n, color="gray", ls=":", label=f"full rank ({n}; dotted: each block's)")
    ax.set(xlabel="layer", ylabel="mean effective rank over heads", title=title)
    ax_h.set(xlabel="layer", ylabel="mean singular-value entropy / ln n", ylim=(0, 1.02),
             title="how spread the singular values are (1: flat)")
    for a in (ax, ax_h):
        a.grid(alpha=0.3)
        a.xaxis.get_major_locator().set_params(integer=True)  # layers
    ax.legend(fontsize=7)
    save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--rows", type=int, default=4, help="documents measured (ranks are averaged over them)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--prefix", type=int, default=None, help="decoders: bidirectional prefix (default seq-len/2)")
    p.add_argument("--out", default=None, help="directory for the PNG and JSON (default RUN_DIR/plots)")
    a = p.parse_args(argv)
    from ..trainer import checkpointing as ckpt
    from ..trainer.weights import checkpoint_dir, load_model

    try:
        step_dir = checkpoint_dir(a.run_dir, a.step)
        model, tok, cfg = load_model(step_dir)
        ids = text_rows(cfg, tok, a.rows, a.seq_len)
    except (ckpt.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .. import registry

    arch = registry.get(cfg.model.arch)  # the run's entry, looked up once
    prefix = a.prefix if a.prefix is not None else a.seq_len // 2
    results = measure(arch, model.float(), ids, prefix)
    n = arch.attention_full_rank(ids)
    print(f"{cfg.model.arch.upper()} {step_dir}: {a.rows} held-out rows of {a.seq_len} tokens; per attention "
          f"matrix (mean over heads): effective rank (exp of the entropy of the normalised singular values), "
          f"that entropy over ln n, the 90%-energy rank")
    print(f"{'view':52} {'layer':>5} {'n':>5} {'eff.rank':>9} {'sv.entropy':>10} {'rank_90':>8}")
    for name, rows in results.items():
        eff, ent, r90 = per_layer(rows), per_layer(rows, "sv_entropy"), per_layer(rows, "rank_90")
        size = rows[0]["n"] if rows else 0
        for layer in eff:
            print(f"{name:52} {layer:>5} {size:>5} {eff[layer]:>9.2f} {ent[layer]:>10.3f} {r90[layer]:>8.2f}")
    out = Path(a.out) if a.out else Path(a.run_dir) / "plots"
    plot(results, n, out / "attention_rank.png", f"{cfg.model.arch.upper()} {step_dir.name}: attention rank per layer")
    (out / "attention_rank.json").write_text(json.dumps(results, indent=1) + "\n")
    print(out / "attention_rank.png")
    return 0
