"""The common yardstick: one measure, computed by the same code, for every cell of a comparison.

The training loss of a cell is measured on its own objective's targets, so CD:FLM, ND:PLM and
ED:MLM losses measure three different things. The yardstick asks every cell the same question
on the same tokens:

* **Windows.** From the held-out split of the training corpus (data.eval_fraction of the
  documents, chosen by a hash of the document index and never trained on; or data.eval_files),
  consecutive windows of `eval.window_tokens` tokens are cut from each held-out document, taken
  round-robin over the documents in file order, at most `eval.windows`. Each window is cut at
  each of `eval.prefix_fractions`: the prefix is the fraction's share of its tokens, the
  continuation the rest. The windows depend on the corpus, the split and the tokenizer only, not
  on the architecture, the objective or any seed: cells with the same tokenizer get the same
  windows and targets (their `fingerprint` says so).
* **Continuation loss.** The negative log-likelihood of the continuation given the prefix, in
  nats per continuation token and in bits per byte (UTF-8 bytes of the continuation's text, so
  that cells with different tokenizers compare). Each architecture reads the prefix its own way
  (its registry entry's `score_continuations`: CD causally, ND as its bidirectional prefix, ED
  through its encoder) and each objective is asked the way it was trained
  (train/objectives/scoring.py: span-corruption cells the T5 way, with the first sentinel).
* **Zero-shot continuation choice.** For each window, its true continuation (at the first
  prefix fraction) among `eval.choices` continuations, the others taken from windows of other
  held-out documents (drawn with a fixed generator, the same for every cell); the prediction is
  the highest log-likelihood (equal token counts). Accuracy with its binomial standard error;
  chance is 1 / choices. Task files (`eval.task_files`, `archscale eval --tasks`) are scored by
  rank classification (evaluate.py) next to it.

Cost: for a decoder that reads its context causally (CD, plain way), one forward pass over each
window scores every cut point; an encoder-decoder encodes each prefix once for all its choices.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .stats import binomial_se

log = logging.getLogger("archscale.eval")
CHOICE_SEED = 20261204  # the generator of the distractors: fixed, so every cell gets the same choices


@dataclass
class Yardstick:
    """The windows of a held-out split and everything cut from them (see the module docstring)."""

    docs: list[int]                 # store index of each window's document
    starts: list[int]               # first token of each window in its document
    tokens: np.ndarray              # (N, W) int64
    fractions: list[float]
    cuts: list[int]                 # prefix tokens per fraction
    bytes: list[list[int]]          # [fraction][window] UTF-8 bytes of the continuation
    choices: list[tuple[list[int], int]]  # per window: candidate windows (their continuation), true position
    split: str                      # how the held-out split was chosen

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.tokens.tobytes())
        h.update(repr((self.cuts, self.choices)).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        """What RUN_DIR/heldout.json records about the yardstick."""
        return {"windows": len(self.docs), "window_tokens": int(self.tokens.shape[1]), "prefix_fractions": self.fractions,
                "cuts": self.cuts, "choices": len(self.choices[0][0]) if self.choices else 0,
                "documents": sorted(set(self.docs)), "fingerprint": self.fingerprint}


def split_description(data_cfg) -> str:
    if data_cfg.eval_files:
        return f"data.eval_files {list(data_cfg.eval_files)}"
    if data_cfg.source == "hub" and data_cfg.hub_eval_split:
        return f"hub split {data_cfg.hub_eval_split!r} of {data_cfg.hub_name}"
    return (f"data.eval_fraction={data_cfg.eval_fraction} of the {data_cfg.source} training documents, chosen by a "
            f"hash of the document index (train/data/corpus.py held_out_mask); never in a training batch")


def build_yardstick(prepared, eval_cfg, data_cfg, tokenizer=None) -> Optional[Yardstick]:
    """The yardstick of a prepared data set's held-out split (None: no document split to cut)."""
    if prepared.eval is None or prepared.prompted:
        return None
    W, store, ids = eval_cfg.window_tokens, prepared.eval.store, prepared.eval.doc_ids
    lengths = store.lengths[ids]
    per_doc = np.maximum(lengths, 0) // W  # whole windows in each document
    docs, starts = [], []
    for j in range(int(per_doc.max()) if len(per_doc) else 0):  # round-robin over the documents
        for d, n in zip(ids.tolist(), per_doc.tolist()):
            if j < n and len(docs) < eval_cfg.windows:
                docs.append(d)
                starts.append(j * W)
    if not docs:
        raise ValueError(f"the held-out split has no document of at least eval.window_tokens={W} tokens (longest: "
                         f"{int(lengths.max()) if len(lengths) else 0}); lower eval.window_tokens or hold out more "
                         f"data (data.eval_fraction, data.eval_files)")
    tokens = np.stack([store.tokens(d)[s:s + W] for d, s in zip(docs, starts)]).astype(np.int64)
    cuts = [min(int(round(f * W)), W - 1) for f in eval_cfg.prefix_fractions]
    tok = tokenizer if tokenizer is not None else prepared.tokenizer
    nbytes = lambda ids_: len(tok.decode(list(map(int, ids_))).encode("utf-8"))  # noqa: E731
    full = [nbytes(w) for w in tokens]
    cont_bytes = [[max(full[i] - (nbytes(tokens[i, :c]) if c else 0), 1) for i in range(len(docs))] for c in cuts]
    return Yardstick(docs, starts, tokens, list(eval_cfg.prefix_fractions), cuts, cont_bytes,
                     _choices(docs, eval_cfg.choices), split_description(data_cfg))


