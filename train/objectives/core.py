"""Objectives as pure transforms: a piece of a document (token ids) -> Example(inputs, targets).

Every objective is a mixture of one or more *variants* (FLM, PLM and MLM have one; UL2 has one
per denoiser). A variant knows, for a piece of n tokens:
  lengths(n, words) -> (inputs_length, targets_length)   exact, vectorised, before any corruption
  make(tokens, word) -> (inputs, targets)                 the example itself
where `word` is the example's 64-bit random word (see `rng`). Because lengths are known up front,
the packer plans rows from lengths alone and only the rank that owns a row builds its examples.

| objective | inputs (prefix)                        | targets                        |
|-----------|----------------------------------------|--------------------------------|
| flm       | (none)                                 | all n tokens                   |
| plm       | x[:s], s uniform in [1, n-1]           | x[s:]                          |
| mlm       | T5 corrupted x + EOS                   | sentinels + dropped spans + EOS|
| ul2 R/X   | [mode] + corrupted x + EOS             | sentinels + spans + EOS        |
| ul2 S     | [S2S] + x[:s], s uniform in [1, n-1]   | x[s:] + EOS                    |
Which row an Example goes into is `rows.py`: a row shape per family of architectures (decoder
rows, encoder-decoder rows, each with its tokens per row), chosen by the layout (`DecoderLayout`,
`EncoderDecoderLayout`) that the train/registry entry gives as its `.layout`; `batch.py` lays packed
rows out as tensors. Nothing here branches on an architecture's name (the name only appears in
messages).
Lengths are computed and checked at build time: a configuration that cannot fit fails there,
with the fix in the message, never mid-run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import rng
from .config import DenoiserConfig, ObjectiveConfig
from .rows import (MIN_PIECE, DecoderLayout, DecoderRows, EncoderDecoderLayout, EncoderDecoderRows,  # noqa: F401
                   RowShape, max_fitting_piece)
from .span_corruption import random_spans_helper, span_corrupt, span_corrupt_many, span_corruption_lengths


@dataclass(frozen=True)
class TokenInfo:
    """The token ids an objective needs: plain ints, so objectives never touch a tokenizer."""

    vocab_size: int
    pad_id: int
    eos_id: int
    sentinel_ids: tuple[int, ...] = ()  # <extra_id_0>, <extra_id_1>, ... in that order
    mode_ids: tuple[tuple[str, int], ...] = ()  # (("[NLU]", id), ...)

    def mode_id(self, mode: str) -> int:
        for name, i in self.mode_ids:
            if name == mode:
                return i
        raise ValueError(f"mode token {mode!r} is not in the tokenizer (it has {[m for m, _ in self.mode_ids]}); "
                         f"add it to data.mode_tokens or change the denoiser's mode")


@dataclass(frozen=True)
class Example:
    """One example: `inputs` (prefix / encoder side, may be empty for flm) and `targets`."""

    inputs: np.ndarray  # (n_in,) int64
    targets: np.ndarray  # (n_tgt,) int64


# ---------------------------------------------------------------------------------------- variants
class FullLM:
    """FLM: every token is a target (the first token of a row segment gets no loss in collate)."""

    name = "flm"
    document_eos = True

    def lengths(self, n, words):
        n = np.asarray(n, dtype=np.int64)
        return np.zeros_like(n), n

    def worst_lengths(self, n):
        return self.lengths(n, None)

    def total_length(self, n):
        return np.asarray(n, dtype=np.int64)

    def make(self, tokens, word):
        return np.zeros(0, dtype=np.int64), np.asarray(tokens, dtype=np.int64)


class PrefixLM:
    """PLM: split at s drawn uniformly in [1, n-1] per example (from its random word).

    `prefix` tokens (a UL2 mode token) go before the inputs and `eos` (UL2 S) after the targets.
    """

    def __init__(self, prefix: tuple[int, ...] = (), eos: int | None = None, name: str = "plm"):
        self.prefix = tuple(prefix)
        self.eos = eos
        self.name = name
        self.document_eos = eos is None  # plain PLM keeps the document's own EOS as its end marker

    def split(self, n, words):
        """Split points s in [1, n-1]: the prefix is x[:s]."""
        return rng.uniform_int(words, 1, np.asarray(n, dtype=np.int64) - 1)

    def lengths(self, n, words):
        n = np.asarray(n, dtype=np.int64)
        s = self.split(n, words)
        return s + len(self.prefix), n - s + (self.eos is not None)

    def worst_lengths(self, n):
        n = np.asarray(n, dtype=np.int64)
        return n - 1 + len(self.prefix), n - 1 + (self.eos is not None)

    def total_length(self, n):
        return np.asarray(n, dtype=np.int64) + len(self.prefix) + (self.eos is not None)

    def make(self, tokens, word):
        tokens = np.asarray(tokens, dtype=np.int64)
        s = int(self.split(len(tokens), word))
        tail = np.array([self.eos] if self.eos is not None else [], dtype=np.int64)
        return (np.concatenate([np.asarray(self.prefix, dtype=np.int64), tokens[:s]]),
                np.concatenate([tokens[s:], tail]))

    def make_many(self, pieces, words):
        """`make` of each (piece, word), the split points drawn together."""
        n = np.fromiter((len(t) for t in pieces), dtype=np.int64, count=len(pieces))
        head = np.asarray(self.prefix, dtype=np.int64)
        tail = np.array([self.eos] if self.eos is not None else [], dtype=np.int64)
        out = []
        for t, s in zip(pieces, self.split(n, words).tolist()):
            t = np.asarray(t, dtype=np.int64)
            out.append((np.concatenate([head, t[:s]]) if len(head) else t[:s],
                        np.concatenate([t[s:], tail]) if len(tail) else t[s:]))
        return out


class SpanCorruption:
    """MLM: T5 span corruption (see span_corruption.py); `prefix` = UL2 mode token, if any."""

    document_eos = False  # T5 appends EOS to the corrupted inputs and targets instead

    def __init__(self, noise_density: float, mean_span_length: float, sentinel_ids, eos_id: int,
                 prefix: tuple[int, ...] = (), name: str = "mlm"):
        self.noise_density = noise_density
        self.mean_span_length = mean_span_length
        self.sentinel_ids = np.asarray(sentinel_ids, dtype=np.int64)
        self.eos_id = eos_id
        self.prefix = tuple(prefix)
        self.name = name

    def lengths(self, n, words):
        return span_corruption_lengths(n, self.noise_density, self.mean_span_length,
                                       extra_inputs=1 + len(self.prefix))

    def worst_lengths(self, n):
        return self.lengths(n, None)

    def total_length(self, n):
        inp, tgt = self.lengths(n, None)
        return inp + tgt

    def num_spans(self, n):
        """Noise spans (= sentinels used) in pieces of n tokens: inputs + targets = n + 2 spans + 2."""
        inp, tgt = span_corruption_lengths(n, self.noise_density, self.mean_span_length)
        return (inp + tgt - np.asarray(n) - 2) // 2

    def make(self, tokens, word):
        return span_corrupt(tokens, self.noise_density, self.mean_span_length, rng.generator(word),
                            self.sentinel_ids, self.eos_id, self.prefix)

    def make_many(self, pieces, words):
        """`make` of each (piece, word), laid out together (span_corrupt_many)."""
        return span_corrupt_many(pieces, self.noise_density, self.mean_span_length, rng.generators(words),
                                 self.sentinel_ids, self.eos_id, self.prefix)


# --------------------------------------------------------------------------------------- objective
class Objective:
    """A mixture of variants with per-variant piece lengths, fitted to a RowShape.

    Documents are cut into pieces of at most `max_piece[v]` tokens for the variant v chosen for the
    document (UL2 draws one per document from its random word; other objectives have one variant).
    Pieces shorter than MIN_PIECE tokens are skipped by the stream and counted.
    """

    def __init__(self, name: str, shape: RowShape, variants: list, rates: list[float],
                 max_piece: list[int], tokens: TokenInfo):
        self.name = name
        self.shape = shape
        self.variants = variants
        self.cum_rates = np.cumsum(np.asarray(rates, dtype=np.float64) / np.sum(rates))
        self.max_piece = np.asarray(max_piece, dtype=np.int64)
        self.tokens = tokens
        self.min_piece = MIN_PIECE
        self.document_eos = variants[0].document_eos

    def choose_variant(self, doc_words) -> np.ndarray:
        """Variant index per document (uniform draw against the cumulative rates)."""
        u = rng.uniform_float(doc_words)
        return np.minimum(np.searchsorted(self.cum_rates, u, side="right"), len(self.variants) - 1)

    def lengths(self, n, variant, words):
        """(inputs_length, targets_length) of pieces of n tokens, vectorised over pieces."""
        n, variant, words = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(variant), np.asarray(words, np.uint64))
        inp = np.zeros(n.shape, dtype=np.int64)
        tgt = np.zeros(n.shape, dtype=np.int64)
        for v, var in enumerate(self.variants):
            sel = variant == v
            if sel.any():
                inp[sel], tgt[sel] = var.lengths(n[sel], words[sel])
        return inp, tgt

    def make(self, tokens, variant: int, word) -> Example:
        inputs, targets = self.variants[int(variant)].make(tokens, np.uint64(word))
        return Example(inputs, targets)

    def make_many(self, pieces: list, variants, words) -> list[Example]:
        """[make(t, v, w) for t, v, w in zip(pieces, variants, words)], each variant's examples at once."""
        variants = np.asarray(variants, dtype=np.int64).reshape(-1)  # (E,)
        words = np.asarray(words, dtype=np.uint64).reshape(-1)  # (E,)
        out: list = [None] * len(pieces)
        for v, var in enumerate(self.variants):
            idx = np.flatnonzero(variants == v).tolist()
            if not idx:
                continue
            many = getattr(var, "make_many", None)
            if many is None:
                made = [var.make(pieces[i], words[i]) for i in idx]
            else:
                made = many([pieces[i] for i in idx], words[idx])
            for i, (inputs, targets) in zip(idx, made):
                out[i] = Example(inputs, targets)
        return out

    def describe(self) -> str:
        parts = [f"{v.name}: pieces <= {p}" for v, p in zip(self.variants, self.max_piece)]
        return f"{self.name} on {self.shape}: " + "; ".join(parts)


