"""`archscale inspect`: see what each architecture and objective really sees.

    archscale inspect [CONFIG.yaml] [a.b=c ...] [--batches 1] [--rows 2] [--mask DIR] [--plain]
    archscale inspect --batch RUN/nonfinite/batch-step-N.pt [--mask DIR]

Builds the data stream and the objective exactly as training would (same config, tokenizer,
packing, seed) and prints the first batches decoded, row by row and example by example:

    ⟦prefix⟧   bidirectional prefix (ND; the encoder input of ED)    cyan
    ‹input›    input the model conditions on causally, no loss         plain
    «target»   tokens in the loss                                      green
    <extra_id_N> sentinels are shown as ⟨N⟩                            magenta
    ∅          padding                                                 dim

`--mask DIR` saves PNG pictures of the attention masks the model will use for the first row of
the batch, per mask mode: causal / prefix self-attention with packed documents, each
mixed-direction head / layer direction, the encoder and the cross-attention. Pixels are the
model_zoo masks themselves (white = may attend).
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

PREFIX, INPUT, TARGET, PAD = "prefix", "input", "target", "pad"
_COLOURS = {PREFIX: "\033[36m", TARGET: "\033[32m", PAD: "\033[2m", "sentinel": "\033[35m"}
_MARKS = {PREFIX: ("⟦", "⟧"), INPUT: ("‹", "›"), TARGET: ("«", "»"), PAD: ("", "")}
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


@dataclass
class Span:
    """A run of tokens of one example with one role."""

    role: str
    ids: list


def token_roles(batch: dict, row: int, decoder_side: bool = False) -> list[tuple[int, int, str]]:
    """(segment id, token id, role) for each token of a row, read from the batch itself.

    Decoder rows (HF convention: labels[t] is token t's own target, shifted in the model):
    role target if labels[t] != -100, prefix if bidirectional[t], padding if segment 0, else
    input. ED: the encoder row is all prefix (bidirectional); `decoder_side` reads the decoder
    row, where labels are aligned with the outputs.
    """
    if decoder_side:
        ids, seg, labels = batch["decoder_input_ids"][row], batch["decoder_segment_ids"][row], batch["labels"][row]
        # the decoder input is shift-right(targets): show the targets themselves
        shown = torch.where(labels != -100, labels, ids)
        return [(int(s), int(t), PAD if s == 0 else (TARGET if l != -100 else INPUT))
                for s, t, l in zip(seg.tolist(), shown.tolist(), labels.tolist())]
    ids, seg = batch["input_ids"][row], batch["segment_ids"][row]
    if "decoder_input_ids" in batch:  # ED encoder: bidirectional over each example
        return [(int(s), int(t), PAD if s == 0 else PREFIX) for s, t in zip(seg.tolist(), ids.tolist())]
    labels = batch["labels"][row]
    bidir = batch.get("bidirectional")
    bidir = bidir[row].tolist() if bidir is not None else [False] * len(ids)
    return [(int(s), int(t), PAD if s == 0 else TARGET if l != -100 else PREFIX if b else INPUT)
            for s, t, l, b in zip(seg.tolist(), ids.tolist(), labels.tolist(), bidir)]


def spans(roles: list[tuple[int, int, str]]) -> list[tuple[int, list[Span]]]:
    """Group a row's tokens into examples (segments) and runs of one role."""
    out: list[tuple[int, list[Span]]] = []
    for seg, tok, role in roles:
        if not out or out[-1][0] != seg:
            out.append((seg, []))
        runs = out[-1][1]
        if runs and runs[-1].role == role:
            runs[-1].ids.append(tok)
        else:
            runs.append(Span(role, [tok]))
    return out


def render_span(span: Span, tok, colour: bool) -> str:
    if span.role == PAD:
        text = "∅" * len(span.ids) if len(span.ids) <= 8 else f"∅ x{len(span.ids)}"
        return f"{_COLOURS[PAD]}{text}\033[0m" if colour else text
    text = tok.decode(span.ids, skip_special_tokens=False).replace("\n", "⏎")
    text = _SENTINEL.sub(lambda m: (f"{_COLOURS['sentinel']}⟨{m.group(1)}⟩\033[0m" + _COLOURS.get(span.role, "")
                                    if colour else f"⟨{m.group(1)}⟩"), text)
    left, right = _MARKS[span.role]
    body = f"{left}{text}{right}"
    if colour and span.role in _COLOURS:
        return f"{_COLOURS[span.role]}{body}\033[0m"
    return body


def render_batch(batch: dict, tok, rows: int = 2, colour: bool = False, width: int = 400) -> str:
    ed = "decoder_input_ids" in batch
    lines = []
    for r in range(min(rows, batch["input_ids"].shape[0])):
        lines.append(f"── row {r} " + "─" * 40)
        enc = spans(token_roles(batch, r))
        dec = dict(spans(token_roles(batch, r, decoder_side=True))) if ed else {}
        for seg, runs in enc:
            head = "padding" if seg == 0 else f"example {seg}"
            n = sum(len(s.ids) for s in runs)
            text = "".join(render_span(s, tok, colour) for s in runs)
            lines.append(f"  [{head}, {n} tokens{' -> encoder' if ed else ''}] {_clip(text, width)}")
            if ed and seg in dec:
                d = "".join(render_span(s, tok, colour) for s in dec[seg])
                lines.append(f"  [{head}, {sum(len(s.ids) for s in dec[seg])} tokens -> decoder] {_clip(d, width)}")
    legend = "⟦prefix: bidirectional⟧ ‹input: causal, no loss› «target: in the loss» ⟨N⟩ sentinel N, ∅ padding"
    return "\n".join([legend] + lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ------------------------------------------------------------------------------------- masks
def row_masks(batch: dict, row: int, n_heads: int = 4, n_layers: int = 2) -> dict[str, torch.Tensor]:
    """The boolean attention masks the model uses for one row, by mode: name -> [Tq, Tk]."""
    from model_zoo.masks import MaskSpec

    seg = batch["segment_ids"][row:row + 1]
    t = seg.shape[1]
    out = {}
    if "decoder_input_ids" in batch:
        dseg = batch["decoder_segment_ids"][row:row + 1]
        to = dseg.shape[1]
        for d in ("full", "mixed_heads", "forward", "backward"):
            m = MaskSpec(seg, t, t, causal=False, direction=d, n_heads=n_heads).dense(1, "cpu")[0]
            out.update(_per_head(f"encoder {d}", m))
        out["decoder self-attention (causal)"] = MaskSpec(dseg, to, to, causal=True).dense(1, "cpu")[0, 0]
        out["cross-attention"] = MaskSpec(seg, to, t, causal=False, cross=True, cross_q_segments=dseg).dense(1, "cpu")[0, 0]
        return out
    bidir = batch.get("bidirectional")
    out["CD: causal, packed documents"] = MaskSpec(seg, t, t, causal=True).dense(1, "cpu")[0, 0]
    if bidir is not None and bool(bidir[row].any()):
        b = bidir[row:row + 1]
        for d in ("full", "mixed_heads", "forward", "backward"):
            m = MaskSpec(seg, t, t, causal=True, bidir=b, direction=d, n_heads=n_heads).dense(1, "cpu")[0]
            out.update(_per_head(f"ND prefix {d}", m))
    return out


def _per_head(name: str, m: torch.Tensor) -> dict[str, torch.Tensor]:
    if m.shape[0] == 1:
        return {name: m[0]}
    half = m.shape[0] // 2
    return {f"{name} (heads 0-{half - 1}: forward)": m[0], f"{name} (heads {half}-{m.shape[0] - 1}: backward)": m[-1]}


def save_mask_pictures(batch: dict, out_dir: Path, row: int = 0) -> list[Path]:
    """One PNG per mask mode; pixel (q, k) white where query q may attend to key k."""
    from .plots import pyplot, save

    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    masks = row_masks(batch, row)
    paths = []
    for name, m in masks.items():
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        path = out_dir / f"mask-{slug}.png"
        plt.imsave(path, m.numpy().astype("float32"), cmap="gray", vmin=0, vmax=1)
        paths.append(path)
    # one overview figure with titles, for the README
    cols = min(4, len(masks))
    fig, axes = plt.subplots((len(masks) + cols - 1) // cols, cols, figsize=(4 * cols, 4 * ((len(masks) + cols - 1) // cols)),
                             squeeze=False)
    for ax, (name, m) in zip(axes.flat, masks.items()):
        ax.imshow(m.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    for ax in list(axes.flat)[len(masks):]:
        ax.axis("off")
    return paths + [save(fig, out_dir / "masks.png", dpi=90)]


# ------------------------------------------------------------------------------------ command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("args", nargs="*", help="[CONFIG.yaml] then overrides a.b=c, as for archscale train")
    p.add_argument("--batches", type=int, default=1, help="how many batches to show")
    p.add_argument("--rows", type=int, default=2, help="rows of each batch to show")
    p.add_argument("--mask", default=None, metavar="DIR", help="save the attention masks of the first row as PNGs")
    p.add_argument("--plain", action="store_true", help="no colour (the default when not on a terminal)")
    p.add_argument("--batch", default=None, metavar="FILE", help="show a saved batch (torch.save of a Batch dict)")
    a = p.parse_args(argv)
    from ..config import split_config_args
    from ..config import ConfigError, load_config

    path, overrides = split_config_args(a.args)
    try:
        cfg = load_config(path, overrides)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..data import build_stream, prepare
    from ..data.tokenizer import load_tokenizer
    from ..objectives import pop_counts

    colour = not a.plain and sys.stdout.isatty()
    if a.batch:
        from ..trainer.checkpointing import CheckpointError
        from ..trainer.integrity import safe_torch_load

        try:  # weights only: a pickle that would run code is refused
            batches = [safe_torch_load(a.batch, "batch file")]
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not isinstance(batches[0], dict):
            print(f"error: batch file {a.batch} holds a {type(batches[0]).__name__}, not a batch (a dict of "
                  f"tensors as the trainer's non-finite dump writes it)", file=sys.stderr)
            return 2
        tok, _ = load_tokenizer(cfg.data)
    else:
        try:
            prepared = prepare(cfg.data, cfg.objective)
            stream = build_stream(prepared, cfg.objective, cfg.model.arch, global_batch_size=max(a.rows, 1),
                                  seed=cfg.data.seed, data=cfg.data)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        tok = prepared.tokenizer
        batches = [next(stream) for _ in range(a.batches)]
    for i, batch in enumerate(batches):
        counts = pop_counts(batch) if "num_tokens" in batch else {}
        print(f"batch {i}: {cfg.model.arch.upper()}:{cfg.objective.name.upper()} "
              + " ".join(f"{k}={v}" for k, v in counts.items()))
        print(render_batch(batch, tok, a.rows, colour))
    if a.mask:
        for path in save_mask_pictures(batches[0], Path(a.mask)):
            print(path)
    return 0
