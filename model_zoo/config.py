"""Hugging Face configs for the three architectures.

`DecoderConfig` serves CD and ND: they are one model class with identical parameters and differ
only in `prefix_attention` (ND: tokens of an example's prefix attend to each other in both
directions). A CD checkpoint therefore loads as ND unchanged (the NC-A adaptation).
`EncoderDecoderConfig` is ED: a bidirectional encoder and a causal decoder with cross-attention,
each `n_layers` deep (unless `n_encoder_layers` / `n_decoder_layers`), built from the same blocks.
The controls (CONTROL_DEFAULTS: ED depths and shared weights, the entropy-invariant scale, q/k
biases, a causal encoder) are off by default; docs/model_zoo.md "Controls".

Every option is validated here, with the valid choices in the message, so that a typo fails at
construction and not somewhere inside a forward pass.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from .loss import LOSS_IMPLS

NORMS = ("rmsnorm", "layernorm")
MLPS = ("geglu", "swiglu", "gelu")
POSITIONS = ("rope", "t5_bias", "learned", "none")
BIDIRECTIONAL_MODES = ("full", "forward", "mixed_heads", "mixed_layers")
ATTN_IMPLS = ("auto", "reference", "sdpa", "flex")

# Every option shared by both configs, with its default and meaning. The defaults are the
# reference experiment's choices (Wang et al. 2022: T5.1.1-style blocks, GEGLU, RMSNorm,
# T5 relative position buckets, tied embeddings, vocab 32128) at a tiny shape.
COMMON_DEFAULTS = dict(
    vocab_size=32128,        # T5's SentencePiece vocabulary incl. 100 sentinels, padded to x128
    d_model=64,              # residual stream width
    n_layers=2,              # decoder-only: layers; ED: layers of the encoder AND of the decoder (by default)
    n_heads=4,               # attention heads
    head_dim=16,             # width of one head (n_heads * head_dim need not equal d_model)
    d_ff=128,                # MLP hidden width (per branch for the gated MLPs)
    mlp="geglu",             # geglu (tanh-GELU gate, T5.1.1) | swiglu (Llama) | gelu (GPT-2, no gate)
    norm="rmsnorm",          # rmsnorm (T5/Llama, fp32 statistics) | layernorm
    norm_eps=1e-6,
    position="t5_bias",      # rope | t5_bias (relative buckets, additive score bias) | learned | none
    rope_theta=10000.0,      # RoPE base
    rel_buckets=32,          # T5 relative-position buckets
    rel_max_distance=128,    # T5: distances beyond this share the last bucket
    max_position_embeddings=2048,  # size of the learned absolute table (position="learned")
    tie_embeddings=True,     # lm_head shares the input embedding matrix
    scale_tied_logits=True,  # tied: multiply final hidden by d_model**-0.5 before lm_head (T5/t5x)
    scale_attn=True,         # scores * head_dim**-0.5; T5 uses False (the scale lives in the init)
    entropy_scale=False,     # control: scores also x log_512(n), n = keys the query attends to (its mask row)
    qk_bias=False,           # control: q_proj and k_proj have a bias (RoPE + bias); v_proj / o_proj never
    bidirectional_mode="full",  # how bidirectional attention runs: full | forward (causal) | mixed_heads | mixed_layers
    attn_impl="auto",        # auto (flex for training on CUDA; SDPA on CPU and for inference) | reference | sdpa | flex
    dropout=0.0,             # residual-branch and embedding dropout (reference: 0 pretrain, 0.1 MT-F)
    z_loss=0.0,              # coefficient of log(Z)^2 added to the loss (reference: 1e-4)
    loss_impl="auto",        # training loss (model_zoo/loss.py): auto (CUDA: liger, else chunked; CPU: dense) |
                             # dense | chunked | liger; fused ones skip the logits (output logits=None)
    loss_chunk_size=1024,    # loss_impl=chunked: rows per chunk (its fp32 logits: rows x vocab x 4 bytes)
    initializer_range=0.02,  # std of the normal init of linear and embedding weights
    pad_token_id=0,
    eos_token_id=1,
)

# ED-only options (the controls of the encoder-decoder's structure).
ED_DEFAULTS = dict(
    n_encoder_layers=None,   # encoder depth (None: n_layers)
    n_decoder_layers=None,   # decoder depth (None: n_layers)
    share_encoder_decoder=False,  # decoder block i reuses encoder block i's self-attention, MLP and their norms
)

# Each control's default: a config whose controls all sit here computes what the model did before
# they existed (export's native Llama / T5 forms are only written for such configs).
CONTROL_DEFAULTS = dict(entropy_scale=False, qk_bias=False, bidirectional_mode="full", **ED_DEFAULTS)


def _positive_or_none(name: str, v) -> None:
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
        raise ValueError(f"{name}={v!r} must be a positive integer (or None for n_layers)")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


class _ArchscaleConfig(PretrainedConfig):
    """Fields and validation shared by both configs (see COMMON_DEFAULTS for each option)."""

    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "d_ff",
    }

    def __init__(self, **kwargs):
        own = {k: kwargs.pop(k, v) for k, v in COMMON_DEFAULTS.items()}
        tie = own.pop("tie_embeddings")
        for k, v in own.items():
            setattr(self, k, v)
        self.tie_embeddings = tie
        kwargs.setdefault("tie_word_embeddings", tie)
        super().__init__(pad_token_id=own["pad_token_id"], eos_token_id=own["eos_token_id"], **kwargs)
        self.validate_options()

    @classmethod
    def option_names(cls) -> set[str]:
        """The options a user may set on this config (`sizes.make_config`'s overrides)."""
        return set(COMMON_DEFAULTS)

    def validate_options(self) -> None:
        _check_choice("norm", self.norm, NORMS)
        _check_choice("mlp", self.mlp, MLPS)
        _check_choice("position", self.position, POSITIONS)
        _check_choice("bidirectional_mode", self.bidirectional_mode, BIDIRECTIONAL_MODES)
        for name in ("entropy_scale", "qk_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        _check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        _check_choice("loss_impl", self.loss_impl, LOSS_IMPLS)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff", "loss_chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position='rope' needs an even head_dim, got {self.head_dim}")
        if self.bidirectional_mode == "mixed_heads" and self.n_heads % 2:
            raise ValueError(f"bidirectional_mode='mixed_heads' needs an even n_heads, got {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.z_loss < 0:
            raise ValueError(f"z_loss={self.z_loss} must be >= 0")


class DecoderConfig(_ArchscaleConfig):
    """CD / ND decoder-only model. `prefix_attention=False` is CD, True is ND.

    ND: the tokens marked bidirectional (an example's prefix: `prefix_lengths` or the batch's
    `bidirectional` tensor) attend to each other in both directions; all other tokens are causal.
    With position="t5_bias" the decoder-only model uses bidirectional buckets for both CD and ND,
    so the two share parameters exactly.
    """

    model_type = "archscale_decoder"

    def __init__(self, prefix_attention: bool = False, **kwargs):
        self.prefix_attention = prefix_attention
        super().__init__(**kwargs)

    @property
    def arch(self) -> str:
        """A label for messages and export records (nothing branches on it: the fields decide)."""
        return "nd" if self.prefix_attention else "cd"

    @property
    def decoder_depth(self) -> int:
        return self.n_layers


class EncoderDecoderConfig(_ArchscaleConfig):
    """ED: bidirectional encoder, causal decoder with cross-attention; `n_layers` each unless
    `n_encoder_layers` / `n_decoder_layers` say otherwise.

    The encoder uses bidirectional T5 buckets, the decoder unidirectional ones (as T5 does).
    `share_encoder_decoder`: decoder block i runs encoder block i's self-attention, MLP and their
    two norms (one set of weights, stored once under encoder.layers.i); the decoder's own
    parameters are its cross-attention (with its norm), its final norm and its T5 bias table, so
    the model has a decoder-only model's parameters plus those.
    """

    model_type = "archscale_ed"

    def __init__(self, decoder_start_token_id: int | None = None, n_encoder_layers: int | None = None,
                 n_decoder_layers: int | None = None, share_encoder_decoder: bool = False, **kwargs):
        kwargs.setdefault("is_encoder_decoder", True)
        self.n_encoder_layers, self.n_decoder_layers = n_encoder_layers, n_decoder_layers
        self.share_encoder_decoder = share_encoder_decoder
        super().__init__(**kwargs)
        self.decoder_start_token_id = self.pad_token_id if decoder_start_token_id is None else decoder_start_token_id

    @classmethod
    def option_names(cls) -> set[str]:
        return super().option_names() | set(ED_DEFAULTS) | {"decoder_start_token_id"}

    def validate_options(self) -> None:
        super().validate_options()
        _positive_or_none("n_encoder_layers", self.n_encoder_layers)
        _positive_or_none("n_decoder_layers", self.n_decoder_layers)
        if not isinstance(self.share_encoder_decoder, bool):
            raise ValueError(f"share_encoder_decoder={self.share_encoder_decoder!r} must be true or false")
        if self.share_encoder_decoder and self.encoder_depth != self.decoder_depth:
            raise ValueError(f"share_encoder_decoder needs as many encoder as decoder layers, got "
                             f"{self.encoder_depth} and {self.decoder_depth}: set n_encoder_layers = n_decoder_layers")

    @property
    def encoder_depth(self) -> int:
        return self.n_encoder_layers if self.n_encoder_layers is not None else self.n_layers

    @property
    def decoder_depth(self) -> int:
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    @property
    def arch(self) -> str:
        """A label for messages and export records (nothing branches on it)."""
        return "ed"


def non_default_controls(config) -> list[str]:
    """'name=value' of each control option (CONTROL_DEFAULTS) away from its default.
    bidirectional_mode counts only where the model attends bidirectionally (not CD, which has no
    bidirectional tokens; ND and ED do)."""
    bidirectional = getattr(config, "prefix_attention", True)
    return [f"{name}={getattr(config, name)!r}" for name, default in CONTROL_DEFAULTS.items()
            if hasattr(config, name) and getattr(config, name) != default
            and (name != "bidirectional_mode" or bidirectional)]
