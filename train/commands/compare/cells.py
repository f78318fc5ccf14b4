"""The cells of a comparison: `ARCH:OBJECTIVE[:key=value,...]` on the command line, or a YAML grid.

    cd:flm                                       the cell with compare's settings
    ed:mlm:model.overrides.n_layers=1            with its own overrides (any a.b=c of the run config)
    nd:plm:model.size=tiny,optim.lr=1e-3         several, comma-separated (a value's [..] may hold commas)

A grid file (`--grid cells.yaml`):

    cells:
      - cd:flm
      - cell: ed:mlm
        label: ed-mlm-half              # the run directory's name and the table's label (default: from the cell)
        set: {model.overrides.n_layers: 1}
    set: [optim.lr=3e-3]                # overrides for every cell (after compare's, before each cell's)
    match: params                       # as --match
    match_to: cd:flm                    # as --match-to

A grid cell's own `match:` (params | flops | none) replaces the comparison's for that cell, so one
grid holds an encoder-decoder matched on FLOPs per token beside one matched on parameters:

      - {cell: ed:plm, label: ed-flops, match: flops}
      - {cell: ed:plm, label: ed-params, match: params}

Each cell's overrides come after compare's own settings and `--set`, so a cell can change its
size, depth, lengths or any option. In a cell's own values, `{out}` is compare's --out and
`{seed}` the seed index of the run, so a cell can start from another cell's run of the same
seed (cells train in the order given):

      - cell: nd:mlm
        label: nd-mlm-nca               # NC-A: each seed continues seed i of the cd-flm cell
        set: {init.from_checkpoint: '{out}/cd-flm/seed-{seed}'}
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ... import registry
from ...objectives.config import OBJECTIVES

CELL_MATCHES = ("params", "flops", "none")  # a grid cell's own `match:` (compare --match's kinds, or none)
CELL_OBJECTIVES = tuple(o for o in OBJECTIVES if o != "prompted")  # pretraining: prompted needs multitask data


class CellError(ValueError):
    """A cell or grid that cannot be read (one line, with the fix)."""


@dataclass(frozen=True)
class Cell:
    """One cell: an architecture, an objective, its own overrides, and its label (immutable)."""

    arch: str
    objective: str
    overrides: tuple[str, ...] = ()
    label: str = ""
    match: Optional[str] = None  # the grid cell's own match: params | flops | none (None: the comparison's)

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(self.overrides))  # a list given is kept as a tuple
        if not self.label:
            parts = (o.partition("=") for o in self.overrides)  # key=value -> last part of the key, the value
            extra = "-".join(re.sub(r"[^A-Za-z0-9._]+", "", k.split(".")[-1] + v) for k, _, v in parts)
            object.__setattr__(self, "label", f"{self.arch}-{self.objective}" + (f"-{extra}" if extra else ""))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.label):
            raise CellError(f"cell label {self.label!r} must be letters, digits, '.', '_' or '-' (it names the run "
                            f"directory); give the cell a `label:` in the grid")

    @property
    def name(self) -> str:
        """ARCH:OBJECTIVE in capitals, with the label when the cell has its own settings."""
        base = f"{self.arch.upper()}:{self.objective.upper()}"
        return base if self.label == f"{self.arch}-{self.objective}" else f"{base} ({self.label})"

    @property
    def spec(self) -> str:
        return f"{self.arch}:{self.objective}" + (f":{','.join(self.overrides)}" if self.overrides else "")

    def check(self) -> None:
        """The registry's fit check: the same line as train, --dry-run and plan print."""
        if self.arch not in registry.ARCHITECTURES or self.objective not in CELL_OBJECTIVES:
            raise CellError(f"cell {self.spec!r} is not ARCH:OBJECTIVE with ARCH in {', '.join(registry.ARCHITECTURES)} "
                            f"and OBJECTIVE in {', '.join(CELL_OBJECTIVES)}")
        try:
            registry.get(self.arch).check_objective(self.objective)
        except ValueError as e:
            raise CellError(f"cell {self.spec!r}: {e}") from None


def split_overrides(text: str) -> list[str]:
    """'a=1,b=[2,3]' -> ['a=1', 'b=[2,3]']: commas inside brackets or quotes stay."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return [o.strip() for o in out if o.strip()]


def parse_cell(text: str) -> Cell:
    """`ARCH:OBJECTIVE[:key=value,...]` -> Cell (checked)."""
    arch, sep, rest = text.strip().partition(":")
    objective, _, extra = rest.partition(":")
    if not sep or not objective:
        raise CellError(f"cell {text!r} is not ARCH:OBJECTIVE[:key=value,...] (e.g. cd:flm or "
                        f"ed:mlm:model.overrides.n_layers=1)")
    overrides = split_overrides(extra)
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise CellError(f"cell {text!r}: {o!r} is not key=value (a run-config override such as model.size=tiny)")
    cell = Cell(arch.lower(), objective.lower(), overrides)
    cell.check()
    return cell


def _yaml_overrides(value, where: str) -> list[str]:
    """A grid's `set`: a mapping {a.b: value} or a list of 'a.b=c' strings."""
    import json

    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise CellError(f"{where}: `set` must be a mapping {{a.b: value}} or a list of 'a.b=c' strings, got {value!r}")


def load_grid(path: str | Path) -> dict:
    """A grid file -> {"cells": [Cell], "set": [...], "match": str|None, "match_to": str|None}."""
    from ...yamlfile import load_yaml

    path = Path(path)
    try:  # the one YAML reader: safe tags only, no key given twice, the line of a syntax error
        data = load_yaml(path, "grid file")
    except ValueError as e:  # ConfigError
        raise CellError(str(e)) from None
    return grid_from_data(data, path)


def grid_from_data(data, path: str | Path) -> dict:
    """A grid's YAML data (read by load_grid, or built in code: `archscale ladder --claim`) -> load_grid's
    dict; `path` names it in errors."""
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list) or not data["cells"]:
        raise CellError(f"grid file {path} needs a non-empty `cells:` list (see `archscale compare --help`)")
    unknown = set(data) - {"cells", "set", "match", "match_to"}
    if unknown:
        raise CellError(f"grid file {path}: unknown key(s) {sorted(unknown)}; use cells, set, match, match_to")
    cells = []
    for i, item in enumerate(data["cells"]):
        where = f"{path}: cells[{i}]"
        if isinstance(item, str):
            cells.append(parse_cell(item))
            continue
        if not isinstance(item, dict) or "cell" not in item:
            raise CellError(f"{where} must be 'ARCH:OBJECTIVE' or a mapping with `cell:` (and label, set)")
        bad = set(item) - {"cell", "label", "set", "match"}
        if bad:
            raise CellError(f"{where}: unknown key(s) {sorted(bad)}; use cell, label, set, match")
        if item.get("match") not in (None, *CELL_MATCHES):
            raise CellError(f"{where}: match {item['match']!r} must be one of {', '.join(CELL_MATCHES)}")
        c = parse_cell(str(item["cell"]))
        cells.append(Cell(c.arch, c.objective, c.overrides + tuple(_yaml_overrides(item.get("set"), where)),
                          str(item.get("label") or ""), item.get("match")))
    return {"cells": cells, "set": _yaml_overrides(data.get("set"), str(path)), "match": data.get("match"),
            "match_to": data.get("match_to")}


def unique_labels(cells: list[Cell]) -> None:
    seen = {}
    for c in cells:
        if c.label in seen:
            raise CellError(f"cells {seen[c.label]!r} and {c.spec!r} have the same label {c.label!r}; give one a "
                            f"`label:` in a grid file")
        seen[c.label] = c.spec
