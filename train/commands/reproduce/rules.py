"""The verdict rules of `archscale reproduce`, each stated in its docstring before any run, and
the metric keys they read. A rule takes the paired differences (comparison.pairs' format) and
the claim's role -> cell-name map, and returns (verdict, reasons)."""
from __future__ import annotations

METRIC = "yardstick_nats"  # every rule reads the continuation loss (lower is better)


def _pair(pairs: list[dict], a: str, b: str, metric: str = METRIC) -> dict:
    """The a - b difference on `metric` (either order in the list; sign fixed to a - b)."""
    for p in pairs:
        if p["metric"] != metric:
            continue
        if (p["a"], p["b"]) == (a, b):
            return p
        if (p["a"], p["b"]) == (b, a):
            flip = lambda v: None if v is None else -v  # noqa: E731
            return {**p, "a": a, "b": b, "mean": -p["mean"], "low": flip(p["high"]), "high": flip(p["low"])}
    raise KeyError(f"no {a} - {b} difference on {metric}")


def better(p: dict) -> bool:
    """a is resolved better (lower loss) than b."""
    return p["resolved"] and p["mean"] < 0


def worse(p: dict) -> bool:
    return p["resolved"] and p["mean"] > 0


def _describe(p: dict, unit: str = "nats/token") -> str:
    iv = "no interval" if p["low"] is None else f"[{p['low']:+.4f}, {p['high']:+.4f}]"
    return f"{p['a']} - {p['b']} = {p['mean']:+.4f} {unit}, 95% {iv}"


def rule_gpt_vs_unilm(pairs: list[dict], names: dict) -> tuple[str, list[str]]:
    """Reproduced: ND is not resolved better than CD (no gain from the bidirectional prefix) and
    the mixed-direction ND is resolved better than both. Not reproduced: ND resolved better than
    CD, or mixed resolved worse than CD or ND. Otherwise inconclusive."""
    nd_cd = _pair(pairs, names["nd"], names["cd"])
    mix_nd, mix_cd = _pair(pairs, names["mixed"], names["nd"]), _pair(pairs, names["mixed"], names["cd"])
    reasons = [_describe(nd_cd), _describe(mix_nd), _describe(mix_cd)]
    if better(nd_cd) or worse(mix_nd) or worse(mix_cd):
        return "not reproduced", reasons
    if better(mix_nd) and better(mix_cd):
        return "reproduced", reasons
    return "inconclusive", reasons


def rule_ed_params(pairs: list[dict], names: dict) -> tuple[str, list[str]]:
    """Reproduced: ED at equal per-token FLOPs (2x the parameters) is resolved better than CD, and
    ED at equal (non-embedding) parameters is not. Not reproduced: the parameter-matched ED is resolved
    better than CD too (the advantage is not the parameters). Otherwise (no resolved advantage at
    equal FLOPs to explain) inconclusive."""
    flops, params = _pair(pairs, names["ed"], names["cd"]), _pair(pairs, names["ed-params"], names["cd"])
    reasons = [_describe(flops), _describe(params)]
    if better(params):
        return "not reproduced", reasons
    if better(flops):
        return "reproduced", reasons
    return "inconclusive", reasons


RANK = "prefix_effective_rank"  # su-low-rank's metric: mean effective rank of the prefix block's attention
RANK_INIT = "prefix_effective_rank_init"  # the same of a fresh initialisation (reported, not judged)


def rule_low_rank(pairs: list[dict], names: dict) -> tuple[str, list[str]]:
    """On held-out windows (the yardstick's first 16, prefix = the first 64 tokens), the mean
    effective rank (exp of the singular values' entropy) of every layer's and head's attention
    over the prefix block, each model under the mask it was trained with. Reproduced: ND's
    bidirectional block is resolved lower-rank than CD's causal block and than the
    mixed-direction ND's block. Not reproduced: it is resolved higher than either. Otherwise
    inconclusive."""
    nd_cd, nd_mix = _pair(pairs, names["nd"], names["cd"], RANK), _pair(pairs, names["nd"], names["mixed"], RANK)
    reasons = [_describe(nd_cd, "effective rank"), _describe(nd_mix, "effective rank")]
    if worse(nd_cd) or worse(nd_mix):
        return "not reproduced", reasons
    if better(nd_cd) and better(nd_mix):
        return "reproduced", reasons
    return "inconclusive", reasons



