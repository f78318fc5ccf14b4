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

import numpy as np
import torch

from .core import Example, RowShape, TokenInfo

IGNORE = -100
COUNT_KEYS = ("num_tokens", "num_target_tokens", "num_documents")


def collate(rows: list[list[Example]], shape: RowShape, tokens: TokenInfo) -> dict[str, torch.Tensor]:
    """Lay out packed rows (a list per row of its Examples) into the batch contract of `shape`."""
    if shape.family == "decoder":
        return collate_decoder(rows, shape.length, shape.bidirectional, tokens.pad_id)
    return collate_encoder_decoder(rows, shape.encoder_length, shape.decoder_length, tokens.pad_id)


def _check_fit(used: int, length: int, what: str) -> None:
    if used > length:
        raise ValueError(f"packed {what} of {used} tokens exceed the row length {length}; the packer must "
                         f"respect the objective's row shape")


def collate_decoder(rows: list[list[Example]], seq_length: int, bidirectional: bool,
                    pad_id: int) -> dict[str, torch.Tensor]:
    """Decoder-family batch: see the module docstring. `bidirectional` False = cd, True = nd."""
    B, T = len(rows), seq_length
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE, dtype=np.int64)
    segment_ids = np.zeros((B, T), dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    bidir = np.zeros((B, T), dtype=bool)
    docs = 0
    for r, row in enumerate(rows):
        off = 0
        for j, ex in enumerate(row):
            n_in, n_tgt = len(ex.inputs), len(ex.targets)
            n = n_in + n_tgt
            _check_fit(off + n, T, "examples")
            input_ids[r, off:off + n_in] = ex.inputs
            input_ids[r, off + n_in:off + n] = ex.targets
            labels[r, off + n_in:off + n] = ex.targets
            labels[r, off] = IGNORE  # never predict an example's first token from the previous example
            segment_ids[r, off:off + n] = j + 1
            position_ids[r, off:off + n] = np.arange(n)
            bidir[r, off:off + n_in] = bidirectional
            off += n
            docs += 1
        position_ids[r, off:] = np.arange(T - off)  # padding is its own segment, positions 0..
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "segment_ids": torch.from_numpy(segment_ids),
        "position_ids": torch.from_numpy(position_ids),
        "bidirectional": torch.from_numpy(bidir),
    }
    _add_counts(batch, int((segment_ids != 0).sum()), int((labels != IGNORE).sum()), docs)
    return batch


def collate_encoder_decoder(rows: list[list[Example]], encoder_length: int, decoder_length: int,
                            pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder-decoder batch: see the module docstring. decoder_start_token_id = pad_id (T5)."""
    B, Ti, To = len(rows), encoder_length, decoder_length
    enc_ids = np.full((B, Ti), pad_id, dtype=np.int64)
    enc_seg = np.zeros((B, Ti), dtype=np.int64)
    enc_pos = np.zeros((B, Ti), dtype=np.int64)
    dec_ids = np.full((B, To), pad_id, dtype=np.int64)
    labels = np.full((B, To), IGNORE, dtype=np.int64)
    dec_seg = np.zeros((B, To), dtype=np.int64)
    dec_pos = np.zeros((B, To), dtype=np.int64)
    docs = 0
    for r, row in enumerate(rows):
        ei = di = 0
        for j, ex in enumerate(row):
            n_in, n_tgt = len(ex.inputs), len(ex.targets)
            if n_in == 0 or n_tgt == 0:
                raise ValueError("an encoder-decoder example needs non-empty inputs and targets "
                                 f"(got {n_in} / {n_tgt}); flm does not fit arch 'ed'")
            _check_fit(ei + n_in, Ti, "encoder inputs")
            _check_fit(di + n_tgt, To, "decoder targets")
            enc_ids[r, ei:ei + n_in] = ex.inputs
            enc_seg[r, ei:ei + n_in] = j + 1
            enc_pos[r, ei:ei + n_in] = np.arange(n_in)
            dec_ids[r, di] = pad_id  # decoder_start_token_id (T5: the pad id)
            dec_ids[r, di + 1:di + n_tgt] = ex.targets[:-1]
            labels[r, di:di + n_tgt] = ex.targets
            dec_seg[r, di:di + n_tgt] = j + 1
            dec_pos[r, di:di + n_tgt] = np.arange(n_tgt)
            ei += n_in
            di += n_tgt
            docs += 1
        enc_pos[r, ei:] = np.arange(Ti - ei)
        dec_pos[r, di:] = np.arange(To - di)
    batch = {
        "input_ids": torch.from_numpy(enc_ids),
        "segment_ids": torch.from_numpy(enc_seg),
        "position_ids": torch.from_numpy(enc_pos),
        "decoder_input_ids": torch.from_numpy(dec_ids),
        "labels": torch.from_numpy(labels),
        "decoder_segment_ids": torch.from_numpy(dec_seg),
        "decoder_position_ids": torch.from_numpy(dec_pos),
    }
    _add_counts(batch, int((enc_seg != 0).sum() + (dec_seg != 0).sum()), int((labels != IGNORE).sum()), docs)
    return batch


def _add_counts(batch: dict, tokens: int, targets: int, docs: int) -> None:
    batch["num_tokens"] = torch.tensor(tokens, dtype=torch.int64)
    batch["num_target_tokens"] = torch.tensor(targets, dtype=torch.int64)
    batch["num_documents"] = torch.tensor(docs, dtype=torch.int64)


def pop_counts(batch: dict) -> dict[str, int]:
    """Remove the count entries from a batch (before the forward pass) and return them as ints."""
    return {k: int(batch.pop(k)) for k in COUNT_KEYS}
