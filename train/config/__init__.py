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

The package re-exports every name below; its modules, by concern:
``sections`` (the typed dataclasses, one docstring per field), ``coerce`` (the generic machinery:
field types, ``_coerce``, ``from_dict``, ``validate``, ``to_dict``), ``overrides`` (``a.b=c``
parsing and placing a value at its dotted path), ``load`` (load, save, print, origins) and
``derived`` (``Derived`` and ``derive``) and ``wsd`` (where a warmup-stable-decay run's decay
starts: ``wsd_branch_point``, ``branch_length``).
"""
from __future__ import annotations

from train.data.config import DataConfig  # noqa: F401
from train.objectives.config import ObjectiveConfig  # noqa: F401

from ..errors import ConfigError  # noqa: F401  (a leaf module: ds_presets and registry raise it too)
from .coerce import (_HINTS, _choices, _coerce, _hints, _is_dataclass_type,  # noqa: F401
                     _is_mapping_type, _prefixed, _run_check, _type_name, _unknown_key, _unwrap_optional,
                     from_dict, to_dict, validate)
from .derived import Derived, derive  # noqa: F401
from .load import (CLI, DEFAULT, FILE, _all_origins, _flatten, _with_origin, config_to_yaml,  # noqa: F401
                   format_config, load_config, load_config_with_origins, save_config, split_config_args)
from .overrides import _default_of, _set_path, parse_override  # noqa: F401
from .wsd import branch_length, decay_steps, wsd_branch_point  # noqa: F401
from .sections import (CheckpointConfig, EvalConfig, InitConfig, LoggingConfig, ModelConfig,  # noqa: F401
                       OptimConfig, ParallelConfig, RunConfig, ScheduleConfig)
