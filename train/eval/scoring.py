"""Log-likelihoods of continuations given contexts, for CD / ND / ED models (token ids in,
LogLikelihood out). How each architecture lays out a request is its registry entry's
`score_continuations` (train/registry/); this module batches the requests and scores logits.
Below the trainer (which scores the yardstick at its eval steps) and below `archscale eval`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence


def input_device(model):
    """Where a model's inputs go: its parameters' device, or for a model placed by accelerate
    (`hf_device_map`, parameters of offloaded layers on the meta device) the first GPU it uses,
    else the CPU (offloaded layers run where their inputs are)."""
    import torch

    placed = getattr(model, "hf_device_map", None)
    if placed:
        gpus = [d for d in placed.values() if d not in ("cpu", "disk", "meta")]
        return torch.device(gpus[0] if isinstance(gpus[0], str) else f"cuda:{gpus[0]}") if gpus else torch.device("cpu")
    return next(model.parameters()).device


# ============================================================================ log-likelihoods
@dataclass(frozen=True)
class LogLikelihood:
    """The score of one continuation: sum of log-probabilities, its token count, and whether
    greedy decoding would have produced exactly these tokens."""

    sum: float
    tokens: int
    greedy: bool
    token_logprobs: tuple = field(default=(), compare=False, repr=False)  # log p of each token, in order

    @property
    def mean(self) -> float:
        return self.sum / max(self.tokens, 1)


class Scorer:
    """Log-likelihoods of continuations given contexts (token ids) for a CD, ND or ED model.

    `loglikelihoods([(context_ids, continuation_ids), ...])` -> [LogLikelihood]. Requests are
    sorted by length and batched (right padding: padding is its own segment through
    `attention_mask`, so it changes no real token's output). `max_length`: decoder rows
    (context + continuation - 1 tokens: the last token is predicted, never read) / encoder inputs
    longer than this keep the end of the context (None = no limit).

    `shard` (train/eval/parallel.py): under torchrun / accelerate launch, this process scores
    every N-th of the same batches and the scores are gathered, so every process returns the
    one-process result. A model placed by accelerate (`hf_device_map`: offloaded layers) gets its
    inputs on its execution device (train/eval/placement.py).
    """

    def __init__(self, model, arch, *, batch_size: int = 16, max_length: Optional[int] = None, eos_id: int = 1,
                 pad_id: int = 0, shard=None):
        self.model = model.eval()
        self.arch = arch  # the model's registry entry: how its architecture lays out a scored request
        self.batch_size = batch_size
        self.max_length = max_length
        self.eos_id, self.pad_id = eos_id, pad_id
        self.shard = shard
        self.device = input_device(model)

    def loglikelihoods(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[LogLikelihood]:
        import torch

        reqs = [(list(c) or [self.eos_id], list(t)) for c, t in requests]
        for i, (_, t) in enumerate(reqs):
            if not t:
                raise ValueError(f"request {i} has an empty continuation; there is nothing to score")
        order = sorted(range(len(reqs)), key=lambda i: -(len(reqs[i][0]) + len(reqs[i][1])))
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

        def run(k: int) -> list[LogLikelihood]:
            with torch.no_grad():
                return self.arch.score_continuations(self, [reqs[i] for i in batches[k]])

        scored = self.shard.in_order(len(batches), run) if self.shard else [run(k) for k in range(len(batches))]
        out: list[Optional[LogLikelihood]] = [None] * len(reqs)
        for idx, scores in zip(batches, scored):
            for i, sc in zip(idx, scores):
                out[i] = sc
        return out  # type: ignore[return-value]

    def truncate(self, ctx: list[int], room: Optional[int]) -> list[int]:
        """`ctx` cut to its last `room` tokens (None = no limit)."""
        if room is None or len(ctx) <= room:
            return ctx
        if room < 1:
            raise ValueError(f"the continuation leaves no room for context in max_length={self.max_length}; "
                             f"raise max_length or score a shorter continuation")
        return ctx[len(ctx) - room:]  # keep the end of the prompt (the question)

    @staticmethod
    def score(logits, tgt: list[int]) -> LogLikelihood:
        """logits (n, V): row j predicts tgt[j]."""
        import torch

        t = torch.tensor(tgt, device=logits.device)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
        token_lp = logp.gather(-1, t[:, None])[:, 0]  # (n,)
        return LogLikelihood(float(token_lp.sum()), len(tgt), bool((logits.argmax(-1) == t).all()),
                             tuple(token_lp.tolist()))
