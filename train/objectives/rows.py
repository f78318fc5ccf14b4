"""Row shapes and layouts: the one owner of how many tokens a packed row holds.

A `RowShape` is the fixed shape of a packed row, per family of architectures: its lengths (what
the model reads), the room examples take in it (what the packer, train/data/stream.py, fills) and
`tokens_per_row`, the tokens a full row carries: the unit of the token budget
(train.registry's `tokens_per_row` -> train/config/derived.py) and the packer's total capacity
per row. A layout (`DecoderLayout`, `EncoderDecoderLayout`; train/registry gives each
architecture one) answers which shape an objective config gets (`shape`) and how long its prefix
LM pieces are (`plm_piece`). Whoever needs a row's size (registry, packer, FLOPs) reads it here.

    family           rows (lengths the model reads)               tokens_per_row (packer's total)
    decoder          seq_length                                   seq_length
    encoder-decoder  plm: seq_length / seq_length                 k n: k pieces of n = seq_length // k
                     mlm, ul2, prompted: inputs / targets_length  inputs_length + targets_length

ED:PLM (the reference: "ED PLM packs two examples", tokens seen matched across objectives): each
example is a piece of n = seq_length // k tokens split uniformly between the encoder and the
decoder, so either side of one example can take up to n - 1 tokens and both rows are seq_length
long; but a row carries at most seq_length tokens in all, as a decoder row does. Without that
total the packer filled both sides (about 207 of 256 slots at seq_length 128, k = 2, against the
128 the budget planned: 63% over a tokens-seen budget; issue 28).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ObjectiveConfig

# numpy is imported where used: derive reads tokens_per_row through the registry on a login node
# (`archscale submit`, config loading), which imports neither numpy nor torch (tests/test_config.py)

MIN_PIECE = 2  # one token to condition on and one to predict; shorter pieces are skipped and counted


@dataclass(frozen=True, repr=False)
class RowShape:
    """The fixed shape of a packed row and the attention layout of its inputs. A family's
    subclass (DecoderRows, EncoderDecoderRows) answers what differs between the layouts."""

    family: str  # "decoder" (cd, nd) | "encoder_decoder" (ed)
    bidirectional: bool  # decoder: inputs (prefix) attend bidirectionally (nd); False for cd
    length: int  # decoder rows: tokens per row
    encoder_length: int = 0  # encoder_decoder: encoder tokens per row
    decoder_length: int = 0  # encoder_decoder: decoder tokens per row
    max_tokens: int = 0  # encoder_decoder: tokens per row in all (encoder + decoder); 0 = both rows full
    packed_dims = 1  # lengths a row is packed by (the packer's best fit in 1 or 2 dimensions)

    def __repr__(self) -> str:  # one text for every family: it is part of a data stream's fingerprint
        total = f", max_tokens={self.max_tokens!r}" if self.max_tokens else ""  # the shapes before it: unchanged
        return (f"RowShape(family={self.family!r}, bidirectional={self.bidirectional!r}, length={self.length!r}, "
                f"encoder_length={self.encoder_length!r}, decoder_length={self.decoder_length!r}{total})")

    @property
    def capacity(self) -> tuple[int, int]:
        """Room of an empty row, in the units of `footprint`."""
        raise NotImplementedError

    @property
    def tokens_per_row(self) -> int:
        """Tokens a full row carries (encoder + decoder for ED): the packer never puts more into a
        row, and the token budget counts rows in this unit."""
        raise NotImplementedError

    @property
    def lengths(self) -> tuple[int, int]:
        """(encoder tokens, decoder tokens) of a row as the model reads it; a decoder: (0, length)."""
        raise NotImplementedError

    def footprint(self, inputs_length, targets_length):
        """Room examples of these lengths take, in the units of `capacity`; a row takes examples
        while each side fits and the two sides together stay within `tokens_per_row`."""
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

    @property
    def tokens_per_row(self) -> int:
        return self.length

    @property
    def lengths(self) -> tuple[int, int]:
        return (0, self.length)

    def footprint(self, inputs_length, targets_length):
        """inputs + targets, 0."""
        import numpy as np

        return inputs_length + targets_length, np.zeros_like(np.asarray(targets_length))

    def fitting_footprint(self, variant, n):
        """inputs + targets is deterministic (a PLM split only moves the border)."""
        import numpy as np

        return variant.total_length(n), np.zeros_like(n)

    def text(self) -> str:
        return f"seq_length={self.length}"

    def prompted_limits(self, targets_length: int) -> tuple[int, int]:
        return self.length - 1, min(targets_length, self.length - 1)

    def prompted_room(self, targets, max_inputs: int):
        return self.length - targets


class EncoderDecoderRows(RowShape):
    """An encoder row of `encoder_length` tokens (inputs) and a decoder row of `decoder_length`
    (targets), examples matched across the two by segment id; `max_tokens` > 0 caps the tokens
    of both together (ED:PLM: seq_length, as a decoder row)."""

    packed_dims = 2

    def __init__(self, encoder_length: int, decoder_length: int, max_tokens: int = 0):
        super().__init__("encoder_decoder", True, 0, encoder_length, decoder_length, max_tokens)

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.encoder_length, self.decoder_length)

    @property
    def tokens_per_row(self) -> int:
        return self.max_tokens or self.encoder_length + self.decoder_length

    @property
    def lengths(self) -> tuple[int, int]:
        return (self.encoder_length, self.decoder_length)

    def footprint(self, inputs_length, targets_length):
        """inputs, targets."""
        return inputs_length, targets_length

    def fitting_footprint(self, variant, n):
        """Each side at its worst over the random split (their sum is the piece's, whatever the split)."""
        return self.footprint(*variant.worst_lengths(n))

    def text(self) -> str:
        total = f", {self.max_tokens} in all" if self.max_tokens else ""
        return f"encoder {self.encoder_length} / decoder {self.decoder_length} tokens{total}"

    def prompted_limits(self, targets_length: int) -> tuple[int, int]:
        return self.encoder_length, self.decoder_length

    def prompted_room(self, targets, max_inputs: int):
        return max_inputs


class DecoderLayout:
    """How objectives lay out examples for a decoder (cd: bidirectional=False, nd: True)."""

    def __init__(self, bidirectional: bool):
        self.bidirectional = bidirectional

    def shape(self, cfg: ObjectiveConfig, arch: str) -> RowShape:
        """Rows of seq_length for every objective; mlm's must equal inputs + targets (ValueError,
        with the fix). `arch` names the architecture in messages only."""
        if cfg.name == "mlm" and cfg.seq_length != cfg.inputs_length + cfg.targets_length:
            total = cfg.inputs_length + cfg.targets_length
            raise ValueError(
                f"objective.seq_length={cfg.seq_length} must equal inputs_length + targets_length = "
                f"{cfg.inputs_length} + {cfg.targets_length} = {total} for mlm on a decoder ({arch}); "
                f"set objective.seq_length={total} (or change inputs_length)")
        return DecoderRows(cfg.seq_length, self.bidirectional)

    def plm_piece(self, cfg: ObjectiveConfig, var, shape: RowShape) -> int:
        """The longest prefix LM piece that always fits a row."""
        return max_fitting_piece(var, shape, "plm")


class EncoderDecoderLayout:
    """How objectives lay out examples for an encoder-decoder: inputs to the encoder, targets to
    the decoder; rows of inputs_length / targets_length (plm: seq_length each, seq_length in all)."""

    def shape(self, cfg: ObjectiveConfig, arch: str) -> RowShape:
        """The row of an objective that fits (the registry entry's check_objective says which do)."""
        if cfg.name == "plm":  # k pieces of n tokens in all: k n = seq_length unless k does not divide it
            n = self.plm_piece(cfg, None, None)
            return EncoderDecoderRows(cfg.seq_length, cfg.seq_length, max_tokens=cfg.ed_plm_examples_per_row * n)
        return EncoderDecoderRows(cfg.inputs_length, cfg.targets_length)

    def plm_piece(self, cfg: ObjectiveConfig, var, shape: RowShape | None) -> int:
        """n = seq_length // k tokens per piece, k = `ed_plm_examples_per_row`: a row takes k of
        them (its k n tokens in all), and either side of one piece (at most n - 1 tokens) fits
        its row of seq_length whatever the split."""
        k = cfg.ed_plm_examples_per_row
        piece = cfg.seq_length // k
        if piece < MIN_PIECE:
            raise ValueError(f"objective.seq_length={cfg.seq_length} // ed_plm_examples_per_row={k} "
                             f"= {piece} tokens per example is too short; lower ed_plm_examples_per_row")
        return piece


def max_fitting_piece(variant, shape: RowShape, what: str, cap: int | None = None) -> int:
    """Largest n such that every piece of m in [MIN_PIECE, n] tokens fits an empty row, whatever its
    random draw (split point) turns out to be."""
    import numpy as np

    cap_a, cap_b = shape.capacity
    bound = 4 * (cap_a + cap_b) + 16
    n = np.arange(MIN_PIECE, bound + 1)
    a, b = shape.fitting_footprint(variant, n)
    fits = (a <= cap_a) & (b <= cap_b) & (variant.total_length(n) <= shape.tokens_per_row)
    if not fits[0]:
        raise ValueError(f"{what}: rows of {shape.text()} are too short for even a {MIN_PIECE}-token "
                         f"example (it needs {int(a[0])}/{int(b[0])}); increase the row lengths")
    first_bad = np.flatnonzero(~fits)
    n_max = int(n[first_bad[0] - 1]) if len(first_bad) else bound
    return min(n_max, cap) if cap else n_max
