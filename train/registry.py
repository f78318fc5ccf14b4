"""What the trainer asks of an architecture: one registry entry per architecture.

The trainer never branches on the architecture's name; it looks up `ARCHITECTURES[arch]` and
calls what the entry gives: build a model (also on the meta device), the tokens a batch row
carries, the exact training FLOPs of a batch, parameter counts, and the pipeline layers. A
fourth architecture is one entry here (and its model in model_zoo/).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import model_zoo


def _segments(seg: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row: (segment id, length) of each contiguous run."""
    out = []
    for row in seg.tolist():
        runs, prev, n = [], None, 0
        for s in row:
            if s == prev:
                n += 1
            else:
                if prev is not None:
                    runs.append((prev, n))
                prev, n = s, 1
        if prev is not None:
            runs.append((prev, n))
        out.append(runs)
    return out


def decoder_batch_flops(config, batch: dict) -> float:
    """Training FLOPs of a packed decoder batch, attention counted per example as its mask
    requires (model_zoo.train_flops summed over the examples; padding counts as computed)."""
    seg, bidir = batch["segment_ids"], batch.get("bidirectional")
    total = 0.0
    for b, runs in enumerate(_segments(seg)):
        start = 0
        for _, n in runs:
            p = int(bidir[b, start:start + n].sum()) if bidir is not None else 0
            total += model_zoo.train_flops(config, n, prefix_len=p)
            start += n
    return total


def ed_batch_flops(config, batch: dict) -> float:
    """Training FLOPs of a packed ED batch: encoder and decoder examples matched by segment id."""
    total = 0.0
    for enc_runs, dec_runs in zip(_segments(batch["segment_ids"]), _segments(batch["decoder_segment_ids"])):
        enc, dec = {}, {}
        for s, n in enc_runs:
            enc[s] = enc.get(s, 0) + n
        for s, n in dec_runs:
            dec[s] = dec.get(s, 0) + n
        for s in set(enc) | set(dec):
            total += model_zoo.train_flops(config, enc.get(s, 0), target_len=dec.get(s, 0))
    return total


@dataclass(frozen=True)
class ArchSpec:
    name: str
    family: str  # "decoder" | "encoder_decoder": which batch layout the objectives produce
    batch_flops: Callable
    description: str

    def tokens_per_row(self, objective) -> int:
        return objective.tokens_per_example(self.name)

    @staticmethod
    def _options(model_cfg, vocab_size: int | None) -> dict:
        options = {"attn_impl": model_cfg.attn_impl, "z_loss": model_cfg.z_loss, "loss_impl": model_cfg.loss_impl}
        if vocab_size is not None:
            options["vocab_size"] = vocab_size
        return {**options, **model_cfg.overrides}  # explicit overrides win

    def make_config(self, model_cfg, vocab_size: int | None = None):
        """The model_zoo config for this run's `model` section (vocab from the tokenizer)."""
        return model_zoo.make_config(self.name, model_cfg.size, **self._options(model_cfg, vocab_size))

    def build(self, model_cfg, vocab_size: int | None = None, device=None):
        return model_zoo.build(self.name, model_cfg.size, device=device, **self._options(model_cfg, vocab_size))

    def num_params(self, config) -> int:
        return model_zoo.num_params(config)

    def num_layers(self, config) -> int:
        """Blocks a pipeline splits (encoder + decoder for ED)."""
        return config.n_layers * (2 if self.family == "encoder_decoder" else 1)

    def pipeline_module(self, model, num_stages: int, **kwargs):
        from . import pipeline

        return pipeline.build_pipeline_module(model, num_stages, **kwargs)


ARCHITECTURES = {
    "cd": ArchSpec("cd", "decoder", decoder_batch_flops, "causal decoder"),
    "nd": ArchSpec("nd", "decoder", decoder_batch_flops, "prefix (non-causal) decoder"),
    "ed": ArchSpec("ed", "encoder_decoder", ed_batch_flops, "encoder-decoder"),
}


def get(arch: str) -> ArchSpec:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n tokens, rounded up (aligned matmuls on GPUs)."""
    return -(-n // multiple) * multiple
