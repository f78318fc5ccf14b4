"""`python -m bench compile-check` (or `python -m bench.compile_check`): graph breaks and
recompiles of the compiled blocks (model.compile, train.engine.runtime.prepare_blocks), per
model variant, on CPU with inductor, and the compiled flex forward against the reference.

For each variant (CD, ND full / mixed_heads / mixed_layers, ED; T5 bias and RoPE), debug size,
3 batches of the same shape and different packing (2-4 examples per row, random prefixes):
  train  the CPU training path (`attn_impl=auto`: SDPA with the dense mask), forward + backward,
         the loss equal to the eager model's;
  flex   `attn_impl=flex` with flex's compiled wrapper switched on for CPU as it is on CUDA
         (model_zoo.blocks.COMPILED_FLEX_DEVICES), forward only (flex has no CPU backward in
         torch 2.13), logits equal to `attn_impl=reference` (every block mask and score_mod:
         segments, prefixes, both mixed directions, encoder, cross-attention, the T5 bias).
Counted by torch._dynamo.utils.counters: breaks = counters["graph_break"] (summed over reasons),
graphs = counters["stats"]["unique_graphs"]; recompiles = graphs added by batches 2 and 3 (the
first batch compiles one graph per stack kind and mask direction). Pitfall: inductor's on-disk
cache makes a second run fast (cache hits), not different. See TORCH_LOGS=recompiles,graph_breaks
for the reasons of a non-zero count.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import torch

# name -> (arch, model_zoo overrides): every mask direction, both position encodings
VARIANTS = {
    "cd-t5bias": ("cd", {}),
    "cd-rope": ("cd", dict(position="rope", mlp="swiglu")),
    "nd-full": ("nd", {}),
    "nd-mixed_heads": ("nd", dict(bidirectional_mode="mixed_heads", position="rope")),
    "nd-mixed_layers": ("nd", dict(bidirectional_mode="mixed_layers")),
    "ed-t5bias": ("ed", {}),
    "ed-rope": ("ed", dict(position="rope")),
}
MODES = ("train", "flex")
# fp32 on CPU: compiled kernels reorder sums (train: the loss; flex: logits of a 64-wide model)
TOLERANCE = {"train": 2e-5, "flex": 1e-5}


def packed_batch(arch: str, seed: int, b: int = 2, t: int = 256) -> dict:
    """The registry's random batch (its family's keys; t tokens per row on every side) repacked:
    every `*segment_ids` cut into 2-3 examples at the same random fractions of its length (so a
    decoder segment has its encoder segment), `bidirectional` (ND) a random prefix in each. Same
    shapes for every seed, different packing (t = 256: two flex blocks of 128 per side)."""
    from train.registry import Lengths, get

    g = torch.Generator().manual_seed(seed)
    batch = get(arch).random_batch(b, Lengths(decoder=t, encoder=t), 500, g)
    fracs = torch.rand(b, 2, generator=g).sort(dim=1).values * 0.8 + 0.1  # (B, 2) cut points in (0.1, 0.9)
    for key in [k for k in batch if k.endswith("segment_ids")]:
        n = batch[key].shape[1]
        cuts = (fracs * n).long()  # (B, 2)
        batch[key] = 1 + (torch.arange(n)[None, :, None] >= cuts[:, None, :]).sum(-1)  # (B, n) ids 1..3
    if "bidirectional" in batch:
        seg = batch["segment_ids"]
        pos = torch.arange(t)[None, :] - (torch.arange(t)[None, :] * (seg != seg.roll(1, 1))).cummax(1).values
        prefix = torch.randint(1, 64, (b, 1), generator=g)  # a prefix of up to 63 tokens in every example
        batch["bidirectional"] = (pos < prefix) & batch["bidirectional"].any(1, keepdim=True)  # CD: none
        batch["labels"] = batch["input_ids"].masked_fill(batch["bidirectional"], -100)
    return {k: v for k, v in batch.items() if not k.endswith("position_ids")}  # positions from the segments


def _counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def check_variant(name: str, mode: str, batches: int = 3, n_layers: int = 2) -> dict:
    """Compile one variant's blocks, run `batches` batches, return its counts and the largest
    difference from the uncompiled reference (train: |loss| difference; flex: max |logit|)."""
    import model_zoo
    from model_zoo import blocks
    from torch._dynamo.utils import counters
    from train.engine.runtime import prepare_blocks

    if name not in VARIANTS or mode not in MODES:
        raise ValueError(f"unknown variant {name!r} / mode {mode!r}; choose from {', '.join(VARIANTS)} / "
                         f"{', '.join(MODES)}")
    arch, over = VARIANTS[name]
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    impl = ("flex", "reference") if mode == "flex" else ("auto", "auto")
    fast = model_zoo.build(arch, "debug", n_layers=n_layers, attn_impl=impl[0], **over)
    ref = model_zoo.build(arch, "debug", n_layers=n_layers, attn_impl=impl[1], **over)
    ref.load_state_dict(fast.state_dict())
    prepare_blocks(fast, "none", compile=True)
    saved, t0 = blocks.COMPILED_FLEX_DEVICES, time.perf_counter()
    blocks.COMPILED_FLEX_DEVICES = saved + ("cpu",)  # the CUDA path: eager flex calls compiled
    graphs, err = [], 0.0
    try:
        for seed in range(batches):
            batch = packed_batch(arch, seed)
            if mode == "flex":
                with torch.no_grad():
                    a, r = fast.eval()(**batch).logits, ref.eval()(**batch).logits
                err = max(err, float((a - r).abs().max()))
            else:
                out = fast(**batch)
                out.loss.backward()
                err = max(err, abs(float(out.loss) - float(ref(**batch).loss)))
            graphs.append(_counts()[1])
    finally:
        blocks.COMPILED_FLEX_DEVICES = saved
    return dict(variant=name, mode=mode, graphs=graphs[0], recompiles=graphs[-1] - graphs[0], breaks=_counts()[0],
                break_reasons=sorted(counters["graph_break"]), max_err=err, ok=err <= TOLERANCE[mode],
                seconds=time.perf_counter() - t0)


def format_results(results: list[dict]) -> str:
    head = f"{'variant':<16} {'mode':<6} {'graphs':>6} {'breaks':>6} {'recompiles':>10} {'max err':>9} {'s':>6}  equal"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['variant']:<16} {r['mode']:<6} {r['graphs']:>6} {r['breaks']:>6} {r['recompiles']:>10} "
                     f"{r['max_err']:>9.1e} {r['seconds']:>6.1f}  {'yes' if r['ok'] else 'NO'}")
        lines += [f"  break: {reason}" for reason in r["break_reasons"]]
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench compile-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--modes", default=",".join(MODES), help="train (SDPA, fwd+bwd), flex (forward), or both")
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    modes = [m for m in a.modes.split(",") if m]
    bad = [v for v in names if v not in VARIANTS] + [m for m in modes if m not in MODES]
    if bad:
        print(f"error: unknown variant(s) or mode(s) {bad}; variants: {', '.join(VARIANTS)}; modes: "
              f"{', '.join(MODES)}", file=sys.stderr)
        return 2
    results = []
    for mode in modes:
        for name in names:
            results.append(check_variant(name, mode))
            print(f"[compile-check] {name} {mode}: {results[-1]['breaks']} breaks, {results[-1]['recompiles']} "
                  f"recompiles ({results[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(format_results(results))
    bad = [r for r in results if r["breaks"] or r["recompiles"] or not r["ok"]]
    print(f"{len(bad)} of {len(results)} variant(s) with graph breaks, recompiles or a difference over tolerance")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
