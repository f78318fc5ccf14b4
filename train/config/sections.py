"""The sections of the run config: typed dataclasses, one docstring per field (docs/config.md
lists them all; tests/test_config.py checks every field has one). A section's ``check()`` raises
ConfigError for values its own fields get wrong; checks across sections live in ``derived.derive``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from train.data.config import DataConfig
from train.objectives.config import ObjectiveConfig

from ..errors import ConfigError
from ..registry import ARCHITECTURES

ArchName = Literal[tuple(ARCHITECTURES)]  # the registry's entries: "cd", "nd", "ed", "eds"


@dataclass
class ModelConfig:
    """Which architecture and size; handed to the model registry's ``build``."""

    arch: ArchName = "cd"
    """cd = causal decoder, nd = prefix (non-causal) decoder, ed = encoder-decoder (SCIENCE.md); eds = ED
    with shared encoder/decoder weights. The train/registry entries (docs/design.md)."""
    size: str = "debug"
    """A named size from model_zoo (``debug`` for tests/CI, the reference sizes, ...)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Model-config keys that replace the named size's values, e.g. ``model.overrides.n_layers=4``.
    Checked by the model's own config class, not here."""
    attn_impl: Literal["auto", "flex", "sdpa", "reference"] = "auto"
    """Attention kernel: auto = flash SDPA / flex attention for training on GPU, SDPA (a dense mask
    where needed) on CPU and for inference (evaluation, generation: shapes vary);
    flex, sdpa (plain causal or dense-mask SDPA), reference (plain math, the tested baseline)."""
    compile: bool = False
    """torch.compile every block (one graph per stack kind and mask direction, shapes static):
    fuses norms, activations, RoPE and residual adds; flex attention is compiled on GPUs either
    way. Costs a compile at start-up (seconds to minutes). Meant for GPUs; works on CPU too."""
    z_loss: float = 0.0
    """Coefficient of the z-loss ``z_loss * logsumexp(logits)**2`` added to the cross entropy
    (reference: 1e-4). It lives here, not in ``optim``: it is a term of the loss, which the model
    (or the pipeline's last stage) computes from its logits; the optimizer only ever sees
    gradients, and objectives only produce labels (the model never knows the objective)."""
    loss_impl: Literal["auto", "dense", "chunked", "liger"] = "auto"
    """How the training loss is computed from the last hidden states (docs/model_zoo.md):
    dense = full logits then cross-entropy (the reference); chunked = fused head + loss in
    chunks of ``model.overrides.loss_chunk_size`` rows, never the [tokens, vocab] fp32 logits;
    liger = liger-kernel's fused kernel (CUDA, ``pip install archscale[gpu]``); auto = liger on
    CUDA if installed, else chunked on CUDA (dense for micro-batches of fewer tokens than
    d_model, whose logits are smaller than the fused buffers), dense on CPU. Eval always
    computes the logits."""


