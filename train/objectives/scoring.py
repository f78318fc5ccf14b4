"""How a model pretrained on an objective is asked for a continuation: a pure transform.

The common yardstick (train/eval/yardstick.py) scores the same continuation given the same
prefix for every cell. A cell is asked the way its objective trained it to answer:

| objective          | context (encoder / bidirectional prefix) | target (decoder side)       | scored        |
|--------------------|-------------------------------------------|-----------------------------|---------------|
| flm, plm, prompted | prefix                                    | continuation                | all of it     |
| mlm                | prefix + <extra_id_0> + EOS               | <extra_id_0> + continuation | continuation  |
| ul2 (S denoiser)   | [S2S] + prefix                            | continuation                | all of it     |
| ul2 (no S)         | [mode] + prefix + <extra_id_0> + EOS      | <extra_id_0> + continuation | continuation  |

Span corruption is asked the T5 way: the whole continuation is one dropped span at the end of
the input, so its first sentinel goes in, and the sentinel (given, not scored) followed by the
continuation comes out. This is the known handicap of a span-corruption model before adaptation:
it never saw a span as long as a continuation, nor a target that long.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .config import ObjectiveConfig
from .core import TokenInfo

WAYS = {"plain": "prefix -> continuation",
        "sentinel": "prefix + <extra_id_0> + EOS -> <extra_id_0> + continuation (T5 span-corruption way)",
        "mode-prefix": "[S2S] + prefix -> continuation (UL2's S denoiser)",
        "mode-sentinel": "[mode] + prefix + <extra_id_0> + EOS -> <extra_id_0> + continuation (UL2 span)"}


@dataclass(frozen=True)
class ContinuationRequest:
    """What a Scorer is given for one (prefix, continuation): `target[lead:]` is the continuation
    whose log-likelihood is the score; `target[:lead]` is given (teacher-forced) and not scored."""

    context: list[int]
    target: list[int]
    lead: int = 0


def scoring_way(objective: ObjectiveConfig) -> tuple[str, str]:
    """(way, mode token or '') this objective is asked for a continuation (the table above)."""
    if objective.name == "mlm":
        return "sentinel", ""
    if objective.name == "ul2":
        denoisers = objective.denoisers
        prefix = [d for d in denoisers if d.kind == "prefix"]
        if prefix:
            return "mode-prefix", prefix[0].mode
        return "mode-sentinel", denoisers[0].mode
    return "plain", ""


def continuation_request(objective: ObjectiveConfig, prefix: Sequence[int], continuation: Sequence[int],
                         tokens: TokenInfo) -> ContinuationRequest:
    """The request that asks a model pretrained on `objective` for `continuation` after `prefix`."""
    prefix, continuation = list(map(int, prefix)), list(map(int, continuation))
    if not continuation:
        raise ValueError("a continuation request needs at least one continuation token")
    way, mode = scoring_way(objective)
    lead_in = [tokens.mode_id(mode)] if mode else []
    if way in ("plain", "mode-prefix"):
        return ContinuationRequest(lead_in + prefix, continuation, 0)
    if not tokens.sentinel_ids:
        raise ValueError(f"objective {objective.name!r} is scored with a sentinel, but the tokenizer has none; "
                         f"set data.num_sentinels > 0")
    s0 = tokens.sentinel_ids[0]
    return ContinuationRequest(lead_in + prefix + [s0, tokens.eos_id], [s0] + continuation, 1)
