"""Pieces of train/engine/runtime.py that need no process group."""
import torch

import model_zoo
from train.engine.runtime import split_micro


def test_split_micro_keeps_row_order():
    batch = {"input_ids": torch.arange(12).view(6, 2), "labels": torch.arange(12).view(6, 2) + 100}
    parts = split_micro(batch, 2)
    assert len(parts) == 3
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert torch.equal(parts[1]["labels"], batch["labels"][2:4])


def test_trivial_segments_are_dropped_and_change_nothing():
    from model_zoo.blocks import Stack
    from train.engine.runtime import drop_trivial_segments

    torch.manual_seed(0)
    model = model_zoo.build("cd", "debug", position="rope")
    ids = torch.randint(2, 500, (2, 16))
    one = {"input_ids": ids, "labels": ids, "segment_ids": torch.ones_like(ids),
           "position_ids": torch.arange(16).expand(2, 16)}
    packed = dict(one, segment_ids=torch.tensor([[1] * 10 + [2] * 6, [1] * 16]))
    padded = dict(one, segment_ids=torch.tensor([[1] * 12 + [0] * 4, [1] * 16]))
    assert "segment_ids" not in drop_trivial_segments(one)
    assert drop_trivial_segments(packed) is packed and drop_trivial_segments(padded) is padded
    ed = {"input_ids": ids, "segment_ids": torch.ones_like(ids), "decoder_input_ids": ids[:, :8],
          "decoder_segment_ids": torch.tensor([[1] * 8, [1] * 6 + [0] * 2])}
    assert drop_trivial_segments(ed) is ed  # a padded decoder row: both sides keep their segments (cross-attention)

    seen = []
    build = Stack.build_context

    def spy(self, *a, **kw):
        ctx = build(self, *a, **kw)
        seen.append(ctx.masks["full"].plain)
        return ctx

    Stack.build_context = spy
    try:
        with_seg = model(**one).loss
        without = model(**drop_trivial_segments(one)).loss
    finally:
        Stack.build_context = build
    assert seen == [None, "causal"]  # a dense / block mask before, plain causal SDPA after
    torch.testing.assert_close(with_seg, without)


def test_trivial_segments_of_an_encoder_decoder_batch_go_together_and_change_nothing():
    """ED's contract has two segment tensors: with both all 1 (one example per row, no padding)
    both are dropped and the loss is the same; never one without the other."""
    from train.engine.runtime import drop_trivial_segments

    torch.manual_seed(0)
    model = model_zoo.build("ed", "debug")
    g = torch.Generator().manual_seed(1)
    ids, dec = torch.randint(2, 500, (2, 12), generator=g), torch.randint(2, 500, (2, 8), generator=g)
    one = {"input_ids": ids, "segment_ids": torch.ones_like(ids), "position_ids": torch.arange(12).expand(2, 12),
           "decoder_input_ids": dec, "labels": dec, "decoder_segment_ids": torch.ones_like(dec),
           "decoder_position_ids": torch.arange(8).expand(2, 8)}
    dropped = drop_trivial_segments(one)
    assert "segment_ids" not in dropped and "decoder_segment_ids" not in dropped
    torch.testing.assert_close(model(**dropped).loss, model(**one).loss)
    packed = dict(one, segment_ids=torch.tensor([[1] * 6 + [2] * 6, [1] * 12]))
    assert drop_trivial_segments(packed) is packed  # the decoder's all-1 segments stay beside the encoder's