@dataclass
class OptimConfig:
    """The optimizer, given to DeepSpeed as a client torch optimizer (see train/engine/ds_config.py)."""

    INFINITY_OK: ClassVar[frozenset] = frozenset({"clip_threshold"})
    """The one float field where +inf means something (train/config/coerce.py refuses inf and nan
    in every other): clip_threshold=.inf is Adafactor without update clipping (RMS / inf = 0, so the
    divisor clamps to 1). grad_clip=inf would also mean "off", but 0 already says that."""

    name: Literal["adamw", "adafactor"] = "adamw"
    """adamw = torch.optim.AdamW; adafactor = transformers' Adafactor (the reference optimizer)."""
    lr: float = 3e-4
    """Peak learning rate; the schedule multiplies it. Reference: 0.01 with the inverse_sqrt
    schedule over 10^4 steps gives lr = 1/sqrt(max(step, 10^4))."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices only (not to norms or biases)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (DeepSpeed ``gradient_clipping``); 0 = off."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW: (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW: denominator epsilon."""
    offload_cpu_adam: bool = True
    """AdamW with ``parallel.offload_optimizer``: use DeepSpeed's CPU Adam (fast; builds a C++ op
    the first time) instead of torch AdamW stepping on the CPU (slow, nothing to build)."""
    decay_rate: float = -0.8
    """Adafactor: beta2 at step t = 1 - t**decay_rate (transformers' sign convention: the
    reference's "decay 0.8" is -0.8). Must be negative."""
    beta1: Optional[float] = None
    """Adafactor: first-moment decay; None = no first moment (the reference)."""
    clip_threshold: float = 1.0
    """Adafactor: update clipping threshold (RMS of the update)."""
    adafactor_eps: tuple[float, float] = (1e-30, 1e-3)
    """Adafactor: (eps for the squared gradient, eps for the parameter scale)."""
    scale_parameter: bool = True
    """Adafactor: multiply the step by the RMS of each parameter (T5's multiply_by_parameter_scale)."""
    relative_step: bool = False
    """Adafactor: compute its own step size min(1e-2, 1/sqrt(t)) and ignore ``lr`` and the
    schedule. Off by default: the same math is ``lr=0.01`` with ``schedule.name=inverse_sqrt``,
    which keeps the schedule visible and shared with AdamW."""
    warmup_init: bool = False
    """Adafactor with relative_step: start the step size at 1e-6 * t."""
    allow_flat_adafactor: bool = False
    """Accept Adafactor under ZeRO >= 1, where DeepSpeed hands it flat 1-D partitions: the second
    moment is then NOT factored (4 bytes/parameter) and parameter scaling uses the RMS of the
    whole partition. Not the reference optimizer; refused unless this is true."""

    def check(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if self.decay_rate >= 0:
            raise ConfigError(f"optim.decay_rate={self.decay_rate} must be negative (transformers' "
                              f"convention beta2_t = 1 - t**decay_rate; the reference's 'decay 0.8' is -0.8)")
        if self.clip_threshold <= 0:
            raise ConfigError(f"optim.clip_threshold={self.clip_threshold} must be > 0 (.inf: no update clipping)")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("optim.grad_clip and optim.weight_decay must be >= 0")
        if self.warmup_init and not self.relative_step:
            raise ConfigError("optim.warmup_init=true needs optim.relative_step=true")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule and training length. lr(step) = optim.lr * multiplier(step)."""

    name: Literal["cosine", "inverse_sqrt", "constant", "wsd"] = "cosine"
    """cosine: linear warmup then cosine decay to min_lr_ratio; inverse_sqrt: (after warmup)
    sqrt(rsqrt_steps / max(step, rsqrt_steps)), i.e. constant for rsqrt_steps then 1/sqrt(step)
    decay (the reference); constant: (after warmup) 1; wsd: warmup-stable-decay, (after warmup) 1,
    then a linear decay to min_lr_ratio over the last round(decay_fraction x max_steps) steps
    (OLMo-core's WSD; train/config/wsd.py)."""
    warmup_steps: int = 0
    """Linear warmup from ~0 to the peak over this many steps (all schedules)."""
    min_lr_ratio: float = 0.1
    """cosine, wsd: final lr as a fraction of the peak."""
    decay_fraction: float = 0.1
    """wsd only: the fraction of max_steps the final linear decay takes, D = round(decay_fraction x
    max_steps), in [0, 1); 0 = never decay (the stable run that decay branches resume from)."""
    rsqrt_steps: int = 10_000
    """inverse_sqrt: steps at the peak before the 1/sqrt decay starts (reference: 10^4)."""
    max_steps: Optional[int] = None
    """Training length in optimizer steps. Give this or train_tokens, not both."""
    train_tokens: Optional[int] = None
    """Training length as a token budget (tokens seen, inputs + targets; the reference matches
    168e9 across objectives); steps = ceil(train_tokens / tokens per step)."""

    def check(self) -> None:
        if self.max_steps is not None and self.train_tokens is not None:
            raise ConfigError(f"schedule.max_steps={self.max_steps} and schedule.train_tokens="
                              f"{self.train_tokens} are both set: give one (set the other to null)")
        for k in ("max_steps", "train_tokens"):
            v = getattr(self, k)
            if v is not None and v <= 0:
                raise ConfigError(f"schedule.{k}={v} must be > 0")
        if self.warmup_steps < 0 or self.rsqrt_steps < 1:
            raise ConfigError("schedule.warmup_steps must be >= 0 and schedule.rsqrt_steps >= 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 <= self.decay_fraction < 1.0:
            raise ConfigError(f"schedule.decay_fraction={self.decay_fraction} must be in [0, 1) "
                              f"(0 = never decay: the stable run of a WSD ladder)")


@dataclass
class ParallelConfig:
    """How the run is spread over processes; turned into the DeepSpeed JSON by train/engine/ds_config.py.

    ``zero_stage``, the offload flags and ``precision`` may also be stated by a named DeepSpeed
    preset: left at None/auto they follow the preset; an explicit value that contradicts a named
    preset is an error. Without a named preset one is chosen from these values.
    """

    zero_stage: Optional[Literal[0, 1, 2, 3]] = None
    """ZeRO stage 0-3; None = the named preset's stage, else 0."""
    offload_optimizer: Optional[bool] = None
    """Keep optimizer states (and the step) on the CPU (ZeRO >= 1); None = as the preset says, else off."""
    offload_param: Optional[bool] = None
    """Keep parameters on the CPU between uses (ZeRO-3 only); None = as the preset says, else off."""
    pipeline_stages: int = 1
    """Pipeline-parallel stages (DeepSpeed PipelineModule); combinable with ZeRO 0 or 1 only."""
    pipeline_partition: str = "parameters"
    """How layers are split over stages: parameters, uniform, or type:REGEX (DeepSpeed's partition_method)."""
    micro_batch_size: int = 8
    """Sequences per process per forward/backward."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all processes (reference: 2048). None = derived from
    gradient_accumulation_steps. Must equal micro x accumulation x data-parallel size."""
    gradient_accumulation_steps: Optional[int] = None
    """Micro-batches per optimizer step; None = derived from global_batch_size (1 if neither is given)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = the named preset's choice, else bf16 where supported (GPU) and fp32 on CPU."""
    ds_preset: Optional[str] = None
    """A preset in ds_configs/ (zero0, zero1, zero2, zero3, zero2_offload, zero3_offload,
    pipeline, bf16) or a path to a JSON file; None = chosen from the values above."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass, every block (every layer of a pipeline);
    what is kept is ``checkpoint_policy``."""
    checkpoint_policy: Literal["full", "selective"] = "full"
    """With activation_checkpointing: full = keep only each block's input and recompute the whole
    block (about +1/3 compute); selective = also keep the outputs of its matmuls and attention
    kernel and recompute only the pointwise work (norms, activations, RoPE, residual adds): keeps
    more memory than full, less than none, for a few percent of compute."""
    fit_check: bool = True
    """Refuse at start-up a run whose planned peak memory per device (archscale plan's) exceeds the
    device's (a GPU's total memory, or the host's available RAM on CPU), naming the fix;
    false = skip the check with a warning, for a user who knows the plan errs high."""

    def check(self) -> None:
        if self.pipeline_stages < 1 or self.micro_batch_size < 1:
            raise ConfigError("parallel.pipeline_stages and parallel.micro_batch_size must be >= 1")
        for k in ("global_batch_size", "gradient_accumulation_steps"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"parallel.{k}={v} must be >= 1 (or null to derive it)")


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written, and how a run resumes (train/trainer/checkpointing.py)."""

    dir: Optional[str] = None
    """Checkpoint directory; None = RUN_DIR/checkpoints."""
    every_n_steps: int = 1000
    """Save every this many optimizer steps (and always on SIGTERM/SIGUSR1 and at the end)."""
    keep_last: int = 3
    """Keep the newest this many complete checkpoints; 0 = keep all. The newest is never deleted."""
    keep_every_n_steps: int = 0
    """Never prune checkpoints whose step is a multiple of this (milestones for evaluation); 0 = none."""
    at_steps: list[int] = field(default_factory=list)
    """Also save at exactly these optimizer steps, and never prune them (a WSD stable run's branch
    points, where decay branches resume); [] = none."""
    resume: str = "auto"
    """auto = the newest complete checkpoint of this run, if any; never = start fresh;
    or a path to a checkpoint directory (or to another run's directory). A path into another run
    is where this run starts (a decay branch, train/trainer/branch.py): once this run has a
    checkpoint of its own, that one is resumed."""

    def check(self) -> None:
        if self.every_n_steps < 1 or self.keep_last < 0 or self.keep_every_n_steps < 0:
            raise ConfigError("checkpoint.every_n_steps must be >= 1, keep_last and keep_every_n_steps >= 0")
        if not self.resume:
            raise ConfigError("checkpoint.resume is empty: use auto, never or a checkpoint path")
        bad = [s for s in self.at_steps if s < 1]
        if bad:
            raise ConfigError(f"checkpoint.at_steps={self.at_steps} has steps < 1 ({bad}): give optimizer steps >= 1")


@dataclass
class WandbConfig:
    """Weights & Biases logging (train/trainer/wandb_log.py; docs/config.md, "Weights & Biases"): off unless
    ``enabled``; needs ``pip install 'archscale[wandb]'``. WANDB_MODE=offline, WANDB_API_KEY, WANDB_DIR and the
    other WANDB_* variables work as wandb documents them."""

    enabled: bool = False
    """Log the resolved config and every metrics.jsonl line to W&B (rank 0). The run's W&B id is kept in
    RUN_DIR/wandb.json, so a resumed or requeued run continues the same W&B run."""
    project: str = "archscale"
    """The W&B project."""
    entity: str = ""
    """The W&B team or user; "" = your default entity."""
    group: str = ""
    """The W&B group; "" = none. compare, ladder and sweep set it to their output directory's name unless
    you give one."""
    name: str = ""
    """The W&B run's display name; "" = the run directory's name. compare, ladder and sweep set it per run
    (the run directory below their output directory)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags, e.g. ``logging.wandb.tags=[ladder,h100]``."""


@dataclass
class LoggingConfig:
    """What the training loop records."""

    every_n_steps: int = 10
    """Log a metrics line every this many optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN_DIR/tb."""
    jsonl: bool = True
    """Append one JSON line per logging step to RUN_DIR/metrics.jsonl."""
    progress_bar: bool = True
    """Show a progress bar on rank 0: steps, loss, tokens/s and the time left (MFU is not on the bar; it
    is in metrics.jsonl and TensorBoard where the device's peak FLOP/s is known)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases (off by default): the ``logging.wandb.*`` keys."""

    def check(self) -> None:
        if self.every_n_steps < 1:
            raise ConfigError(f"logging.every_n_steps={self.every_n_steps} must be >= 1")


@dataclass
class EvalConfig:
    """Held-out loss and the common yardstick during training (docs/evaluation.md)."""

    every_n_steps: int = 500
    """Compute the held-out loss (and the yardstick) every this many steps (and at the end); 0 = only at the end."""
    num_batches: int = 10
    """Held-out *global* batches per evaluation (the eval split's first N batches of the run's global batch
    size, each shared among the data-parallel ranks and split into micro-batches), for the loss on the
    run's own objective."""
    yardstick: bool = True
    """Also score the common yardstick at every evaluation: continuation loss (nats per target token, bits
    per byte) and zero-shot continuation choice on windows of the held-out split, the same for every cell."""
    windows: int = 64
    """Yardstick windows: consecutive windows of `window_tokens` tokens cut from the held-out documents
    (taken round-robin over the documents, in file order), at most this many."""
    window_tokens: int = 128
    """Tokens per yardstick window (prefix + continuation). Documents shorter than this give no window."""
    prefix_fractions: list[float] = field(default_factory=lambda: [0.5])
    """Where each window is cut: the prefix is this fraction of its tokens (0 = no prefix; < 1), the
    continuation the rest. The zero-shot choice cuts at the first fraction."""
    choices: int = 4
    """Zero-shot continuation choice: the true continuation among this many (the others are the
    continuations of windows from other held-out documents); chance is 1 / choices. 0 = off."""
    task_files: list[str] = field(default_factory=list)
    """Prompted task files (answer_choices + label, docs/data.md) also scored zero-shot at every evaluation."""
    score_batch_size: int = 32
    """Rows per forward pass when scoring the yardstick."""

    def check(self) -> None:
        if self.every_n_steps < 0 or self.num_batches < 1:
            raise ConfigError("eval.every_n_steps must be >= 0 and eval.num_batches >= 1")
        for name, low in (("windows", 1), ("window_tokens", 2), ("score_batch_size", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"eval.{name}={getattr(self, name)} must be >= {low}")
        if self.choices == 1 or self.choices < 0:
            raise ConfigError(f"eval.choices={self.choices} must be 0 (off) or >= 2 (the true continuation and others)")
        if not self.prefix_fractions or not all(0 <= f < 1 for f in self.prefix_fractions):
            raise ConfigError(f"eval.prefix_fractions={self.prefix_fractions} must be one or more fractions in [0, 1), "
                              f"e.g. [0.5]")
        if len(set(self.prefix_fractions)) != len(self.prefix_fractions):
            raise ConfigError(f"eval.prefix_fractions={self.prefix_fractions} repeats a fraction; give each once")


@dataclass
class InitConfig:
    """Start from another run's weights (adaptation: LM-A, NC-A; multitask finetuning)."""

    from_checkpoint: Optional[str] = None
    """A complete checkpoint directory (or run directory: its newest checkpoint) to load weights
    from at step 0. Ignored when this run resumes from its own checkpoint."""
    load_optimizer: bool = False
    """Also load the optimizer state (same optimizer and parallel layout needed)."""

    def check(self) -> None:
        if self.load_optimizer and not self.from_checkpoint:
            raise ConfigError("init.load_optimizer=true needs init.from_checkpoint")


@dataclass
class RunConfig:
    """The whole run. Each component receives only its own section."""

    run_dir: str = "runs/debug"
    """The run directory (config.yaml, ds_config.json, metrics.jsonl, checkpoints/, ...)."""
    seed: int = 0
    """Seed for parameter initialisation and dropout (the data order has data.seed)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture and size."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Pretraining objective and its lengths."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus, tokenizer, data order."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule and training length."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """ZeRO, pipeline, batch sizes, precision, DeepSpeed preset."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out loss."""
    init: InitConfig = field(default_factory=InitConfig)
    """Initial weights from another run."""
