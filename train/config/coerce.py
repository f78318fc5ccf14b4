"""Generic machinery over dataclass trees: field types, checking and converting values
(``_coerce``), building a tree from a mapping (``from_dict``), checking one built in code
(``validate``) and turning it back into plain YAML/JSON types (``to_dict``).

It knows no section: it reads field types with ``typing.get_type_hints``.

Non-finite numbers: inf and nan (YAML ``.inf`` / ``.nan``, or the strings ``inf`` / ``nan`` that
``float()`` accepts, as ``optim.lr=inf`` on the command line gives) are refused in one line in every
float field, and as a float value inside an untyped mapping (``model.overrides.norm_eps: .inf``).
A learning rate, a ratio, an epsilon or a coefficient that is inf or nan only shows up later as a
non-finite loss. A section lists the fields where +inf means something in the ClassVar
``INFINITY_OK`` (``optim.clip_threshold``: Adafactor then never clips the update); nan is refused
everywhere. Integer fields already refuse both (inf is not an integer).
"""
from __future__ import annotations

import contextvars
import dataclasses
import enum
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from ..errors import ConfigError


_HINTS: dict[type, dict[str, Any]] = {}
_INFINITY_OK = contextvars.ContextVar("infinity_ok", default=False)  # the field being coerced lists +inf


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
        if isinstance(v, float) and not math.isfinite(v):
            raise _non_finite(v, where)
        return v
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(tp, args, v, where)
    if origin is Literal:
        return _coerce_literal(args, v, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _coerce_enum(tp, v, where)
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
        return _coerce_int(v, where)
    if tp is float:
        return _coerce_float(v, where)
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
        return _coerce_tuple(args, v, where)
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


def _coerce_union(tp: Any, args: tuple, v: Any, where: str) -> Any:
    """The first member of ``Union[...]`` that accepts ``v`` (None if the union has NoneType); with
    one non-None member its own error, else one naming the union."""
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


def _coerce_literal(args: tuple, v: Any, where: str) -> Any:
    for c in args:  # compare with the type too: True == 1 but is not a ZeRO stage
        if type(c) is type(v) and c == v:
            return c
        if isinstance(c, float) and type(v) is int and c == v:
            return c
    raise ConfigError(f"{where}: {v!r} is not one of: {_choices(args)}")


def _coerce_enum(tp: type[enum.Enum], v: Any, where: str) -> Any:
    if isinstance(v, tp):
        return v
    for m in tp:
        if v == m.value or v == m.name:
            return m
    raise ConfigError(f"{where}: {v!r} is not one of: {_choices(m.value for m in tp)}")


def _coerce_int(v: Any, where: str) -> int:
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


def _coerce_float(v: Any, where: str) -> float:
    f = None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        f = float(v)
    elif isinstance(v, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            f = float(v.replace("_", ""))
        except ValueError:
            pass
    if f is None:
        raise ConfigError(f"{where}: expected a number, got {v!r}")
    if not math.isfinite(f) and not (f == math.inf and _INFINITY_OK.get()):
        raise _non_finite(f, where)
    return f


def _non_finite(f: float, where: str) -> ConfigError:
    """inf / nan in a field where it means nothing (see the module docstring)."""
    return ConfigError(f"{where}: {f} is not a finite number; give a finite one (a limit is turned off "
                       f"by its own off value, e.g. optim.grad_clip=0)")


def _coerce_field(cls: type, name: str, tp: Any, v: Any, where: str) -> Any:
    """``_coerce`` for the field ``name`` of ``cls``, with +inf allowed where cls.INFINITY_OK lists it."""
    token = _INFINITY_OK.set(name in getattr(cls, "INFINITY_OK", ()))
    try:
        return _coerce(tp, v, where)
    finally:
        _INFINITY_OK.reset(token)


def _coerce_tuple(args: tuple, v: Any, where: str) -> tuple:
    """``tuple[X, Y]`` (exactly that many values) or ``tuple[X, ...]``; a YAML list is accepted."""
    if not isinstance(v, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {v!r}")
    if args and args[-1] is not Ellipsis:
        if len(v) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(v)}: {v!r}")
        return tuple(_coerce(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
    item = args[0] if args else Any
    return tuple(_coerce(item, x, f"{where}[{i}]") for i, x in enumerate(v))


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
        kwargs[key] = _coerce_field(cls, key, hints[key], value, f"{where}.{key}" if where else key)
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
        coerced = _coerce_field(type(cfg), name, tp, value, path)
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