def build_objective(cfg: ObjectiveConfig, arch, tokens: TokenInfo) -> Objective:
    """The objective of `cfg` for architecture `arch`, with all lengths checked. `arch` is a
    train.registry entry (anything with `.name`, `.layout`, a DecoderLayout or
    EncoderDecoderLayout, and `.check_objective`): its layout's `shape` is the row shape (rows.py,
    the one the registry's tokens_per_row, row_lengths and row_flops read too), its
    check_objective whether the objective fits at all."""
    cfg.validate()
    arch.check_objective(cfg.name)
    layout, name, where = arch.layout, cfg.name, arch.name
    if name == "flm":
        shape = layout.shape(cfg, where)
        var = FullLM()
        return Objective(name, shape, [var], [1.0], [max_fitting_piece(var, shape, "flm")], tokens)

    if name == "plm":
        var = PrefixLM()
        shape = layout.shape(cfg, where)
        piece = layout.plm_piece(cfg, var, shape)
        return Objective(name, shape, [var], [1.0], [piece], tokens)

    if name == "mlm":
        _need_sentinels(tokens, "mlm")
        tokens_length, targets_length = random_spans_helper(
            cfg.inputs_length, cfg.noise_density, cfg.mean_noise_span_length)
        if targets_length != cfg.targets_length:
            raise ValueError(
                f"objective.targets_length={cfg.targets_length} does not match inputs_length={cfg.inputs_length} "
                f"at noise_density={cfg.noise_density}, mean_noise_span_length={cfg.mean_noise_span_length}: "
                f"T5's random_spans_helper gives {tokens_length} raw tokens -> targets of {targets_length}; "
                f"set objective.targets_length={targets_length}")
        shape = layout.shape(cfg, where)  # a decoder's seq_length must be inputs + targets
        var = SpanCorruption(cfg.noise_density, cfg.mean_noise_span_length, tokens.sentinel_ids, tokens.eos_id)
        # The same raw pieces for every architecture (the controlled comparison): T5's tokens_length.
        piece = max_fitting_piece(var, shape, "mlm", cap=tokens_length)
        _check_sentinels(var, piece, tokens, "mlm")
        return Objective(name, shape, [var], [1.0], [piece], tokens)

    if name == "ul2":
        shape = layout.shape(cfg, where)
        variants, pieces = [], []
        for i, d in enumerate(cfg.denoisers):
            var = _denoiser_variant(d, i, tokens)
            piece = max_fitting_piece(var, shape, f"objective.denoisers[{i}]")
            if isinstance(var, SpanCorruption):
                _check_sentinels(var, piece, tokens, f"objective.denoisers[{i}]")
            variants.append(var)
            pieces.append(piece)
        return Objective(name, shape, variants, [d.rate for d in cfg.denoisers], pieces, tokens)

    if name == "prompted":
        shape = layout.shape(cfg, where)
        obj = Objective(name, shape, [PrefixLM(name="prompted")], [1.0], [0], tokens)
        obj.prompted_max = shape.prompted_limits(cfg.targets_length)
        return obj
    raise AssertionError(name)  # validate() rejects other names


