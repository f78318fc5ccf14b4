"""What the trainer asks of an architecture: one registry entry per architecture.

The trainer never branches on the architecture's name; it looks up `ARCHITECTURES[arch]` and
calls what the entry gives: build a model (also on the meta device), the tokens a batch row
carries, the exact training FLOPs of a batch, parameter counts, and the pipeline layers. A
fourth architecture is one entry here (and its model in model_zoo/).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .objectives.config import OBJECTIVES

# model_zoo (and torch) are imported where used: train.config.derive checks an objective's fit
# through this module on a login node (`archscale submit`), which never imports torch.


def _train_flops(config, *args, **kwargs) -> float:
    import model_zoo

    return model_zoo.train_flops(config, *args, **kwargs)


def _segments(seg) -> list[list[tuple[int, int]]]:
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
            total += _train_flops(config, n, prefix_len=p)
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
            total += _train_flops(config, enc.get(s, 0), target_len=dec.get(s, 0))
    return total


@dataclass(frozen=True)
class Lengths:
    """Token lengths one batch row carries through the model."""

    decoder: int             # decoder tokens per row (CD/ND: the whole row; ED: the decoder row)
    encoder: int = 0         # ED: encoder tokens per row


def _decoder_row_lengths(objective) -> Lengths:
    return Lengths(decoder=objective.seq_length)


def _ed_row_lengths(objective) -> Lengths:
    if objective.name == "plm":
        return Lengths(decoder=objective.seq_length, encoder=objective.seq_length)
    return Lengths(decoder=objective.targets_length, encoder=objective.inputs_length)


def _decoder_row_flops(config, objective, bidirectional_prefix: bool) -> float:
    """One decoder row of seq_length T: causal (CD, and every FLM row); ND: prefix = inputs_length
    for mlm / ul2 / prompted, uniform over the row for plm (the mean over split points)."""
    o, T = objective, objective.seq_length
    if not bidirectional_prefix or o.name == "flm":
        return _train_flops(config, T)
    if o.name == "plm":
        return sum(_train_flops(config, T, prefix_len=p) for p in range(1, T)) / (T - 1)
    return _train_flops(config, T, prefix_len=min(o.inputs_length, T - 1))


def _ed_row_flops(config, objective) -> float:
    """One ED row: encoder inputs_length / decoder targets_length; plm: `ed_plm_examples_per_row`
    examples of seq_length // k tokens, each split uniformly (mean over split points), plus the
    padding of both rows (on average half of each) counted as one more example, as computed."""
    o = objective
    if o.name != "plm":
        return _train_flops(config, o.inputs_length, target_len=o.targets_length)
    k, T = o.ed_plm_examples_per_row, o.seq_length
    n = T // k
    real = k * sum(_train_flops(config, p, target_len=n - p) for p in range(1, n)) / (n - 1)
    pad = T - k * n / 2  # tokens of padding in each of the two rows, on average
    return real + _train_flops(config, int(round(pad)), target_len=int(round(pad)))


@dataclass(frozen=True)
class ArchSpec:
    name: str
    family: str  # "decoder" | "encoder_decoder": which batch layout the objectives produce
    batch_flops: Callable
    description: str
    objectives: tuple[str, ...]  # the objectives that fit (train.objectives.OBJECTIVES)
    bidirectional_prefix: bool = False  # decoder: a row's prefix is attended bidirectionally (ND)

    def check_objective(self, objective_name: str) -> None:
        """Raises ValueError (one line, with the fix) if the objective does not fit: the one check
        that train, --dry-run, plan, submit and sweep share (through train.config.derive)."""
        if objective_name not in self.objectives:
            fits = [a for a, s in ARCHITECTURES.items() if objective_name in s.objectives]
            raise ValueError(f"objective {objective_name!r} does not fit arch {self.name!r} ({self.description}); "
                             f"use objective {' or '.join(repr(o) for o in self.objectives)} for {self.name}, "
                             f"or arch {' / '.join(repr(a) for a in fits)} for {objective_name}")

    def tokens_per_row(self, objective) -> int:
        return objective.tokens_per_example(self.name)

    def row_lengths(self, objective) -> Lengths:
        """The row shape train/objectives produces for this architecture (ObjectiveConfig's docstring)."""
        self.check_objective(objective.name)
        return _ed_row_lengths(objective) if self.family == "encoder_decoder" else _decoder_row_lengths(objective)

    def row_flops(self, config, objective) -> float:
        """Expected training FLOPs of one batch row as computed (model_zoo.train_flops; padding
        computed): the one analytic figure that --dry-run, plan and the reports use per row. The
        loop counts each batch exactly (`batch_flops`, attention per packed document)."""
        self.check_objective(objective.name)
        if self.family == "encoder_decoder":
            return _ed_row_flops(config, objective)
        return _decoder_row_flops(config, objective, self.bidirectional_prefix)

    @staticmethod
    def _options(model_cfg, vocab_size: int | None) -> dict:
        options = {"attn_impl": model_cfg.attn_impl, "z_loss": model_cfg.z_loss, "loss_impl": model_cfg.loss_impl}
        if vocab_size is not None:
            options["vocab_size"] = vocab_size
        return {**options, **model_cfg.overrides}  # explicit overrides win

    def make_config(self, model_cfg, vocab_size: int | None = None):
        """The model_zoo config for this run's `model` section (vocab from the tokenizer)."""
        import model_zoo

        return model_zoo.make_config(self.name, model_cfg.size, **self._options(model_cfg, vocab_size))

    def build(self, model_cfg, vocab_size: int | None = None, device=None):
        import model_zoo

        return model_zoo.build(self.name, model_cfg.size, device=device, **self._options(model_cfg, vocab_size))

    def num_params(self, config) -> int:
        import model_zoo

        return model_zoo.num_params(config)

    def num_layers(self, config) -> int:
        """Blocks a pipeline splits (encoder + decoder for ED)."""
        return config.n_layers * (2 if self.family == "encoder_decoder" else 1)

    def pipeline_module(self, model, num_stages: int, **kwargs):
        from . import pipeline

        return pipeline.build_pipeline_module(model, num_stages, **kwargs)


ARCHITECTURES = {
    "cd": ArchSpec("cd", "decoder", decoder_batch_flops, "causal decoder", OBJECTIVES),
    "nd": ArchSpec("nd", "decoder", decoder_batch_flops, "prefix (non-causal) decoder", OBJECTIVES,
                   bidirectional_prefix=True),
    # flm has no encoder input
    "ed": ArchSpec("ed", "encoder_decoder", ed_batch_flops, "encoder-decoder",
                   tuple(o for o in OBJECTIVES if o != "flm")),
}


def get(arch: str) -> ArchSpec:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n tokens, rounded up (aligned matmuls on GPUs)."""
    return -(-n // multiple) * multiple
