"""The house keeps its shape (issue 15): no branch on an architecture outside train/registry/,
no module over 500 lines, no function over 80 (docs/design.md, "The house")."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ["train", "bench", "slurm", "model_zoo"]
MAX_MODULE, MAX_FUNCTION = 500, 80
# the grep of docs/design.md, as a regex
ARCH_BRANCH = re.compile(r"""arch (==|!=|in) |\.arch (==|!=|in) |== "(cd|nd|ed)"|!= "(cd|nd|ed)"|== '(cd|nd|ed)'|"""
                         r"""family (==|!=)""")


def _files(folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_branch_on_an_architecture_outside_the_registry():
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
            for f in _files(["train", "bench", "slurm"]) if "registry" not in f.relative_to(ROOT).parts[:2]
            for i, line in enumerate(f.read_text().splitlines(), 1) if ARCH_BRANCH.search(line)]
    assert not hits, "\n".join(hits)


def test_the_grep_would_find_a_branch():
    assert ARCH_BRANCH.search('    if cfg.model.arch == "ed":') and ARCH_BRANCH.search("if spec.family == x:")


def test_modules_and_functions_stay_small():
    big, long = [], []
    for f in _files(CODE):
        text = f.read_text()
        if len(text.splitlines()) > MAX_MODULE:
            big.append(f"{f.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not big and not long, "\n".join(big + long)
