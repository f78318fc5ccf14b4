"""The run config: typed, nested dataclasses, one per section, and the one place derived numbers live.

Precedence: dataclass defaults < a YAML file < command-line ``a.b=c`` overrides.

    cfg, origins = load_config_with_origins("run.yaml", ["optim.lr=1e-3", "parallel.zero_stage=1"])
    d = derive(cfg, world_size=8, num_layers=24)      # data-parallel size, accumulation, steps, ...
    print(format_config(cfg, origins))                # what --dry-run prints: value and its origin

The machinery (``from_dict``, ``apply_override``, ``validate``, ``to_dict``) is generic over any
tree of dataclasses: it reads field types with ``typing.get_type_hints`` and knows ``bool``, ``int``,
``float``, ``str``, ``Literal[...]`` (enum-like choices), ``Enum``, ``Optional``/``Union``,
``list[X]``, ``tuple[X, Y]``, ``dict[K, V]``, ``Any`` and nested dataclasses. A section owned by
another package (``train/objectives``, ``train/data``) is swapped in by changing the annotation of
its field in ``RunConfig``; nothing else here knows the fields of a section.

This module is light on purpose (PyYAML and the standard library; no torch, no deepspeed), so
``archscale submit`` can load and check a config on a login node in well under a second.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

from train.data.config import DataConfig
from train.objectives.config import ObjectiveConfig

from .errors import ConfigError  # noqa: F401  (a leaf module: ds_presets and registry raise it too)


# Origins of values, for the --dry-run printout.
DEFAULT, FILE, CLI = "default", "file", "command line"


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """Which architecture and size; handed to the model registry's ``build``."""

    arch: Literal["cd", "nd", "ed"] = "cd"
    """cd = causal decoder, nd = prefix (non-causal) decoder, ed = encoder-decoder (SCIENCE.md)."""
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
    """The optimizer, given to DeepSpeed as a client torch optimizer (see train/ds_config.py)."""

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
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("optim.grad_clip and optim.weight_decay must be >= 0")
        if self.warmup_init and not self.relative_step:
            raise ConfigError("optim.warmup_init=true needs optim.relative_step=true")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule and training length. lr(step) = optim.lr * multiplier(step)."""

    name: Literal["cosine", "inverse_sqrt", "constant"] = "cosine"
    """cosine: linear warmup then cosine decay to min_lr_ratio; inverse_sqrt: (after warmup)
    sqrt(rsqrt_steps / max(step, rsqrt_steps)), i.e. constant for rsqrt_steps then 1/sqrt(step)
    decay (the reference); constant: (after warmup) 1."""
    warmup_steps: int = 0
    """Linear warmup from ~0 to the peak over this many steps (all schedules)."""
    min_lr_ratio: float = 0.1
    """cosine: final lr as a fraction of the peak."""
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


@dataclass
class ParallelConfig:
    """How the run is spread over processes; turned into the DeepSpeed JSON by train/ds_config.py.

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

    def check(self) -> None:
        if self.pipeline_stages < 1 or self.micro_batch_size < 1:
            raise ConfigError("parallel.pipeline_stages and parallel.micro_batch_size must be >= 1")
        for k in ("global_batch_size", "gradient_accumulation_steps"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"parallel.{k}={v} must be >= 1 (or null to derive it)")


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written, and how a run resumes (train/checkpointing.py)."""

    dir: Optional[str] = None
    """Checkpoint directory; None = RUN_DIR/checkpoints."""
    every_n_steps: int = 1000
    """Save every this many optimizer steps (and always on SIGTERM/SIGUSR1 and at the end)."""
    keep_last: int = 3
    """Keep the newest this many complete checkpoints; 0 = keep all. The newest is never deleted."""
    keep_every_n_steps: int = 0
    """Never prune checkpoints whose step is a multiple of this (milestones for evaluation); 0 = none."""
    resume: str = "auto"
    """auto = the newest complete checkpoint of this run, if any; never = start fresh;
    or a path to a checkpoint directory (or to another run's directory)."""

    def check(self) -> None:
        if self.every_n_steps < 1 or self.keep_last < 0 or self.keep_every_n_steps < 0:
            raise ConfigError("checkpoint.every_n_steps must be >= 1, keep_last and keep_every_n_steps >= 0")
        if not self.resume:
            raise ConfigError("checkpoint.resume is empty: use auto, never or a checkpoint path")


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
    """Show a progress bar (loss, tokens/s, MFU, ETA) on rank 0."""

    def check(self) -> None:
        if self.every_n_steps < 1:
            raise ConfigError(f"logging.every_n_steps={self.every_n_steps} must be >= 1")


@dataclass
class EvalConfig:
    """Held-out loss during training."""

    every_n_steps: int = 500
    """Compute the held-out loss every this many steps (and at the end); 0 = only at the end."""
    num_batches: int = 10
    """Held-out micro-batches per evaluation (per data-parallel rank)."""

    def check(self) -> None:
        if self.every_n_steps < 0 or self.num_batches < 1:
            raise ConfigError("eval.every_n_steps must be >= 0 and eval.num_batches >= 1")


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


# ----------------------------------------------------------------------------------------------
# Generic machinery over dataclass trees
# ----------------------------------------------------------------------------------------------

_MISSING = object()
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types of a dataclass (string annotations included), cached."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
    return _HINTS[cls]


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> Any:
    """Optional[X] -> X (the type to descend into for nested keys)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_mapping_type(tp: Any) -> bool:
    tp = _unwrap_optional(tp)
    return tp is dict or typing.get_origin(tp) in (dict, Mapping, typing.Mapping) or tp is Any


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _choices(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values)


def _coerce(tp: Any, v: Any, where: str) -> Any:
    """Check ``v`` against type ``tp`` and convert the lossless cases (int -> float, '1e-3' -> float,
    list -> tuple). Raise ConfigError with a one-line message otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return v
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: {v!r} is not a {_type_name(tp)}")
    if origin is Literal:
        for c in args:  # compare with the type too: True == 1 but is not a ZeRO stage
            if type(c) is type(v) and c == v:
                return c
            if isinstance(c, float) and type(v) is int and c == v:
                return c
        raise ConfigError(f"{where}: {v!r} is not one of: {_choices(args)}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(v, tp):
            return v
        for m in tp:
            if v == m.value or v == m.name:
                return m
        raise ConfigError(f"{where}: {v!r} is not one of: {_choices(m.value for m in tp)}")
    if _is_dataclass_type(tp):
        if isinstance(v, tp):
            return validate(v, where)
        if isinstance(v, Mapping):
            return from_dict(tp, v, where=where)
        raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {v!r}")
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise ConfigError(f"{where}: expected true or false, got {v!r}")
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str):  # PyYAML reads 168e9 as a string (YAML 1.1)
            try:
                f = float(v.replace("_", ""))
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {v!r}")
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(v.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {v!r}")
    if tp is str:
        if isinstance(v, str):
            return v
        raise ConfigError(f"{where}: expected a string, got {v!r} (quote it in YAML)")
    if origin in (list, Sequence, typing.Sequence) or tp is list:
        if isinstance(v, (list, tuple)):
            item = args[0] if args else Any
            return [_coerce(item, x, f"{where}[{i}]") for i, x in enumerate(v)]
        raise ConfigError(f"{where}: expected a list, got {v!r}")
    if origin is tuple or tp is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {v!r}")
        if args and args[-1] is not Ellipsis:
            if len(v) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(v)}: {v!r}")
            return tuple(_coerce(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
        item = args[0] if args else Any
        return tuple(_coerce(item, x, f"{where}[{i}]") for i, x in enumerate(v))
    if _is_mapping_type(tp):
        if not isinstance(v, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {v!r}")
        kt, vt = (args if len(args) == 2 else (Any, Any))
        return {_coerce(kt, k, where): _coerce(vt, x, f"{where}.{k}") for k, x in v.items()}
    if isinstance(tp, type):
        if isinstance(v, tp):
            return v
        raise ConfigError(f"{where}: expected {tp.__name__}, got {v!r}")
    return v


def _unknown_key(cls: type, key: str, where: str, source: str = "") -> ConfigError:
    section = where or "the top level"
    src = f" ({source})" if source else ""
    dotted = f"{where}.{key}" if where else key
    return ConfigError(f"unknown key '{dotted}'{src}; valid keys of {section}: "
                       f"{_choices(_hints(cls))}")


def from_dict(cls: type, data: Mapping[str, Any], *, where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; missing keys keep their defaults.

    Unknown keys, wrong types and values outside a Literal's choices raise ConfigError.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(cls, str(key), where)
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a section's own __post_init__ checks
        raise ConfigError(_prefixed(where or cls.__name__, e)) from e
    return _run_check(obj, where)


def _prefixed(where: str, e: Exception) -> str:
    """``where: message`` on one line, unless the message already starts by naming ``where``."""
    msg = " ".join(str(e).split())
    return msg if where and msg.startswith(where) else f"{where}: {msg}"


def _run_check(obj: Any, where: str) -> Any:
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(_prefixed(where or type(obj).__name__, e)) from e
    return obj


def validate(cfg: Any, where: str = "") -> Any:
    """Check every field of an already-built dataclass tree (types, choices, ``check()`` methods).

    For configs built in code (``RunConfig(optim=OptimConfig(name="sgd"))``) rather than loaded.
    """
    for name, tp in _hints(type(cfg)).items():
        path = f"{where}.{name}" if where else name
        value = getattr(cfg, name)
        coerced = _coerce(tp, value, path)
        if coerced is not value and not _is_dataclass_type(_unwrap_optional(tp)):
            setattr(cfg, name, coerced)
    return _run_check(cfg, where)


def to_dict(cfg: Any) -> Any:
    """A dataclass tree as plain YAML/JSON types (tuples -> lists, enums -> values)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any, str]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], value parsed as a YAML scalar, the raw text)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override {text!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # e.g. "a: b" unquoted: keep the text; the field's type decides
    return key.split("."), value, raw


def _set_path(cls: type, tree: dict, parts: list[str], value: Any, raw: Optional[str],
              origins: dict[str, str], source: str, where: str = "") -> None:
    """Put ``value`` at ``parts`` inside the nested dict ``tree`` (shaped like ``cls``), checking
    each key against the dataclass fields on the way down and recording the origin of the leaf."""
    key, rest = parts[0], parts[1:]
    hints = _hints(cls)
    if key not in hints:
        raise _unknown_key(cls, key, where, source)
    path = f"{where}.{key}" if where else key
    tp = _unwrap_optional(hints[key])
    if _is_dataclass_type(tp):
        if rest:
            sub = tree.setdefault(key, {})
            if not isinstance(sub, dict):  # the section was set to a non-mapping earlier
                raise ConfigError(f"{path}: expected a mapping of {tp.__name__} keys, got {sub!r}")
            _set_path(tp, sub, rest, value, raw, origins, source, path)
            return
        if isinstance(value, Mapping):  # a whole section at once: merge key by key
            for k, v in value.items():
                _set_path(cls, tree, [key, str(k)], v, None, origins, source, where)
            return
        raise ConfigError(f"{path} is a section; set its keys ({_choices(_hints(tp))}), e.g. {path}.KEY=VALUE")
    if rest:
        if not _is_mapping_type(hints[key]):
            raise ConfigError(f"{path} is a {_type_name(hints[key])}, it has no key '{'.'.join(rest)}'")
        sub = tree.get(key)
        if not isinstance(sub, dict):
            sub = dict(_default_of(cls, key) or {}) if sub is None else sub
            tree[key] = sub
        for k in rest[:-1]:
            sub = sub.setdefault(k, {})
        sub[rest[-1]] = value
        origins[f"{path}.{'.'.join(rest)}"] = source
        return
    if raw is not None and not isinstance(value, str):
        # CLI text that YAML read as something else (`resume=no` -> False): if the field takes a
        # string and not the parsed type, keep the text as typed.
        try:
            _coerce(hints[key], value, path)
        except ConfigError:
            try:
                _coerce(hints[key], raw.strip(), path)
                value = raw.strip()
            except ConfigError:
                pass
    tree[key] = value
    origins[path] = source
    if _is_mapping_type(hints[key]) and isinstance(value, Mapping):
        for k in value:
            origins[f"{path}.{k}"] = source


def _default_of(cls: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def load_config_with_origins(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                             *, cls: type = RunConfig) -> tuple[Any, dict[str, str]]:
    """Resolve defaults < YAML file < ``a.b=c`` overrides into a checked ``cls`` instance.

    Returns the config and ``origins``: dotted leaf key -> "default" | "file" | "command line"
    (every leaf; keys inside dict-typed fields such as ``model.overrides`` are listed one by one).
    """
    tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
        for k, v in data.items():
            _set_path(cls, tree, [str(k)], v, None, origins, f"{FILE} {path}")
    for text in overrides:
        parts, value, raw = parse_override(text)
        _set_path(cls, tree, parts, value, raw, origins, CLI)
    try:
        cfg = from_dict(cls, tree)
    except ConfigError as e:
        raise ConfigError(_with_origin(str(e), origins)) from None
    return cfg, _all_origins(cfg, origins)


def _with_origin(msg: str, origins: dict[str, str]) -> str:
    """Append where the offending value came from ("optim.lr: ... (from command line)")."""
    m = re.match(r"[A-Za-z_][\w.]*", msg)  # the dotted key the message starts with, if any
    src = origins.get(m.group(0)) if m else None
    return f"{msg} (from {src})" if src else msg


def _all_origins(cfg: Any, given: dict[str, str], where: str = "") -> dict[str, str]:
    def label(src: str) -> str:  # "file run.yaml" -> "file"
        return FILE if src.startswith(FILE) else src

    out: dict[str, str] = {}
    for name in _hints(type(cfg)):
        path = f"{where}.{name}" if where else name
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(_all_origins(value, given, path))
        elif isinstance(value, Mapping) and value:
            for key in _flatten(value, path):  # the longest recorded prefix of each nested key
                parts = key.split(".")
                src = next((given[p] for p in (".".join(parts[:n]) for n in range(len(parts), 0, -1))
                            if p in given), DEFAULT)
                out[key] = label(src)
        else:
            out[path] = label(given.get(path, DEFAULT))
    return out


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                *, cls: type = RunConfig) -> Any:
    """Like ``load_config_with_origins`` without the origins."""
    return load_config_with_origins(path, overrides, cls=cls)[0]


def config_to_yaml(cfg: Any) -> str:
    """The resolved config as YAML; ``load_config`` of this text gives an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_to_yaml(cfg))
    tmp.replace(path)


def format_config(cfg: Any, origins: Optional[dict[str, str]] = None) -> str:
    """One line per leaf, ``key = value  # origin``: the ``--dry-run`` printout."""
    flat = _flatten(to_dict(cfg))
    width = max(len(k) for k in flat)
    lines = []
    for k, v in flat.items():
        src = (origins or {}).get(k, "")
        lines.append(f"{k:<{width}} = {yaml.safe_dump(v, default_flow_style=True, width=float('inf')).strip().removesuffix('...').strip()}"
                     + (f"   # {src}" if src else ""))
    return "\n".join(lines)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------------------------
# Derived numbers: the one place
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Derived:
    """Numbers that follow from the config and the world; computed once by ``derive``."""

    world_size: int
    pipeline_stages: int
    data_parallel_size: int          # world_size / pipeline_stages
    micro_batch_size: int            # sequences per process per forward/backward
    gradient_accumulation_steps: int
    global_batch_size: int           # micro x accumulation x data-parallel
    tokens_per_sequence: int
    tokens_per_step: int             # global batch x tokens per sequence
    max_steps: int
    train_tokens: int                # tokens actually seen: max_steps x tokens_per_step (>= the budget)
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    precision: str                   # "bf16" | "fp32"
    ds_preset: str                   # the preset name or path used for the DeepSpeed JSON
    ds_preset_named: bool            # True: named by the config; False: chosen from it


def derive(cfg: RunConfig, world_size: int, *, num_layers: Optional[int] = None,
           tokens_per_sequence: Optional[int] = None, bf16_supported: bool = False) -> Derived:
    """Compute and check every derived number before any work starts.

    world_size: processes in the job. num_layers: blocks the pipeline splits (for ED: encoder +
    decoder), from the model's size; None skips that check. tokens_per_sequence: tokens per
    example for the token budget; None = the registry's ``tokens_per_row(cfg.objective)``.
    bf16_supported: whether ``precision=auto`` may choose bf16 (a GPU that has it).
    Raises ConfigError naming the numbers and the fix.
    """
    from train import ds_presets, registry  # light: json and dataclasses only at import

    try:  # the architecture and the objective fit each other (the registry says which do)
        registry.get(cfg.model.arch).check_objective(cfg.objective.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    p = cfg.parallel
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    stages = p.pipeline_stages
    # Problems of the config itself first: launching on another number of processes (the world
    # size check below) would not fix these.
    if num_layers is not None and stages > num_layers:
        raise ConfigError(f"parallel.pipeline_stages={stages} is more than the model's {num_layers} layers: "
                          f"use at most {num_layers} stages")
    par = ds_presets.resolve_parallel(p, bf16_supported=bf16_supported)
    if par.zero_stage >= 2 and stages > 1:
        raise ConfigError(f"ZeRO stage {par.zero_stage} with parallel.pipeline_stages={stages}: DeepSpeed's "
                          f"pipeline engine refuses ZeRO-2 and ZeRO-3; use parallel.zero_stage=1 (or 0)")
    if cfg.model.compile and par.zero_stage == 3:
        raise ConfigError("model.compile=true with ZeRO-3: DeepSpeed gathers ZeRO-3 parameters in module hooks "
                          "that a compiled block would trace through; use parallel.zero_stage=1 or 2, or "
                          "model.compile=false")
    if world_size % stages:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.pipeline_stages={stages}: "
                          f"use a number of processes that is a multiple of {stages}")
    dp = world_size // stages

    micro, acc, glob = p.micro_batch_size, p.gradient_accumulation_steps, p.global_batch_size
    per_acc = micro * dp  # sequences per accumulation step over all data-parallel ranks
    if glob is None:
        acc = acc or 1
        glob = per_acc * acc
    elif acc is None:
        if glob % per_acc:
            raise ConfigError(
                f"parallel.global_batch_size={glob} is not divisible by micro_batch_size x data-parallel size "
                f"= {micro} x {dp} = {per_acc}: set global_batch_size to a multiple of {per_acc} "
                f"(e.g. {max(per_acc, glob // per_acc * per_acc)}) or change micro_batch_size")
        acc = glob // per_acc
    elif glob != per_acc * acc:
        raise ConfigError(
            f"parallel.global_batch_size={glob} != micro_batch_size x gradient_accumulation_steps x "
            f"data-parallel size = {micro} x {acc} x {dp} = {per_acc * acc}: give only one of "
            f"global_batch_size and gradient_accumulation_steps (set the other to null)")

    if tokens_per_sequence is None:
        tokens_per_sequence = int(registry.get(cfg.model.arch).tokens_per_row(cfg.objective))
    tokens_per_step = glob * tokens_per_sequence
    s = cfg.schedule
    if s.max_steps is not None:
        steps = s.max_steps
    elif s.train_tokens is not None:
        steps = math.ceil(s.train_tokens / tokens_per_step)
    else:
        raise ConfigError("no training length: set schedule.max_steps or schedule.train_tokens")

    if par.offload_param and par.zero_stage != 3:
        raise ConfigError(f"parallel.offload_param needs ZeRO stage 3 (got {par.zero_stage}): set parallel.zero_stage=3")
    if par.offload_optimizer and par.zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer needs ZeRO stage >= 1: set parallel.zero_stage=1, 2 or 3")
    o = cfg.optim
    flat_wrapper = None
    if par.zero_stage >= 1:
        flat_wrapper = f"ZeRO stage {par.zero_stage}"
    elif stages > 1 and par.precision == "bf16":
        flat_wrapper = "bf16 with pipeline stages (DeepSpeed's BF16_Optimizer, used by the pipeline engine)"
    if o.name == "adafactor" and flat_wrapper and not o.allow_flat_adafactor:
        raise ConfigError(
            f"optim.name=adafactor with {flat_wrapper}: DeepSpeed hands the optimizer flat 1-D "
            f"partitions, so Adafactor's second moment is not factored (a full exp_avg_sq, 4 bytes/parameter) "
            f"and its parameter scaling uses the RMS of a whole partition, not of each matrix - not the "
            f"reference optimizer. Use parallel.zero_stage=0 without pipeline stages (or in fp32), or accept it "
            f"with optim.allow_flat_adafactor=true")
    if o.name == "adafactor" and o.relative_step and s.name != "constant":
        raise ConfigError(f"optim.relative_step=true makes Adafactor ignore lr and schedule.name={s.name}: "
                          f"set schedule.name=constant, or relative_step=false with lr=0.01 and "
                          f"schedule.name=inverse_sqrt (the same math)")
    return Derived(world_size=world_size, pipeline_stages=stages, data_parallel_size=dp,
                   micro_batch_size=micro, gradient_accumulation_steps=acc, global_batch_size=glob,
                   tokens_per_sequence=tokens_per_sequence, tokens_per_step=tokens_per_step,
                   max_steps=steps, train_tokens=steps * tokens_per_step,
                   zero_stage=par.zero_stage, offload_optimizer=par.offload_optimizer,
                   offload_param=par.offload_param, precision=par.precision,
                   ds_preset=par.preset, ds_preset_named=par.preset_named)
