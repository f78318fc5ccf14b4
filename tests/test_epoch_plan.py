"""The flat epoch plan (data.epoch_order=feistel, train/data/plan.py): a keyed bijection per epoch,
the held-out split as a hash rule (the same documents as the mask), exact resume."""
from __future__ import annotations

import numpy as np
import pytest

from train.data import DataConfig, build_stream, prepare
from train.data.corpus import held_out_mask
from train.data.plan import FeistelPermutation, HeldOutRule
from train.objectives import ObjectiveConfig


@pytest.mark.parametrize("n", [1, 2, 3, 5, 1000, 4097])
def test_feistel_is_a_bijection_keyed_and_deterministic(n):
    pos = np.arange(n)
    a, b = FeistelPermutation(n, 7)(pos), FeistelPermutation(n, 8)(pos)
    assert sorted(a.tolist()) == list(range(n)) and sorted(b.tolist()) == list(range(n))
    assert np.array_equal(a, FeistelPermutation(n, 7)(pos))
    assert np.array_equal(FeistelPermutation(n, 7)(pos[n // 2:]), a[n // 2:])  # any chunk alone, the same docs
    if n >= 1000:
        assert not np.array_equal(a, b) and np.mean(a == pos) < 0.01


@pytest.mark.parametrize("n,fraction", [(1000, 0.02), (3, 0.02), (50, 0.5), (10, 0.0)])
def test_the_hash_rule_holds_out_the_masks_documents(n, fraction):
    assert np.array_equal(HeldOutRule(n, fraction).mask(np.arange(n)), held_out_mask(n, fraction))


def _stream(cfg, state=None):
    obj = ObjectiveConfig(name="flm", seq_length=64)
    s = build_stream(prepare(cfg, obj), obj, arch="cd", global_batch_size=4, rank=0, world_size=1, seed=3, data=cfg)
    if state is not None:
        s.load_state_dict(state)
    return s


def test_an_epoch_visits_every_training_document_once_and_resumes_exactly():
    flat, arr = DataConfig(epoch_order="feistel"), DataConfig()
    prepared = prepare(arr, ObjectiveConfig(name="flm", seq_length=64))
    train_ids = sorted(prepared.train.doc_ids.tolist())
    s = _stream(flat)
    for epoch in (0, 1):
        docs, kept = s.plan.docs(epoch, np.arange(s.plan.n_positions))
        assert sorted(docs[kept].tolist()) == train_ids  # every training document once, no held-out one
    assert not np.array_equal(s.plan.docs(0, np.arange(20))[0], s.plan.docs(1, np.arange(20))[0])
    for _ in range(5):
        next(s)
    state = s.state_dict()
    rest = [next(s)["input_ids"] for _ in range(3)]
    again = _stream(flat, state)
    assert all(np.array_equal(a, next(again)["input_ids"]) for a in rest)
    with pytest.raises(ValueError, match="fingerprint"):
        _stream(arr, state)  # the other order's state is refused
