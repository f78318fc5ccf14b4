"""`archscale analyze RUN_DIR`: the low-rank argument, measured on a run's checkpoint.

    archscale analyze runs/cd-flm [--step N] [--rows 4] [--seq-len 128] [--prefix 64] [--out DIR]

Takes held-out text of the run's own data, and measures every self-attention matrix of the
checkpoint's model, per layer and head (model_zoo.analysis): its effective rank and numerical
rank. A decoder's weights are measured twice on the same rows, with the causal mask (CD) and with
the first `--prefix` tokens bidirectional (ND; CD and ND share every parameter, so only the mask
differs); an encoder-decoder's encoder (bidirectional) is compared with its decoder (causal).
Prints a table per layer and writes RUN_DIR/plots/attention_rank.png and attention_rank.json
(or under --out).
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


def measure(model, ids: torch.Tensor, prefix: int) -> dict[str, list[dict]]:
    """{mask name: attention_spectra rows} on the same token rows (the registry entry says which
    masks its architecture compares)."""
    from .. import registry

    return registry.get(model.config.arch).attention_views(model, ids, prefix)


def per_layer(rows: list[dict]) -> dict[int, float]:
    layers: dict[int, list[float]] = {}
    for r in rows:
        layers.setdefault(r["layer"], []).append(r["effective_rank"])
    return {k: sum(v) / len(v) for k, v in sorted(layers.items())}


def plot(results: dict[str, list[dict]], n: int, path: Path, title: str) -> None:
    from .plots import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in results.items():
        layers = per_layer(rows)
        ax.plot(list(layers), list(layers.values()), marker="o", label=name)
    ax.axhline(n, color="gray", ls=":", label=f"full rank ({n})")
    ax.set(xlabel="layer", ylabel="mean effective rank over heads", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
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
    prefix = a.prefix if a.prefix is not None else a.seq_len // 2
    results = measure(model.float(), ids, prefix)
    from .. import registry

    n = registry.get(model.config.arch).attention_full_rank(ids)
    print(f"{cfg.model.arch.upper()} {step_dir}: {a.rows} held-out rows of {a.seq_len} tokens; effective rank "
          f"(exp of the entropy of the normalised singular values) of each attention matrix, mean over heads")
    layers = {name: per_layer(rows) for name, rows in results.items()}
    names = list(layers)
    print(f"{'layer':>5}  " + "  ".join(f"{nm:>34}" for nm in names))
    for layer in next(iter(layers.values())):
        print(f"{layer:>5}  " + "  ".join(f"{layers[nm][layer]:>34.2f}" for nm in names))
    out = Path(a.out) if a.out else Path(a.run_dir) / "plots"
    plot(results, n, out / "attention_rank.png", f"{cfg.model.arch.upper()} {step_dir.name}: attention rank per layer")
    (out / "attention_rank.json").write_text(json.dumps(results, indent=1) + "\n")
    print(out / "attention_rank.png")
    return 0