def _choices(docs: list[int], k: int) -> list[tuple[list[int], int]]:
    """Per window i: k candidate windows (i itself at a drawn position; the others from other
    documents where there are enough, else other windows), from a fixed generator."""
    if k < 2 or len(docs) < 2:
        return []
    k = min(k, len(docs))
    out = []
    for i, d in enumerate(docs):
        g = np.random.default_rng([CHOICE_SEED, i])
        others = [j for j, e in enumerate(docs) if e != d]
        if len(others) < k - 1:
            others = [j for j in range(len(docs)) if j != i]
        picked = g.choice(len(others), size=k - 1, replace=False).tolist()
        cands = [others[j] for j in picked]
        pos = int(g.integers(k))
        cands.insert(pos, i)
        out.append((cands, pos))
    return out


def score_yardstick(scorer, ys: Yardstick, objective, tokens) -> dict:
    """The yardstick of one model (an evaluate.Scorer around it) pretrained on `objective`.

    Returns {"continuation": {nats_per_token, bits_per_byte, tokens, bytes, by_fraction},
    "choice": {acc, se, n, k, chance} or None, "way", "fingerprint", "windows", "seconds"}."""
    from ..objectives.scoring import continuation_request, scoring_way

    t0 = time.perf_counter()
    way, _ = scoring_way(objective)
    N = len(ys.docs)
    rows = ys.tokens.tolist()
    nll = [[0.0] * N for _ in ys.cuts]  # [fraction][window]
    shared = way == "plain" and scorer.arch.reads_context_causally
    nonzero = [c for c in ys.cuts if c > 0]
    if shared and nonzero:  # one pass per window scores every nonzero cut
        c0 = min(nonzero)
        got = scorer.loglikelihoods([(r[:c0], r[c0:]) for r in rows])
        for f, c in enumerate(ys.cuts):
            if c > 0:
                nll[f] = [-math.fsum(g.token_logprobs[c - c0:]) for g in got]
    todo = [(f, c) for f, c in enumerate(ys.cuts) if not (shared and c > 0)]
    reqs = [continuation_request(objective, r[:c], r[c:], tokens) for _, c in todo for r in rows]
    got = scorer.loglikelihoods([(q.context, q.target) for q in reqs])
    for n, (f, _) in enumerate(todo):
        nll[f] = [-math.fsum(g.token_logprobs[q.lead:]) for g, q in zip(got[n * N:(n + 1) * N], reqs[n * N:(n + 1) * N])]
    by_fraction = {}
    for f, c in enumerate(ys.cuts):
        n_tok, n_bytes = N * (ys.tokens.shape[1] - c), sum(ys.bytes[f])
        by_fraction[str(ys.fractions[f])] = _loss(math.fsum(nll[f]), n_tok, n_bytes)
    total = _loss(math.fsum(map(math.fsum, nll)), sum(v["tokens"] for v in by_fraction.values()),
                  sum(v["bytes"] for v in by_fraction.values()))
    choice, correct = _choice(scorer, ys, objective, tokens)
    per_window = {"nll": [math.fsum(nll[f][i] for f in range(len(ys.cuts))) for i in range(N)],
                  "tokens": [sum(ys.tokens.shape[1] - c for c in ys.cuts)] * N,
                  "bytes": [sum(ys.bytes[f][i] for f in range(len(ys.cuts))) for i in range(N)], "correct": correct,
                  "docs": list(ys.docs)}
    return {"continuation": {**total, "by_fraction": by_fraction}, "choice": choice, "way": way,
            "fingerprint": ys.fingerprint, "windows": N, "per_window": per_window,
            "seconds": round(time.perf_counter() - t0, 3)}


