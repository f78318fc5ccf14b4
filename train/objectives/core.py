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
How an Example becomes rows is `batch.py`: a row shape per family of architectures (decoder rows,
encoder-decoder rows), chosen by the architecture's layout (`DecoderLayout`, `EncoderDecoderLayout`),
which train/registry names for each architecture; nothing here knows an architecture's name.
Lengths are computed and checked at build time: a configuration that cannot fit fails there,
with the fix in the message, never mid-run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import rng
from .config import DenoiserConfig, ObjectiveConfig
from .span_corruption import random_spans_helper, span_corrupt, span_corrupt_many, span_corruption_lengths

MIN_PIECE = 2  # one token to condition on and one to predict; shorter pieces are skipped and counted


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


@dataclass(frozen=True, repr=False)
class RowShape:
    """The fixed shape of a packed row and the attention layout of its inputs. A family's
    subclass (DecoderRows, EncoderDecoderRows) answers what differs between the layouts."""

    family: str  # "decoder" (cd, nd) | "encoder_decoder" (ed)
    bidirectional: bool  # decoder: inputs (prefix) attend bidirectionally (nd); False for cd
    length: int  # decoder rows: tokens per row
    encoder_length: int = 0  # encoder_decoder: encoder tokens per row
    decoder_length: int = 0  # encoder_decoder: decoder tokens per row
    packed_dims = 1  # lengths a row is packed by (the packer's best fit in 1 or 2 dimensions)

    def __repr__(self) -> str:  # one text for every family: it is part of a data stream's fingerprint
        return (f"RowShape(family={self.family!r}, bidirectional={self.bidirectional!r}, length={self.length!r}, "
                f"encoder_length={self.encoder_length!r}, decoder_length={self.decoder_length!r})")

    @property
    def capacity(self) -> tuple[int, int]:
        """Room of an empty row, in the units of `footprint`."""
        raise NotImplementedError

    def footprint(self, inputs_length, targets_length):
        """Room examples of these lengths take, in the units of `capacity`."""
        raise NotImplementedError

    def fitting_footprint(self, variant, n):
        """The room pieces of n tokens may take at worst over their random draws."""
        raise NotImplementedError

    def text(self) -> str:
        raise NotImplementedError

    def prompted_limits(self, targets_length: int) -> tuple[int, int]:
        """(max inputs, max targets) of a prompted example; see `prompted_lengths`."""
        raise NotImplementedError

    def prompted_room(self, targets, max_inputs: int):
        """Inputs a prompted example keeps next to `targets` target tokens."""
        raise NotImplementedError


class DecoderRows(RowShape):
    """Rows of `length` tokens, each example laid out as inputs ++ targets."""

    def __init__(self, length: int, bidirectional: bool = False):
        super().__init__("decoder", bidirectional, length)

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.length, 0)

    def footprint(self, inputs_length, targets_length):
        """inputs + targets, 0."""
        return inputs_length + targets_length, np.zeros_like(np.asarray(targets_length))

    def fitting_footprint(self, variant, n):
        """inputs + targets is deterministic (a PLM split only moves the border)."""
        return variant.total_length(n), np.zeros_like(n)

    def text(self) -> str:
        return f"seq_length={self.length}"

    def prompted_limits(self, targets_length: int) -> tuple[int, int]:
        return self.length - 1, min(targets_length, self.length - 1)

    def prompted_room(self, targets, max_inputs: int):
        return self.length - targets


class EncoderDecoderRows(RowShape):
    """An encoder row of `encoder_length` tokens (inputs) and a decoder row of `decoder_length`
    (targets), examples matched across the two by segment id."""

    packed_dims = 2

    def __init__(self, encoder_length: int, decoder_length: int):
        super().__init__("encoder_decoder", True, 0, encoder_length, decoder_length)

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.encoder_length, self.decoder_length)

    def footprint(self, inputs_length, targets_length):
        """inputs, targets."""
        return inputs_length, targets_length

    def fitting_footprint(self, variant, n):
        """Each side at its worst over the random split."""
        return self.footprint(*variant.worst_lengths(n))

    def text(self) -> str:
        return f"encoder {self.encoder_length} / decoder {self.decoder_length} tokens"

    def prompted_limits(self, targets_length: int) -> tuple[int, int]:
        return self.encoder_length, self.decoder_length

    def prompted_room(self, targets, max_inputs: int):
        return max_inputs


