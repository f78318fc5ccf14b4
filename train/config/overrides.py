"""Command-line ``a.b=c`` overrides: parsing one, and putting a value at its dotted path in the
nested dict a config is built from (each key checked against the dataclass fields on the way down).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import yaml

from ..errors import ConfigError
from .coerce import _choices, _coerce, _hints, _is_dataclass_type, _is_mapping_type, _type_name, _unknown_key, _unwrap_optional


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
    if isinstance(value, (dict, list)):  # `optim={lr: 1, lr: 2}`: refused as in a file (train/yamlfile.py)
        from ..yamlfile import parse_yaml

        parse_yaml(raw, f"override {text!r}")
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
