"""The yardstick's n-gram baselines (train/eval/baselines.py) against a direct count, and on a corpus
whose statistics are known: tokens that strictly alternate are ~1 bit each to a unigram model and
nearly free to a bigram one."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from train.eval.baselines import ngram_baselines


def _prepared(docs):
    store = SimpleNamespace(tokens=lambda d: np.asarray(docs[d]))
    return SimpleNamespace(train=SimpleNamespace(store=store, doc_ids=np.arange(len(docs))))


def test_alternating_tokens_cost_one_bit_to_a_unigram_and_almost_nothing_to_a_bigram():
    docs = [[3, 4] * 500 for _ in range(4)]
    ys = SimpleNamespace(tokens=np.array([[3, 4] * 8, [4, 3] * 8]), cuts=[0, 8])
    b = ngram_baselines(_prepared(docs), ys, vocab_size=6)
    assert b["unigram"] == pytest.approx(math.log(2), rel=0.01)
    # the two first tokens of the cut-at-0 rows have no previous token (unigram: ln 2 each); the 46 others ~0
    assert b["bigram"] == pytest.approx(2 * math.log(2) / 48, abs=0.003) and b["uniform"] == pytest.approx(math.log(6))
    assert b["tokens"] == 2 * 16 + 2 * 8 and b["train_tokens"] == 4000


def test_the_numbers_are_the_smoothed_counts_computed_by_hand():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 5, size=int(n)).tolist() for n in rng.integers(1, 40, size=6)]
    ys = SimpleNamespace(tokens=rng.integers(0, 5, size=(3, 10)), cuts=[0, 4])
    V = 7
    flat = [t for d in docs for t in d]
    pairs = [(a, b) for d in docs for a, b in zip(d, d[1:])]
    p_uni = lambda t: (flat.count(t) + 1) / (len(flat) + V)  # noqa: E731
    p_big = lambda s, t: (pairs.count((s, t)) + p_uni(t) * V) / (sum(a == s for a, _ in pairs) + V)  # noqa: E731
    nll_u = nll_b = 0.0
    for c in ys.cuts:
        for row in ys.tokens.tolist():
            for i in range(c, len(row)):
                nll_u -= math.log(p_uni(row[i]))
                nll_b -= math.log(p_big(row[i - 1], row[i]) if i > 0 else p_uni(row[i]))
    b = ngram_baselines(_prepared(docs), ys, vocab_size=V)
    n = 3 * 10 + 3 * 6
    assert b["unigram"] == pytest.approx(nll_u / n, rel=1e-12) and b["bigram"] == pytest.approx(nll_b / n, rel=1e-12)


def test_a_large_vocabulary_gets_the_unigram_only(monkeypatch):
    from train.eval import baselines

    monkeypatch.setattr(baselines, "MAX_BIGRAM_VOCAB", 4)
    b = ngram_baselines(_prepared([[0, 1, 2]]), SimpleNamespace(tokens=np.array([[0, 1, 2]]), cuts=[1]), 8)
    assert b["bigram"] is None and b["unigram"] > 0
