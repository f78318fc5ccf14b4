"""Packed rows of Examples -> a Batch (dict of torch tensors): the batch contract.

Decoder family (cd, nd), each row holds examples 1..n, each laid out as inputs ++ targets:
    input_ids     [B, T] long   pad_id on padding
    labels        [B, T] long   -100 on inputs, padding and the first token of every example;
                                else the token itself (HF convention: the model shifts, logits[t]
                                predicts labels[t+1])
    segment_ids   [B, T] int64  example index 1..n within the row, 0 = padding
    position_ids  [B, T] long   0.. restarting at every example (and at the padding run)
    bidirectional [B, T] bool   inputs of the example (nd); all False for cd
Encoder-decoder (ed): inputs -> encoder, targets -> decoder:
    input_ids, segment_ids, position_ids              [B, Ti]
    decoder_input_ids  [B, To]  per example: [decoder_start (= pad_id)] + targets[:-1]
    labels             [B, To]  targets, aligned with decoder outputs (no shift), -100 on padding
    decoder_segment_ids, decoder_position_ids         [B, To]
Counts (0-dim int64): num_tokens (non-padding tokens the model consumes; ed: encoder + decoder),
num_target_tokens (labels != -100), num_documents (packed examples, i.e. segments).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .core import Example, TokenInfo
from .rows import DecoderRows, EncoderDecoderRows, RowShape

IGNORE = -100
COUNT_KEYS = ("num_tokens", "num_target_tokens", "num_documents")


def collate(rows: list[list[Example]], shape: RowShape, tokens: TokenInfo) -> dict[str, torch.Tensor]:
    """Lay out packed rows (a list per row of its Examples) into the batch contract of `shape`."""
    return _collate(shape, rows, tokens)


@functools.singledispatch
def _collate(shape: RowShape, rows, tokens: TokenInfo) -> dict[str, torch.Tensor]:
    raise TypeError(f"no batch layout for row shape {type(shape).__name__}; register one with _collate.register")


@_collate.register
def _(shape: DecoderRows, rows, tokens: TokenInfo) -> dict[str, torch.Tensor]:
    return collate_decoder(rows, shape.length, shape.bidirectional, tokens.pad_id)


@_collate.register
def _(shape: EncoderDecoderRows, rows, tokens: TokenInfo) -> dict[str, torch.Tensor]:
    return collate_encoder_decoder(rows, shape.encoder_length, shape.decoder_length, tokens.pad_id)


def _check_fit(used: int, length: int, what: str) -> None:
    if used > length:
        raise ValueError(f"packed {what} of {used} tokens exceed the row length {length}; the packer must "
                         f"respect the objective's row shape")


def _layout(rows: list[list[Example]]):
    """Where each example goes: per example (flattened over rows) its row, index in the row, and
    input / target lengths; and the flat inputs and targets. All (E,) int64 but the token arrays."""
    counts = [len(row) for row in rows]
    flat = [ex for row in rows for ex in row]
    E = len(flat)
    row = np.repeat(np.arange(len(rows)), counts)  # (E,)
    j = np.arange(E) - np.repeat(np.cumsum(counts) - counts, counts)  # (E,) index within the row
    n_in = np.fromiter((len(ex.inputs) for ex in flat), dtype=np.int64, count=E)
    n_tgt = np.fromiter((len(ex.targets) for ex in flat), dtype=np.int64, count=E)
    return flat, row, j, n_in, n_tgt


def _tokens(arrays: list) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def _starts(lengths: np.ndarray, row: np.ndarray, B: int) -> np.ndarray:
    """(E,) offset of each example in its row: examples are laid out back to back from column 0."""
    ends = np.cumsum(lengths)  # (E,) flat
    row_base = np.zeros(B + 1, dtype=np.int64)
    np.add.at(row_base, row + 1, lengths)
    row_base = np.cumsum(row_base)[:-1]  # (B,) flat offset of each row's first example
    return ends - lengths - row_base[row]


def _spread(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """values (E,) repeated lengths[e] times each: one entry per token, flat."""
    return np.repeat(values, lengths)


def _ramp(lengths: np.ndarray) -> np.ndarray:
    """0..lengths[e]-1 for each example, flat."""
    total = int(lengths.sum())
    return np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _first_overflow(ends: np.ndarray, length: int):
    bad = np.flatnonzero(ends > length)
    return int(bad[0]) if len(bad) else None


def collate_decoder(rows: list[list[Example]], seq_length: int, bidirectional: bool,
                    pad_id: int) -> dict[str, torch.Tensor]:
    """Decoder-family batch: see the module docstring. `bidirectional` False = cd, True = nd.

    Laid out for all examples at once: a row's examples fill its first `used` columns back to
    back, so the flat token stream (row by row) is exactly the row-major order of those columns."""
    B, T = len(rows), seq_length
    flat, row, j, n_in, n_tgt = _layout(rows)
    n = n_in + n_tgt  # (E,)
    used = np.zeros(B, dtype=np.int64)
    np.add.at(used, row, n)  # (B,) tokens per row
    if (used > T).any():
        off = _starts(n, row, B)
        _check_fit(int((off + n)[np.flatnonzero(off + n > T)[0]]), T, "examples")
    col = np.arange(T, dtype=np.int64)  # (T,)
    filled = col[None, :] < used[:, None]  # (B, T) the non-padding slots, row-major = flat order
    parts = np.stack([n_in, n_tgt], axis=1).reshape(-1)  # (2E,) inputs then targets of each example
    tokens = _tokens([a for ex in flat for a in (ex.inputs, ex.targets)])  # (N,)
    is_input = _spread(np.tile(np.array([True, False]), len(flat)), parts)  # (N,)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE, dtype=np.int64)
    segment_ids = np.zeros((B, T), dtype=np.int64)
    position_ids = col[None, :] - used[:, None]  # (B, T) padding is its own segment, positions 0..
    bidir = np.zeros((B, T), dtype=bool)
    input_ids[filled] = tokens
    label = np.where(is_input, IGNORE, tokens)
    label[(np.cumsum(n) - n)[n > 0]] = IGNORE  # never predict an example's first token from the previous one
    labels[filled] = label
    segment_ids[filled] = _spread(j + 1, n)
    position_ids[filled] = _ramp(n)
    if bidirectional:
        bidir[filled] = is_input
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "segment_ids": torch.from_numpy(segment_ids),
        "position_ids": torch.from_numpy(position_ids),
        "bidirectional": torch.from_numpy(bidir),
    }
    _add_counts(batch, int(used.sum()), int((labels != IGNORE).sum()), len(flat))
    return batch


def collate_encoder_decoder(rows: list[list[Example]], encoder_length: int, decoder_length: int,
                            pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder-decoder batch: see the module docstring. decoder_start_token_id = pad_id (T5)."""
    B, Ti, To = len(rows), encoder_length, decoder_length
    flat, row, j, n_in, n_tgt = _layout(rows)
    ei, di = _starts(n_in, row, B), _starts(n_tgt, row, B)  # (E,) each
    for e in np.flatnonzero((n_in == 0) | (n_tgt == 0) | (ei + n_in > Ti) | (di + n_tgt > To))[:1].tolist():
        if n_in[e] == 0 or n_tgt[e] == 0:  # the first bad example, checked in the order of the definition
            raise ValueError("an encoder-decoder example needs non-empty inputs and targets "
                             f"(got {n_in[e]} / {n_tgt[e]}); flm does not fit arch 'ed'")
        _check_fit(int(ei[e] + n_in[e]), Ti, "encoder inputs")
        _check_fit(int(di[e] + n_tgt[e]), To, "decoder targets")
    used_in, used_tgt = np.zeros(B, dtype=np.int64), np.zeros(B, dtype=np.int64)
    np.add.at(used_in, row, n_in)  # (B,) encoder tokens per row
    np.add.at(used_tgt, row, n_tgt)  # (B,) decoder tokens per row
    # a row's examples fill its first used columns back to back: row-major order = flat order
    enc_filled = np.arange(Ti, dtype=np.int64)[None, :] < used_in[:, None]  # (B, Ti)
    dec_filled = np.arange(To, dtype=np.int64)[None, :] < used_tgt[:, None]  # (B, To)
    targets = _tokens([ex.targets for ex in flat])  # (N_tgt,)
    enc_ids = np.full((B, Ti), pad_id, dtype=np.int64)
    enc_seg = np.zeros((B, Ti), dtype=np.int64)
    enc_pos = np.arange(Ti, dtype=np.int64)[None, :] - used_in[:, None]  # (B, Ti) padding positions 0..
    dec_ids = np.full((B, To), pad_id, dtype=np.int64)
    labels = np.full((B, To), IGNORE, dtype=np.int64)
    dec_seg = np.zeros((B, To), dtype=np.int64)
    dec_pos = np.arange(To, dtype=np.int64)[None, :] - used_tgt[:, None]
    enc_ids[enc_filled] = _tokens([ex.inputs for ex in flat])
    enc_seg[enc_filled] = _spread(j + 1, n_in)
    enc_pos[enc_filled] = _ramp(n_in)
    # T5 shift right per example: [decoder_start (= pad id)] + targets[:-1]
    first = np.cumsum(n_tgt) - n_tgt  # (E,) flat index of each example's first target
    shifted = np.empty_like(targets) if len(targets) else np.zeros(0, dtype=np.int64)
    shifted[1:] = targets[:-1]
    shifted[first] = pad_id
    dec_ids[dec_filled] = shifted
    labels[dec_filled] = targets
    dec_seg[dec_filled] = _spread(j + 1, n_tgt)
    dec_pos[dec_filled] = _ramp(n_tgt)
    batch = {
        "input_ids": torch.from_numpy(enc_ids),
        "segment_ids": torch.from_numpy(enc_seg),
        "position_ids": torch.from_numpy(enc_pos),
        "decoder_input_ids": torch.from_numpy(dec_ids),
        "labels": torch.from_numpy(labels),
        "decoder_segment_ids": torch.from_numpy(dec_seg),
        "decoder_position_ids": torch.from_numpy(dec_pos),
    }
    _add_counts(batch, int(used_in.sum() + used_tgt.sum()), int((labels != IGNORE).sum()), len(flat))
    return batch


def _add_counts(batch: dict, tokens: int, targets: int, docs: int) -> None:
    batch["num_tokens"] = torch.tensor(tokens, dtype=torch.int64)
    batch["num_target_tokens"] = torch.tensor(targets, dtype=torch.int64)
    batch["num_documents"] = torch.tensor(docs, dtype=torch.int64)


def pop_counts(batch: dict) -> dict[str, int]:
    """Remove the count entries from a batch (before the forward pass) and return them as ints."""
    return {k: int(batch.pop(k)) for k in COUNT_KEYS}