def _loss(nats: float, n_tokens: int, n_bytes: int) -> dict:
    return {"nats_per_token": nats / n_tokens, "bits_per_byte": nats / math.log(2) / n_bytes, "tokens": n_tokens,
            "bytes": n_bytes}


def _choice(scorer, ys: Yardstick, objective, tokens) -> tuple[Optional[dict], Optional[list[int]]]:
    """Zero-shot continuation choice at the first cut point: (summary, 1/0 per window)."""
    from ..objectives.scoring import continuation_request

    if not ys.choices:
        return None, None
    c = ys.cuts[0]
    rows = ys.tokens.tolist()
    reqs = [continuation_request(objective, rows[i][:c], rows[j][c:], tokens)
            for i, (cands, _) in enumerate(ys.choices) for j in cands]
    got = scorer.loglikelihoods([(q.context, q.target) for q in reqs])
    k = len(ys.choices[0][0])
    correct = []
    for i, (_, pos) in enumerate(ys.choices):
        scores = [math.fsum(g.token_logprobs[q.lead:]) for g, q in zip(got[i * k:(i + 1) * k], reqs[i * k:(i + 1) * k])]
        correct.append(int(max(range(k), key=lambda m: scores[m]) == pos))
    n, c = len(correct), sum(correct)
    return {"acc": c / n, "se": binomial_se(c, n), "n": n, "k": k, "chance": 1 / k}, correct


def flat_metrics(result: Optional[dict]) -> dict:
    """The yardstick's headline numbers under the keys metrics.jsonl and the tables use."""
    if not result:
        return {}
    out = {"yardstick_nats": result["continuation"]["nats_per_token"],
           "yardstick_bpb": result["continuation"]["bits_per_byte"]}
    if result.get("choice"):
        out["zero_shot_acc"], out["zero_shot_se"] = result["choice"]["acc"], result["choice"]["se"]
    if result.get("tasks"):
        out["tasks_acc"], out["tasks_se"] = result["tasks"]["pooled"]["acc"], result["tasks"]["pooled"]["se"]
    return out


def evaluate_model(model, arch, ys: Yardstick, objective, tokenizer, tokens, *, batch_size: int = 32,
                   task_records: Sequence[dict] = (), shard=None) -> dict:
    """score_yardstick (and the task files' rank classification) of a model (`arch`: its registry
    entry), in eval mode; the model's train/eval mode is restored afterwards. `shard`: this
    process's share of the scoring batches under a data-parallel launch (train/eval/parallel.py)."""
    import torch

    from .scoring import Scorer
    from .tasks import aggregate, rank_classify

    was_training = model.training
    try:
        with torch.no_grad():
            scorer = Scorer(model, arch, batch_size=batch_size, eos_id=tokens.eos_id, pad_id=tokens.pad_id,
                            shard=shard)
            res = score_yardstick(scorer, ys, objective, tokens)
            if task_records:
                res["tasks"] = aggregate(rank_classify(scorer, tokenizer, list(task_records)))
    finally:
        model.train(was_training)
    return res
