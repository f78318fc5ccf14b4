"""Pieces of train/engine.py that need no process group."""
import torch

import model_zoo
from train.engine import apply_activation_checkpointing, split_micro


def test_activation_checkpointing_keeps_keys_and_gradients():
    torch.manual_seed(0)
    ref = model_zoo.build("ed", "debug")
    ckpt = model_zoo.build("ed", "debug")
    ckpt.load_state_dict(ref.state_dict())
    apply_activation_checkpointing(ckpt)
    assert "CheckpointWrapper" in type(ckpt.encoder.layers[0]).__name__
    assert list(ckpt.state_dict()) == list(ref.state_dict())  # no wrapper prefix in checkpoints
    x, y = torch.randint(2, 500, (2, 12)), torch.randint(2, 500, (2, 5))
    for m in (ref, ckpt):
        m(input_ids=x, labels=y, segment_ids=torch.ones_like(x)).loss.backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_split_micro_keeps_row_order():
    batch = {"input_ids": torch.arange(12).view(6, 2), "labels": torch.arange(12).view(6, 2) + 100}
    parts = split_micro(batch, 2)
    assert len(parts) == 3
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert torch.equal(parts[1]["labels"], batch["labels"][2:4])
