"""Typed config of the pretraining objective (one section of the run config).

Defaults reproduce the reference experiment (Wang et al. 2022): decoder rows of 626 tokens,
span corruption with inputs 512 / targets 114, noise density 0.15, mean span length 3.
Every bad value raises ValueError naming the field, the value and a fix.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

OBJECTIVES = ("flm", "plm", "mlm", "ul2", "prompted")
DENOISER_KINDS = ("span", "prefix")


@dataclass
class DenoiserConfig:
    """One UL2 denoiser (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms")."""

    kind: str = "span"
    """'span': span corruption (R and X denoisers); 'prefix': prefix LM (S denoiser)."""
    mode: str = "[NLU]"
    """Mode token prepended to the inputs: UL2 uses [NLU] for R, [NLG] for X, [S2S] for S; '' = none."""
    noise_density: float = 0.15
    """Fraction of tokens dropped into spans ('span' only)."""
    mean_span_length: float = 3.0
    """Mean length of a dropped span in tokens ('span' only)."""
    rate: float = 1.0
    """Relative weight of this denoiser in the mixture (normalised over all denoisers; > 0)."""

    def validate(self, where: str = "denoiser") -> None:
        if self.kind not in DENOISER_KINDS:
            raise ValueError(f"{where}.kind={self.kind!r} is not valid; choose one of {DENOISER_KINDS}")
        if not self.rate > 0:
            raise ValueError(f"{where}.rate={self.rate} must be > 0; remove the denoiser instead of giving it rate 0")
        if self.kind == "span":
            if not 0.0 < self.noise_density < 1.0:
                raise ValueError(f"{where}.noise_density={self.noise_density} must be in (0, 1), e.g. 0.15")
            if not self.mean_span_length >= 1.0:
                raise ValueError(f"{where}.mean_span_length={self.mean_span_length} must be >= 1, e.g. 3")


def default_ul2_denoisers() -> list[DenoiserConfig]:
    """UL2's seven denoisers (R: mu 3/8 at r 0.15; S; X: mu 3/8 at r 0.5 and mu 64 at r 0.15/0.5).

    The rates (R 0.4, S 0.2, X 0.4 in total) are our default, close to but not copied from the
    paper's schedule; set your own.
    """
    return [
        DenoiserConfig("span", "[NLU]", 0.15, 3.0, 0.2),
        DenoiserConfig("span", "[NLU]", 0.15, 8.0, 0.2),
        DenoiserConfig("prefix", "[S2S]", 0.0, 1.0, 0.2),
        DenoiserConfig("span", "[NLG]", 0.5, 3.0, 0.1),
        DenoiserConfig("span", "[NLG]", 0.5, 8.0, 0.1),
        DenoiserConfig("span", "[NLG]", 0.15, 64.0, 0.1),
        DenoiserConfig("span", "[NLG]", 0.5, 64.0, 0.1),
    ]


@dataclass
class ObjectiveConfig:
    """What the model is trained to predict. The architecture (cd / nd / ed) is given at build time.

    Row lengths by architecture family:
      decoder (cd, nd): rows of `seq_length` tokens (inputs and targets concatenated);
      encoder-decoder (ed): encoder rows / decoder rows of
        flm: not available; plm: seq_length / seq_length, seq_length tokens in all;
        mlm, ul2, prompted: inputs_length / targets_length.
    The row shapes, and the tokens a row carries (the token budget's unit), are
    train/objectives/rows.py's.
    """

    name: str = "flm"
    """flm (full LM) | plm (prefix LM, split uniform per example) | mlm (T5 span corruption) |
    ul2 (mixture of denoisers) | prompted (multitask finetuning on input/target records)."""
    seq_length: int = 626
    """Decoder rows (cd / nd) in tokens; ed PLM rows too. Reference: 626. For decoder mlm it must
    equal inputs_length + targets_length."""
    inputs_length: int = 512
    """Span-corrupted input length (ed encoder rows for mlm / ul2 / prompted). Reference: 512."""
    targets_length: int = 114
    """Target length (ed decoder rows for mlm / ul2 / prompted). For mlm it must equal what T5's
    random_spans_helper derives from inputs_length (114 for 512 at density 0.15, span 3)."""
    noise_density: float = 0.15
    """mlm: fraction of the raw tokens dropped into spans. Reference: 0.15."""
    mean_noise_span_length: float = 3.0
    """mlm: mean dropped span length in tokens. Reference: 3."""
    ed_plm_examples_per_row: int = 2
    """ed plm: examples packed per row. Each example is a piece of seq_length // this many tokens
    split uniformly; its prefix goes to the encoder and its rest to the decoder (rows of seq_length
    each, so either side fits whatever the split), and a row holds k pieces' tokens in all (the
    seq_length a decoder row carries: tokens seen match). The reference packs two (2); 1 = one
    seq_length example per row."""
    denoisers: list[DenoiserConfig] = field(default_factory=default_ul2_denoisers)
    """ul2: the mixture. Each entry: kind, mode, noise_density, mean_span_length, rate (dicts accepted)."""

    def __post_init__(self) -> None:
        self.denoisers = [d if isinstance(d, DenoiserConfig) else _denoiser_from_dict(d, i)
                          for i, d in enumerate(self.denoisers)]
        self.validate()

    def validate(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective.name={self.name!r} is not valid; choose one of {OBJECTIVES}")
        for f in ("seq_length", "inputs_length", "targets_length", "ed_plm_examples_per_row"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"objective.{f}={v!r} must be a positive integer")
        if self.seq_length < 2:
            raise ValueError(f"objective.seq_length={self.seq_length} must be at least 2 (one token to "
                             f"condition on, one to predict); the reference uses 626")
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"objective.noise_density={self.noise_density} must be in (0, 1); reference 0.15")
        if not self.mean_noise_span_length >= 1.0:
            raise ValueError(f"objective.mean_noise_span_length={self.mean_noise_span_length} must be >= 1; "
                             f"reference 3")
        if self.name == "ul2":
            if not self.denoisers:
                raise ValueError("objective.denoisers is empty; give at least one denoiser for ul2")
            for i, d in enumerate(self.denoisers):
                d.validate(f"objective.denoisers[{i}]")


def _denoiser_from_dict(d, i: int) -> DenoiserConfig:
    if not isinstance(d, dict):
        raise ValueError(f"objective.denoisers[{i}] must be a mapping with keys "
                         f"{[f.name for f in dataclasses.fields(DenoiserConfig)]}, got {d!r}")
    valid = {f.name for f in dataclasses.fields(DenoiserConfig)}
    unknown = set(d) - valid
    if unknown:
        raise ValueError(f"objective.denoisers[{i}] has unknown keys {sorted(unknown)}; valid keys: {sorted(valid)}")
    return DenoiserConfig(**d)
