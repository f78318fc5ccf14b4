"""Loading (defaults < YAML file < ``a.b=c``, with the origin of every leaf), saving and printing
a run config.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from ..errors import ConfigError
from ..yamlfile import load_yaml
from .coerce import _hints, from_dict, to_dict
from .overrides import _set_path, parse_override
from .sections import RunConfig


# Origins of values, for the --dry-run printout.
DEFAULT, FILE, CLI = "default", "file", "command line"


def load_config_with_origins(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                             *, cls: type = RunConfig) -> tuple[Any, dict[str, str]]:
    """Resolve defaults < YAML file < ``a.b=c`` overrides into a checked ``cls`` instance.

    Returns the config and ``origins``: dotted leaf key -> "default" | "file" | "command line"
    (every leaf; keys inside dict-typed fields such as ``model.overrides`` are listed one by one).
    """
    tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        data = load_yaml(path, "config file")  # the one YAML reader: safe tags only, no key given twice
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


def split_config_args(args: list[str]) -> tuple[Optional[str], list[str]]:
    """A command line's `[CONFIG.yaml] a.b=c ...` -> (the config path or None, the overrides):
    the first argument is the file when it is not an override."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def config_to_yaml(cfg: Any) -> str:
    """The resolved config as YAML; ``load_config`` of this text gives an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    from ..atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, config_to_yaml(cfg))


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