class DecoderLayout:
    """How objectives lay out examples for a decoder (cd: bidirectional=False, nd: True)."""

    def __init__(self, bidirectional: bool):
        self.bidirectional = bidirectional

    def rows(self, cfg: ObjectiveConfig) -> RowShape:
        return DecoderRows(cfg.seq_length, self.bidirectional)

    def check_full_lm(self, arch: str) -> None:
        """flm fits every decoder."""

    def plm(self, cfg: ObjectiveConfig, var, arch: str) -> tuple[RowShape, int]:
        """(row shape, longest piece) of prefix LM: the longest piece that always fits a row."""
        shape = self.rows(cfg)
        return shape, _max_fitting_piece(var, shape, "plm")

    def mlm_rows(self, cfg: ObjectiveConfig, arch: str) -> RowShape:
        total = cfg.inputs_length + cfg.targets_length
        if cfg.seq_length != total:
            raise ValueError(
                f"objective.seq_length={cfg.seq_length} must equal inputs_length + targets_length = "
                f"{cfg.inputs_length} + {cfg.targets_length} = {total} for mlm on a decoder ({arch}); "
                f"set objective.seq_length={total} (or change inputs_length)")
        return self.rows(cfg)


class EncoderDecoderLayout:
    """How objectives lay out examples for an encoder-decoder: inputs to the encoder, targets to
    the decoder; rows of inputs_length / targets_length (plm: seq_length each)."""

    def rows(self, cfg: ObjectiveConfig) -> RowShape:
        return EncoderDecoderRows(cfg.inputs_length, cfg.targets_length)

    def check_full_lm(self, arch: str) -> None:
        raise ValueError(f"objective 'flm' has no encoder input, so it does not fit arch {arch!r}; "
                         f"use objective 'plm' or 'mlm' for {arch}, or arch 'cd' / 'nd' for flm")

    def plm(self, cfg: ObjectiveConfig, var, arch: str) -> tuple[RowShape, int]:
        """`ed_plm_examples_per_row` pieces of seq_length // k tokens per row, so k always fit."""
        k = cfg.ed_plm_examples_per_row
        piece = cfg.seq_length // k
        if piece < MIN_PIECE:
            raise ValueError(f"objective.seq_length={cfg.seq_length} // ed_plm_examples_per_row={k} "
                             f"= {piece} tokens per example is too short; lower ed_plm_examples_per_row")
        return EncoderDecoderRows(cfg.seq_length, cfg.seq_length), piece

    def mlm_rows(self, cfg: ObjectiveConfig, arch: str) -> RowShape:
        return self.rows(cfg)


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


def _max_fitting_piece(variant, shape: RowShape, what: str, cap: int | None = None) -> int:
    """Largest n such that every piece of m in [MIN_PIECE, n] tokens fits an empty row, whatever its
    random draw (split point) turns out to be."""
    cap_a, cap_b = shape.capacity
    bound = 4 * (cap_a + cap_b) + 16
    n = np.arange(MIN_PIECE, bound + 1)
    a, b = shape.fitting_footprint(variant, n)
    fits = (a <= cap_a) & (b <= cap_b)
    if not fits[0]:
        raise ValueError(f"{what}: rows of {shape.text()} are too short for even a {MIN_PIECE}-token "
                         f"example (it needs {int(a[0])}/{int(b[0])}); increase the row lengths")
    first_bad = np.flatnonzero(~fits)
    n_max = int(n[first_bad[0] - 1]) if len(first_bad) else bound
    return min(n_max, cap) if cap else n_max


def build_objective(cfg: ObjectiveConfig, arch, tokens: TokenInfo) -> Objective:
    """The objective of `cfg` for architecture `arch`, with all lengths checked. `arch` is a
    train.registry entry (anything with `.name` and `.layout`, a DecoderLayout or
    EncoderDecoderLayout): its layout decides the row shape."""
    cfg.validate()
    layout, name, where = arch.layout, cfg.name, arch.name
    if name == "flm":
        layout.check_full_lm(where)
        shape = layout.rows(cfg)
        var = FullLM()
        return Objective(name, shape, [var], [1.0], [_max_fitting_piece(var, shape, "flm")], tokens)

    if name == "plm":
        var = PrefixLM()
        shape, piece = layout.plm(cfg, var, where)
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
        shape = layout.mlm_rows(cfg, where)
        var = SpanCorruption(cfg.noise_density, cfg.mean_noise_span_length, tokens.sentinel_ids, tokens.eos_id)
        # The same raw pieces for every architecture (the controlled comparison): T5's tokens_length.
        piece = _max_fitting_piece(var, shape, "mlm", cap=tokens_length)
        _check_sentinels(var, piece, tokens, "mlm")
        return Objective(name, shape, [var], [1.0], [piece], tokens)

    if name == "ul2":
        shape = layout.rows(cfg)
        variants, pieces = [], []
        for i, d in enumerate(cfg.denoisers):
            var = _denoiser_variant(d, i, tokens)
            piece = _max_fitting_piece(var, shape, f"objective.denoisers[{i}]")
            if isinstance(var, SpanCorruption):
                _check_sentinels(var, piece, tokens, f"objective.denoisers[{i}]")
            variants.append(var)
            pieces.append(piece)
        return Objective(name, shape, variants, [d.rate for d in cfg.denoisers], pieces, tokens)

    if name == "prompted":
        shape = layout.rows(cfg)
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
