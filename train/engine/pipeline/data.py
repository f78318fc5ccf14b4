"""The data interface: a Batch (the batch contract) as the first stage's input tuple and the
last stage's labels, in the order of the architecture's layout."""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor

from model_zoo.blocks import positions_from_segments

from .specs import pipeline_layout

COUNT_KEYS = ("num_tokens", "num_target_tokens", "num_documents")  # batch accounting, not model inputs


def input_fields(config) -> tuple:
    """The order of the input tuple of the first stage (what `batch_to_pipeline` returns)."""
    return pipeline_layout(config).input_fields


def batch_to_pipeline(batch: Mapping[str, Tensor], config) -> tuple[tuple[Tensor, ...], Tensor]:
    """A Batch (the batch contract) -> DeepSpeed's `((inputs...), labels)` for one micro-batch.

    inputs follow `input_fields(config)`: decoder (input_ids, segment_ids, position_ids[,
    bidirectional (ND, uint8)]), ED (input_ids, segment_ids, position_ids, decoder_input_ids,
    decoder_segment_ids, decoder_position_ids); integers as int64. The count entries
    (num_tokens, num_target_tokens, num_documents) are ignored. Missing segment ids mean one
    segment per row, missing positions restart in every segment (as in the model); ND may give
    `prefix_lengths` [B] instead of `bidirectional`. Any other key is an error.
    """
    layout = pipeline_layout(config)
    b = {k: v for k, v in batch.items() if k not in COUNT_KEYS}
    unknown = sorted(set(b) - layout.batch_keys)
    if unknown:
        raise KeyError(f"batch keys {unknown} are not pipeline inputs of arch {config.arch!r}; "
                       f"expected {sorted(layout.batch_keys)}")
    missing = [k for k in layout.required_keys if k not in b]
    if missing:
        raise KeyError(f"the batch lacks {missing} (arch {config.arch!r})")
    values: dict[str, Tensor] = {}
    for embed in layout.embeddings:  # each token row: its ids, segment ids and positions (int64)
        ids = b[embed.field].long()
        seg_key, pos_key = embed.stack.segments, embed.stack.positions
        seg = b.get(seg_key)
        seg = torch.ones_like(ids) if seg is None else seg
        pos = b.get(pos_key)
        pos = positions_from_segments(seg.long()) if pos is None else pos
        values.update({embed.field: ids, seg_key: seg.long(), pos_key: pos.long()})
    if "bidirectional" in layout.input_fields:  # ND: the prefix flags
        values["bidirectional"] = _bidirectional(b, values["input_ids"])
    return tuple(values[f] for f in layout.input_fields), b["labels"].long()


def _bidirectional(b: Mapping[str, Tensor], ids: Tensor) -> Tensor:
    """[B, T] uint8 (torch.distributed does not send bool): the batch's `bidirectional`, else its
    `prefix_lengths` [B] as flags, else none."""
    bidir = b.get("bidirectional")
    if bidir is None and b.get("prefix_lengths") is not None:
        bidir = torch.arange(ids.shape[1])[None, :] < b["prefix_lengths"].reshape(-1, 1)
    if bidir is None:
        bidir = torch.zeros_like(ids, dtype=torch.bool)
    return bidir.to(torch.uint8)


def pipeline_batches(batches: Iterable[Mapping[str, Tensor]], config) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
    """Micro-batches for `engine.train_batch(data_iter=...)` / `eval_batch`: each Batch (one
    micro-batch, fixed shape) as `batch_to_pipeline` makes it. Give the same iterator to every
    rank of a pipeline: the first stage reads the inputs, the last the labels."""
    for batch in batches:
        yield batch_to_pipeline(batch, config)
