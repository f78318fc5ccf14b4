"""Pieces of train/engine.py that need no process group."""
import torch

import model_zoo
from train.engine import split_micro


def test_split_micro_keeps_row_order():
    batch = {"input_ids": torch.arange(12).view(6, 2), "labels": torch.arange(12).view(6, 2) + 100}
    parts = split_micro(batch, 2)
    assert len(parts) == 3
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert torch.equal(parts[1]["labels"], batch["labels"][2:4])