def prompted_lengths(objective: Objective, inputs_length, targets_length):
    """Lengths of prompted (input, target) records after truncation, vectorised.

    Targets keep their first `max_targets` tokens (decoder: min(targets_length, seq_length - 1));
    inputs keep their *last* tokens (a prompt ends with the question) up to what is left of the
    row (decoder: seq_length - targets) or the encoder length (ed).
    """
    max_in, max_tgt = objective.prompted_max
    tgt = np.minimum(np.asarray(targets_length, np.int64), max_tgt)
    room = objective.shape.prompted_room(tgt, max_in)
    return np.minimum(np.asarray(inputs_length, np.int64), room), tgt


def make_prompted(objective: Objective, inputs, targets) -> Example:
    """A prompted example, truncated as `prompted_lengths` says."""
    n_in, n_tgt = (int(v) for v in prompted_lengths(objective, len(inputs), len(targets)))
    inputs = np.asarray(inputs, dtype=np.int64)
    return Example(inputs[len(inputs) - n_in:], np.asarray(targets, dtype=np.int64)[:n_tgt])


def check_objective_config(cfg: ObjectiveConfig, arch, num_sentinels: int, mode_tokens) -> None:
    """Every check build_objective makes, before any tokenizer exists (the config check, before any
    work): the tokenizer's sentinels and mode tokens are what the data section will add
    (`data.num_sentinels` of <extra_id_*>, `data.mode_tokens`: train/data/tokenizer.py adds exactly
    those), so a stand-in TokenInfo with as many gives the same verdict; the ids do not matter to
    lengths. Raises build_objective's ValueError (one line, with the fix): a wrong mlm
    targets_length, rows too short for a piece, too few sentinels, a mode token missing."""
    modes = tuple(mode_tokens)
    first = 2 + len(modes)
    tokens = TokenInfo(vocab_size=first + num_sentinels, pad_id=0, eos_id=1,
                       sentinel_ids=tuple(range(first, first + num_sentinels)),
                       mode_ids=tuple((m, 2 + i) for i, m in enumerate(modes)))
    build_objective(cfg, arch, tokens)