LENGTHS = (1, 2, 4)  # su-entropy-scale: evaluation windows of n, 2n and 4n tokens (n = the training length)


def length_metric(m: int) -> str:
    return f"nats_at_{m}n"


def rule_entropy_scale(pairs: list[dict], names: dict) -> tuple[str, list[str]]:
    """On held-out windows 4n tokens long (n = the training length), the mean next-token loss of
    each window's last n/2 tokens (nats/token; the same count at every length, so windows of n,
    2n and 4n differ only in how far past the trained length those tokens sit). Reproduced: the
    log_512(n)-scaled RoPE model and the RoPE + q/k-bias model are each resolved lower at 4n
    than plain RoPE. Not reproduced: either is resolved higher at 4n. Otherwise inconclusive."""
    key = length_metric(LENGTHS[-1])
    logn, bias = _pair(pairs, names["logn"], names["rope"], key), _pair(pairs, names["qkbias"], names["rope"], key)
    reasons = [_describe(logn) + f" at {LENGTHS[-1]}n", _describe(bias) + f" at {LENGTHS[-1]}n"]
    if worse(logn) or worse(bias):
        return "not reproduced", reasons
    if better(logn) and better(bias):
        return "reproduced", reasons
    return "inconclusive", reasons


SPEEDUP = "catch_up_speedup"  # wang-nca: from-scratch steps / the adapted run's steps to the same held-out loss
NCA_EVAL_EVERY = 10  # wang-nca: both ND:MLM cells evaluate their held-out loss this often (rule_nca says 10)


def rule_nca(pairs: list[dict], names: dict) -> tuple[str, list[str]]:
    """Per seed: the from-scratch ND:MLM run's final held-out MLM loss (own objective) is the
    target; the speed-up is its step count divided by the first step at which the NC-A run (seed i
    of CD:FLM, continued as ND:MLM on the same batches per step) reaches that loss (both ND:MLM
    cells evaluate every 10 steps, so the speed-up is a lower bound). Reproduced: a speed-up of at least 2 on every seed (the
    paper's is 3.3). Not reproduced: some seed's NC-A run never reaches the target in its budget,
    or the mean speed-up is below 1.5. Otherwise inconclusive."""
    p = next(q for q in pairs if q["metric"] == SPEEDUP)
    per_seed = p["per_seed"]
    reasons = [f"{p['a']} vs {p['b']}: speed-up per seed "
               + ", ".join("never reached" if x is None else f"{x:.2f}x" for x in per_seed)
               + (f"; mean {p['mean']:.2f}x" if None not in per_seed else "")]
    if None in per_seed or p["mean"] < 1.5:
        return "not reproduced", reasons
    if min(per_seed) >= 2:
        return "reproduced", reasons
    return "inconclusive", reasons


def rule_zero_shot(pairs: list[dict], names: dict) -> tuple[str, list[str]]:
    """On the common yardstick's continuation loss: before multitask finetuning (each pretrained
    model, asked the way its objective is; windows' and seeds' error), and after it (the same
    windows, each finetuned model asked the prompted way; seeds' error). Reproduced: CD:FLM is
    resolved lower than ND:PLM and than ED:MLM before MT-F, and ED:MLM is resolved lower than
    CD:FLM after. Not reproduced: CD:FLM is resolved higher than either before, or ED:MLM is
    resolved higher than CD:FLM after. Otherwise inconclusive. The held-out toy task's accuracy
    (rank classification, chance 0.5) is reported, not judged."""
    cd_nd, cd_ed = _pair(pairs, names["cd"], names["nd"]), _pair(pairs, names["cd"], names["ed"])
    ed_cd = _pair(pairs, names["ed"], names["cd"], "mtf_nats")
    reasons = [_describe(cd_nd) + " before MT-F", _describe(cd_ed) + " before MT-F", _describe(ed_cd) + " after MT-F"]
    if worse(cd_nd) or worse(cd_ed) or worse(ed_cd):
        return "not reproduced", reasons
    if better(cd_nd) and better(cd_ed) and better(ed_cd):
        return "reproduced", reasons
    return "inconclusive", reasons
