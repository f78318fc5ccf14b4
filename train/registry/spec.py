"""The registry entry: what the trainer asks of an architecture (train/registry/__init__.py).

`ArchSpec` holds what every architecture shares (the name, the objectives that fit, the model
build through model_zoo, parameter counts); a family subclass (decoder.py, encoder_decoder.py)
answers what differs by overriding methods, so no caller branches on the architecture.
model_zoo (and torch) are imported where used: train.config.derive checks an objective's fit
through this package on a login node (`archscale submit`), which never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

from ..objectives.config import OBJECTIVES


def train_flops(config, *args, **kwargs) -> float:
    """model_zoo.train_flops (imported on first use)."""
    import model_zoo

    return model_zoo.train_flops(config, *args, **kwargs)


def segments(seg) -> list[list[tuple[int, int]]]:
    """Per row of a [B, T] segment-id tensor: (segment id, length) of each contiguous run."""
    out = []
    for row in seg.tolist():
        runs, prev, n = [], None, 0
        for s in row:
            if s == prev:
                n += 1
            else:
                if prev is not None:
                    runs.append((prev, n))
                prev, n = s, 1
        if prev is not None:
            runs.append((prev, n))
        out.append(runs)
    return out


@dataclass(frozen=True)
class Lengths:
    """Token lengths one batch row carries through the model."""

    decoder: int             # decoder tokens per row (CD/ND: the whole row; ED: the decoder row)
    encoder: int = 0         # ED: encoder tokens per row

    def text(self) -> str:
        """'T', or 'encoder/decoder' tokens."""
        return f"{self.encoder}/{self.decoder}" if self.encoder else f"{self.decoder}"

    @property
    def model_input(self) -> int:
        """The longest input the model reads: the encoder's when there is one, else the row."""
        return self.encoder or self.decoder


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: a family (a subclass, which overrides the methods marked 'family' and
    names its model class) plus the settings that make this entry what it is (`model_options`).
    As torchtitan's TrainSpec, the entry holds its model class and config class: nothing reads
    the entry's name back to find them."""

    name: str
    description: str
    reference_size: str = ""  # model_zoo size of the reference experiment (shared/SCIENCE.md; plan --reference)
    # model_zoo config settings that make this entry what it is, over its config class's defaults
    # (ND: prefix_attention=True; EDS: share_encoder_decoder=True); a run's model.overrides may not contradict them
    model_options: Mapping[str, object] = field(default_factory=dict, hash=False)
    family = "?"  # the family's name, for messages (a subclass sets it)
    # family: objective -> why it does not fit, in a few words (ED: flm "has no encoder input"); the one
    # statement of a misfit: `objectives`, `check_objective`, `unfit_reason` and build_objective read it
    unfit: ClassVar[Mapping[str, str]] = {}

    @property
    def objectives(self) -> tuple[str, ...]:
        """The objectives that fit (train.objectives.OBJECTIVES less the family's `unfit`)."""
        return tuple(o for o in OBJECTIVES if o not in self.unfit)

    def check_objective(self, objective_name: str) -> None:
        """Raises ValueError (one line, with the fix) if the objective does not fit: the one check
        that train, --dry-run, plan, submit, sweep and build_objective share (train.config.derive)."""
        if objective_name not in self.objectives:
            from . import ARCHITECTURES

            fits = [a for a, s in ARCHITECTURES.items() if objective_name in s.objectives]
            why = f": {objective_name} {self.unfit[objective_name]}" if objective_name in self.unfit else ""
            raise ValueError(f"objective {objective_name!r} does not fit arch {self.name!r} ({self.description}{why}); "
                             f"use objective {' or '.join(repr(o) for o in self.objectives)} for {self.name}, "
                             f"or arch {' / '.join(repr(a) for a in fits)} for {objective_name}")

    def same_family(self, other: "ArchSpec") -> bool:
        """Whether `other` is built from the same blocks (compare --match sizes the cells of the
        other family against the named cell)."""
        return type(other) is type(self)

    def accepts_weights_of(self, other: "ArchSpec") -> bool:
        """Whether a checkpoint of `other` can initialise this architecture (init.from_checkpoint:
        the same family of weights, e.g. CD -> ND adaptation)."""
        return self.same_family(other)

    # ---------------------------------------------------------------- family: evaluation
    def score_continuations(self, scorer, batch) -> list:
        """family: eval.scoring.LogLikelihood of each (context ids, continuation ids) in `batch`, laid
        out as this architecture reads a prompt (`scorer`: an eval.scoring.Scorer, for its model,
        device, pad id, max_length, truncate and score)."""
        raise NotImplementedError

    @property
    def reads_context_causally(self) -> bool:
        """Whether a continuation's log-likelihoods do not depend on where its context ends (a
        causal reading of the whole row): then one forward pass over a window scores every cut
        point of it (the yardstick, train/eval/yardstick.py)."""
        return False

    def generated_tokens(self, generated, context_length: int):
        """family: the new tokens of `model.generate(...)`'s first row."""
        raise NotImplementedError

    # ------------------------------------------------------------------ family: analysis
    def attention_views(self, model, ids, prefix: int) -> dict[str, list[dict]]:
        """family: {mask name: model_zoo.analysis.attention_spectra rows} that `archscale analyze`
        compares on the same token rows [B, T]."""
        raise NotImplementedError

    def attention_full_rank(self, ids) -> int:
        """family: the largest rank an attention matrix of `attention_views` can have."""
        raise NotImplementedError

    # ------------------------------------------------------------------ family: rows and FLOPs
    @property
    def layout(self):
        """family: how train/objectives lays out rows (objectives.rows' DecoderLayout or
        EncoderDecoderLayout): build_objective(cfg, spec, tokens) and `row_shape` ask it."""
        raise NotImplementedError

    def row_shape(self, objective):
        """The row train/objectives packs for this objective (objectives.rows.RowShape): the one
        owner of a row's lengths and of the tokens it carries, which the packer fills and
        `row_lengths`, `tokens_per_row` and `row_flops` read. Raises ValueError (one line, with the
        fix) for an objective that does not fit, or lengths that do not fit each other."""
        self.check_objective(objective.name)
        return self.layout.shape(objective, self.name)

    def row_lengths(self, objective) -> Lengths:
        """The lengths the model reads per row: `row_shape`'s (encoder, decoder)."""
        encoder, decoder = self.row_shape(objective).lengths
        return Lengths(decoder=decoder, encoder=encoder)

    def tokens_per_row(self, objective) -> int:
        """Tokens a full batch row carries (encoder + decoder for ED), the unit of the token
        budget (tokens seen; train/config/derived.py) and the packer's total per row: the row
        shape's. Rows are full but for padding (document ends, an ED row whose two sides fill
        unevenly); compare counts a cell's real stream to meet its budget (commands/compare/sizing.py)."""
        return self.row_shape(objective).tokens_per_row

    def row_flops(self, config, objective) -> float:
        """family: expected training FLOPs of one batch row as computed (model_zoo.train_flops;
        padding computed): the one analytic figure that --dry-run, plan and the reports use per
        row. The loop counts each batch exactly (`batch_flops`, attention per packed document)."""
        raise NotImplementedError

    def step_flops(self, config, objective, global_batch_size: int) -> float:
        """Planned training FLOPs of one optimizer step: `row_flops` x the global batch's rows. The
        one per-step figure --dry-run, plan, the loop's metrics (planned_flops_per_step) and
        compare report (tests/test_flops.py holds them equal for every case that runs)."""
        return self.row_flops(config, objective) * global_batch_size

    def random_batch(self, rows: int, lengths: Lengths, vocab_size: int, generator) -> dict:
        """family: `rows` full rows of random tokens in the batch contract (one example per row),
        for benchmarks and tests."""
        raise NotImplementedError

    def batch_flops(self, config, batch: dict) -> float:
        """family: exact training FLOPs of a packed batch (the batch contract), padding computed."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ the model
    @property
    def model_class(self):
        """family: the model_zoo class this entry builds (imported on first use: no torch on a login node)."""
        raise NotImplementedError

    @property
    def config_class(self):
        """The model_zoo config class (the model class's `config_class`)."""
        return self.model_class.config_class

    @staticmethod
    def _options(model_cfg, vocab_size: int | None) -> dict:
        options = {"attn_impl": model_cfg.attn_impl, "z_loss": model_cfg.z_loss, "loss_impl": model_cfg.loss_impl}
        if vocab_size is not None:
            options["vocab_size"] = vocab_size
        return {**options, **model_cfg.overrides}  # explicit overrides win

    def make_config(self, model_cfg, vocab_size: int | None = None):
        """The model_zoo config for this run's `model` section (vocab from the tokenizer): the
        named size, this entry's `model_options`, the run's options over them (a contradiction of
        `model_options` fails naming both)."""
        import model_zoo

        return model_zoo.sized_config(self.config_class, model_cfg.size, self.model_options,
                                      **self._options(model_cfg, vocab_size))

    def build(self, model_cfg, vocab_size: int | None = None, device=None):
        """A freshly initialised model of this entry (device="meta": the structure only)."""
        import model_zoo

        return model_zoo.instantiate(self.model_class, self.make_config(model_cfg, vocab_size), device=device)

    def num_params(self, config, embeddings: bool = True) -> int:
        """Parameters of the model `config` describes; embeddings=False: the non-embedding count
        (what --match params and the scaling ladders match)."""
        import model_zoo

        return model_zoo.num_params(config, embeddings=embeddings)

    def num_layers(self, config) -> int:
        """family: blocks a pipeline splits."""
        raise NotImplementedError

    # ------------------------------------------------------------------- family: the pipeline
    def pipeline_layers_layout(self, config):
        """family: the pipeline layers of a model_zoo config in order (registry.layers.PipelineLayout:
        each layer's kind, row side, carries, model_zoo key prefixes, tied or not; the last stage's
        label shift; the batch keys): train.engine.pipeline builds its LayerSpecs from it, train.commands.plan
        counts parameters and activations over it."""
        raise NotImplementedError

    def pipeline_refusal(self, config) -> str:
        """Why the model `config` describes cannot be split into pipeline stages ("" if it can):
        check_pipeline raises it."""
        return ""

    def describe_blocks(self, config) -> str:
        """family: the blocks a pipeline splits, in words (check_pipeline's message)."""
        raise NotImplementedError

    def pipeline_carry_tokens(self, lengths: Lengths) -> int:
        """family: tokens of d_model-wide activations per batch row that cross a pipeline stage
        boundary, at most (the planner's bound on DeepSpeed's pipeline buffers)."""
        raise NotImplementedError

    def unfit_reason(self, objective_name: str) -> str:
        """Why an objective that is not in `objectives` does not fit, in a few words (plan's
        reference experiment lists it): the family's `unfit`."""
        return f"objective {objective_name} {self.unfit.get(objective_name, 'does not fit')} for {self.name.upper()}"