def _denoiser_variant(d: DenoiserConfig, i: int, tokens: TokenInfo):
    prefix = (tokens.mode_id(d.mode),) if d.mode else ()
    if d.kind == "prefix":
        return PrefixLM(prefix=prefix, eos=tokens.eos_id, name=f"S{i}{d.mode}")
    _need_sentinels(tokens, f"objective.denoisers[{i}]")
    return SpanCorruption(d.noise_density, d.mean_span_length, tokens.sentinel_ids, tokens.eos_id, prefix,
                          name=f"{'R' if d.noise_density < 0.5 and d.mean_span_length < 12 else 'X'}{i}"
                               f"(mu={d.mean_span_length:g},r={d.noise_density:g}){d.mode}")


def _need_sentinels(tokens: TokenInfo, what: str) -> None:
    if not tokens.sentinel_ids:
        raise ValueError(f"{what} needs sentinel tokens <extra_id_0>... but the tokenizer has none; "
                         f"set data.num_sentinels > 0")


def _check_sentinels(var: SpanCorruption, piece: int, tokens: TokenInfo, what: str) -> None:
    spans = int(np.max(var.num_spans(np.arange(MIN_PIECE, piece + 1))))
    if spans > len(tokens.sentinel_ids):
        raise ValueError(f"{what}: pieces of up to {piece} tokens need up to {spans} sentinels but the tokenizer "
                         f"has {len(tokens.sentinel_ids)}; set data.num_sentinels >= {spans}")
