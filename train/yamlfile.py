"""The one reader of YAML files a person writes: run configs (train.config) and sweep and chain
files (slurm). A leaf module (PyYAML and train.errors), so a login node's `archscale submit` reads
them without torch.

`load_yaml(path)` is `yaml.safe_load` with three things made one-line `ConfigError`s that name the
file, the line and the fix:
- a syntax error (`model: [cd` without its `]`);
- a tag that has no safe constructor (`!!python/object/apply:os.system [...]`): refused, never
  constructed, as safe_load does, but as one line instead of PyYAML's 20-line traceback;
- a key given twice in one mapping, at any depth (`optim: {lr: 0.001, lr: 0.5}`). YAML 1.2 says
  keys are unique; PyYAML keeps the last value without a word, which makes a hand-edited sweep
  train at a value nobody meant. "Twice" is as the resulting dict sees it: `1`, `1.0` and `true`
  are one key in Python, so they collide here too. Merge keys (`<<: *base`) are YAML's way to
  override on purpose and are left alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def load_yaml(path: str | Path, what: str = "file") -> Any:
    """The data of the YAML file `path` (None when empty); `what` names it in the messages
    ("config file", "sweep file")."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist: check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else (e.strerror or type(e).__name__)
        raise ConfigError(f"{what} {path} cannot be read ({why}): give a YAML text file") from None
    return parse_yaml(text, path)


def parse_yaml(text: str, path: str | Path = "<string>") -> Any:
    """`load_yaml` on text already read (`path` only names it in the messages)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicates(node, "", path, set())
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        tag = _tag_in(e.problem or "")
        if tag:
            raise ConfigError(f"{path}, line {line}: not valid YAML: the tag {tag} has no safe constructor (a config "
                              f"is plain data: mappings, lists, strings, numbers); remove the tag") from None
        raise ConfigError(f"{path}, line {line}: not valid YAML: {e.problem}; fix that value") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(", ".join(p for p in (e.context, e.problem) if p).split()) or "a syntax error"
        hint = " (quote a value that holds ': ')" if "mapping values are not allowed" in problem else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}; fix the syntax there{hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}; fix the syntax") from None
    finally:
        loader.dispose()


def _tag_in(problem: str) -> str:
    """'could not determine a constructor for the tag 'tag:yaml.org,2002:python/x'' -> '!!python/x'."""
    marker = "for the tag '"
    if marker not in problem:
        return ""
    tag = problem.split(marker, 1)[1].rstrip("'")
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


def _key(node) -> Any:
    """A mapping key as the resulting dict would hash it (so `1` and `1.0` are one key)."""
    if isinstance(node, yaml.ScalarNode):
        try:
            value = yaml.constructor.SafeConstructor().construct_object(node)
            hash(value)
            return value
        except (yaml.YAMLError, TypeError):
            pass
    return (node.tag, repr(node.value))  # a tagged or complex key: its text


def _refuse_duplicates(node, where: str, path, seen_nodes: set) -> None:
    """Walk the composed document (aliases once); a key given twice in a mapping is a ConfigError."""
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: overriding on purpose
                _refuse_duplicates(value_node, where, path, seen_nodes)
                continue
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "<complex key>"
            dotted = f"{where}.{name}" if where else str(name)
            key = _key(key_node)
            if key in first:
                a, b = first[key].start_mark, key_node.start_mark
                lines = (f"line {a.line + 1} (columns {a.column + 1} and {b.column + 1})" if a.line == b.line
                         else f"lines {a.line + 1} and {b.line + 1}")
                raise ConfigError(f"{path}: key {dotted!r} is given twice, {lines}; keep one (YAML would "
                                  f"silently take the last)")
            first[key] = key_node
            _refuse_duplicates(value_node, dotted, path, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, f"{where}[{i}]", path, seen_nodes)
