"""Help that tells the truth (issue 20): every command and option that `archscale --help` and
README.md name exists. Each command's real argparse parser is captured (its parse_args stopped
before it does any work) and the named options are looked up in it; README.md is read when the
test runs, so an edit to it is checked as it stands."""
from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from train import cli

ROOT = Path(__file__).resolve().parents[1]
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# `archscale CMD ...`, `python -m train CMD ...` (the same entry point), `python -m MODULE ...` (ours)
ENTRY = re.compile(r"(?:\barchscale|python -m train)\s+([a-z][a-z-]*)|python -m ((?:bench|model_zoo|train|slurm)"
                   r"(?:\.[a-z_]+)*)\b")
OUR_MODULES = ("bench", "model_zoo", "train.data", "train.commands", "slurm")


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def _capture(call) -> argparse.ArgumentParser:
    """The parser `call()` builds, stopped at its parse_known_args (parse_args goes through it)."""
    real = argparse.ArgumentParser.parse_known_args

    def stop(self, *a, **k):
        raise _Captured(self)

    argparse.ArgumentParser.parse_known_args = stop
    try:
        call()
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_known_args = real
    raise AssertionError(f"{call} parsed no arguments")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


_PARSERS: dict = {}


def options_of(entry: str) -> set[str]:
    """Options of `archscale ENTRY`, or of `python -m MODULE` for an entry with a dot / a module name."""
    if entry not in _PARSERS:
        if entry.startswith("module:"):
            name = entry.split(":", 1)[1]
            mod = importlib.import_module(name)
            if not hasattr(mod, "main"):
                mod = importlib.import_module(name + ".__main__")
            _PARSERS[entry] = _options(_capture(lambda: mod.main([])))
        else:
            _PARSERS[entry] = _options(_capture(lambda: cli.COMMANDS[entry]([])))
    return _PARSERS[entry]


def mentions(text: str) -> list[tuple[str, list[str]]]:
    """(entry, options named after it) for each command a piece of command-line text names.
    `a | b` separates commands when a word follows the bar (`submit | sweep`), options otherwise
    (`[--dry-run | --local-procs N]`)."""
    text = text.split(" #", 1)[0]
    found = []
    starts = list(ENTRY.finditer(text))
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        if m.group(2):  # python -m MODULE
            found.append((f"module:{m.group(2)}", OPTION.findall(text[m.end():end])))
            continue
        entry, rest = m.group(1), text[m.end():end]
        segments = rest.split(" | ")
        opts = OPTION.findall(segments[0])
        for seg in segments[1:]:
            word = seg.strip().split(" ")[0] if seg.strip() else ""
            if re.fullmatch(r"[a-z][a-z-]*", word):
                found.append((entry, opts))
                entry, opts = word, OPTION.findall(seg[len(seg) - len(seg.lstrip()) + len(word):])
            else:
                opts += OPTION.findall(seg)
        found.append((entry, opts))
    return found


def help_mentions() -> list[tuple[str, list[str]]]:
    """From cli's docstring (what `archscale --help` prints): a command line, and its `[--...]`
    continuation lines; the description after two spaces is not part of it."""
    lines, current = [], None
    for raw in cli.__doc__.splitlines():
        s = raw.strip()
        if s.startswith("archscale "):
            current = len(lines)
            lines.append(re.split(r"\s{2,}", s)[0])
        elif s.startswith("[") and current is not None:
            lines[current] += " " + re.split(r"\s{2,}", s)[0]
        else:
            current = None
    return [m for line in lines for m in mentions(line)]


def readme_mentions() -> list[tuple[str, list[str]]]:
    """From README.md as it is now: the lines of fenced code blocks (a trailing `\\` joins the
    next) and inline code spans."""
    text = (ROOT / "README.md").read_text()
    snippets = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        snippets += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    snippets += re.findall(r"`([^`\n]+)`", prose)
    return [m for s in snippets for m in mentions(s)]


def check(found: list[tuple[str, list[str]]], where: str) -> list[str]:
    bad = []
    for entry, opts in found:
        if not entry.startswith("module:") and entry not in cli.COMMANDS:
            bad.append(f"{where}: `archscale {entry}` is no command (commands: {', '.join(cli.COMMANDS)})")
            continue
        if entry.startswith("module:") and not entry.split(":", 1)[1].startswith(OUR_MODULES):
            continue
        known = options_of(entry)
        bad += [f"{where}: `{entry.replace('module:', 'python -m ')}` has no option {o}" for o in opts if o not in known]
    return bad


def test_every_command_and_option_in_archscale_help_exists():
    found = help_mentions()
    assert {e for e, _ in found} >= {"train", "compare", "export", "plan", "eval", "report", "submit", "status"}
    assert sum(len(o) for _, o in found) >= 15  # the parse sees the options, not an empty list
    assert check(found, "archscale --help") == []


def test_every_command_and_option_in_the_readme_exists():
    found = readme_mentions()
    assert len(found) >= 10 and {e for e, _ in found} >= {"train", "export", "plan"}
    assert check(found, "README.md") == []


@pytest.mark.parametrize("text,problem", [
    ("archscale compare --out d --steps 5", "`compare` has no option --steps"),
    ("archscale eval RUN | frobnicate X", "`archscale frobnicate` is no command"),
    ("python -m bench --smok", "`python -m bench` has no option --smok"),
])
def test_the_check_finds_a_false_line(text, problem):
    assert any(problem in b for b in check(mentions(text), "t"))


def test_plan_reference_lists_every_stage_of_the_reference_experiment():
    """SCIENCE.md: pretraining of every cell, LM-A (X:MLM continued with an LM objective), NC-A
    (CD:FLM -> ND:MLM), MT-F of the pretrained and the NC-A models."""
    from train.commands.plan.reference import _reference_runs

    runs = {r["run"]: r for r in _reference_runs()}
    assert {r["phase"] for r in runs.values()} == {"pretraining", "adaptation", "multitask finetuning"}
    lm_a = [r for r in runs.values() if "LM-A" in r["run"]]
    assert [r["run"] for r in lm_a] == ["CD:MLM -> LM-A (CD:FLM)", "ND:MLM -> LM-A (ND:PLM)", "ED:MLM -> LM-A (ED:PLM)"]
    assert all("schedule.train_tokens=51000000000" in r["overrides"] for r in lm_a)
    assert "CD:FLM -> NC-A (ND:MLM)" in runs and "CD:FLM -> NC-A (ND:MLM) -> MT-F" in runs
