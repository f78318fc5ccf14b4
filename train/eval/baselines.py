"""N-gram baselines of the common yardstick: what a model that learned only token frequencies
(unigram) or only which token follows which (bigram) scores on the same continuations.

A cell's continuation loss means little alone: "2.9 nats/token" is good or bad only against what
the corpus's token statistics give for free. These baselines are estimated on the *training*
split's documents (never the held-out windows) and scored on exactly the yardstick's
continuation tokens, every prefix fraction, in nats per continuation token (yardstick.py):

    unigram:  p(t)          = (count(t) + 1) / (T + V)                 (add-one, V the vocabulary)
    bigram:   p(t | s)      = (count(s, t) + k p_uni(t) V) / (count(s) + k V),   k = 1
              (add-k smoothing towards the unigram, so an unseen pair costs what the unigram says)

The bigram's previous token of a continuation's first token is the prefix's last token (a cut at
0 has none: its first token is scored by the unigram). Cost: one pass over the training tokens
with numpy (bincount over s * V + t for the bigram: V^2 counts, fine for the byte tokenizer's few
hundred ids and for BPE vocabularies up to ~16k; larger vocabularies give only the unigram).
"""
from __future__ import annotations

import math

import numpy as np

MAX_BIGRAM_VOCAB = 16_384  # V^2 float64 counts: 2 GiB at 16k


def _train_tokens(split) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, previous tokens) of the split's documents, concatenated; each document's first token
    has previous -1 (no pair across documents)."""
    toks, prev = [], []
    for d in split.doc_ids.tolist():
        t = np.asarray(split.store.tokens(d), dtype=np.int64)
        if t.size:
            toks.append(t)
            prev.append(np.concatenate([[-1], t[:-1]]))
    return (np.concatenate(toks), np.concatenate(prev)) if toks else (np.zeros(0, np.int64), np.zeros(0, np.int64))


def ngram_baselines(prepared, ys, vocab_size: int) -> dict:
    """{"unigram": nats/token, "bigram": nats/token or None, "tokens": scored, "train_tokens": counted}
    on the yardstick `ys` of `prepared` (module docstring)."""
    toks, prev = _train_tokens(prepared.train)
    V = int(max(vocab_size, int(toks.max()) + 1 if toks.size else 0, int(ys.tokens.max()) + 1))
    uni = (np.bincount(toks, minlength=V) + 1.0) / (toks.size + V)
    big = None
    if V <= MAX_BIGRAM_VOCAB:
        ok = prev >= 0
        pair = np.bincount(prev[ok] * V + toks[ok], minlength=V * V).reshape(V, V).astype(np.float64)
        big = (pair + uni[None, :] * V) / (pair.sum(axis=1, keepdims=True) + V)
    nll_u = nll_b = 0.0
    n = 0
    for c in ys.cuts:
        cont = ys.tokens[:, c:]
        before = np.concatenate([ys.tokens[:, c - 1:c] if c else np.full((len(cont), 1), -1), cont[:, :-1]], axis=1)
        nll_u -= float(np.log(uni[cont]).sum())
        if big is not None:
            pb = np.where(before >= 0, big[np.maximum(before, 0), cont], uni[cont])
            nll_b -= float(np.log(pb).sum())
        n += cont.size
    return {"unigram": nll_u / n, "bigram": nll_b / n if big is not None else None, "tokens": n,
            "train_tokens": int(toks.size), "vocab": V, "uniform": math.log(V)}
