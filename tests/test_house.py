"""The house keeps its shape (issue 15): no branch on an architecture outside train/registry/
(model_zoo included: its behaviour follows a config's class and fields, issue 28), no branch on a
batch's keys in model_zoo, no module over 500 lines, no function over 80 (docs/design.md, "The
house")."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ["train", "bench", "slurm", "model_zoo"]
MAX_MODULE, MAX_FUNCTION = 500, 80
# the grep of docs/design.md, as a regex
NAMES = "|".join(("cd", "nd", "ed", "eds"))  # names of registry entries (and model_zoo's notebook table)
ARCH_BRANCH = re.compile(rf"""arch (==|!=|in) |\.arch (==|!=|in) |(==|!=) ["']({NAMES})["']|["']({NAMES})["'] (==|!=|in) |"""
                         rf"""in \(["']({NAMES})["']|family (==|!=)""")
# model_zoo's models read a batch through their forward's arguments: a test of which keys a batch
# holds ("decoder_input_ids" in batch) is a family branch in disguise
BATCH_BRANCH = re.compile(r"""["']\w+["'] (not )?in (batch|inputs|kwargs|features)\b""")


def _files(folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _hits(pattern, folders) -> list[str]:
    return [f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
            for f in _files(folders) if "registry" not in f.relative_to(ROOT).parts[:2]
            for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]


def test_no_branch_on_an_architecture_outside_the_registry():
    hits = _hits(ARCH_BRANCH, CODE)
    assert not hits, "\n".join(hits)


def test_model_zoo_never_branches_on_a_batch_key():
    hits = _hits(BATCH_BRANCH, ["model_zoo"])
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("line", [
    '    if cfg.model.arch == "ed":', "if spec.family == x:", '    if c.arch != "ed":',  # train's and sizes.py's old forms
    '    cls = EncoderDecoderLM if config.arch == "ed" else DecoderLM', "    if name in ('cd', 'nd'):",
    '    if "eds" == arch:', '    prefix = p if arch == "nd" else 0'])
def test_the_grep_would_find_a_branch(line):
    assert ARCH_BRANCH.search(line)


@pytest.mark.parametrize("line", ['    if "decoder_input_ids" in batch:', "    ed = 'decoder_input_ids' in inputs",
                                  '    if "bidirectional" not in batch:'])
def test_the_grep_would_find_a_batch_key_branch(line):
    assert BATCH_BRANCH.search(line)


def test_the_scan_reaches_model_zoo(tmp_path, monkeypatch):
    """A planted name branch in a model_zoo-like tree is found (the scan covers model_zoo)."""
    (tmp_path / "model_zoo").mkdir()
    (tmp_path / "model_zoo" / "sizes.py").write_text('def f(c):\n    return 1 if c.arch == "ed" else 2\n')
    (tmp_path / "model_zoo" / "models.py").write_text('def g(batch):\n    return "decoder_input_ids" in batch\n')
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert len(_hits(ARCH_BRANCH, ["model_zoo"])) == 1 and len(_hits(BATCH_BRANCH, ["model_zoo"])) == 1


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
