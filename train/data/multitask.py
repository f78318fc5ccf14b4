"""Prompted multitask data (T0-style) for multitask finetuning and zero-shot rank classification.

Format: JSON Lines, one record per line (full description in docs/data.md):
    input           str, required, non-empty   the prompted input ("Premise: ... Question: ...")
    target          str                        the expected output; required unless label is given
    answer_choices  list of str, optional      the candidate outputs (rank classification)
    label           int, optional              index of the correct choice in answer_choices;
                                               when target is absent it is answer_choices[label],
                                               when both are given they must agree
    task            str, optional              task / prompt name, for per-task metrics
Other keys are allowed and ignored. Every problem is reported as `file:line: what; fix`.
"""
from __future__ import annotations

import json
import os

from ..atomic import atomic_path

FIELDS = ("input", "target", "answer_choices", "label", "task")


def validate_record(rec, where: str) -> dict:
    """A normalised record {input, target, answer_choices, label, task} or ValueError naming `where`."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a record must be a JSON object with an 'input' field, got {type(rec).__name__}")
    inp = rec.get("input")
    if not isinstance(inp, str) or not inp.strip():
        raise ValueError(f"{where}: 'input' must be a non-empty string (got {inp!r}); every record needs its prompt")
    choices = rec.get("answer_choices")
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"{where}: 'answer_choices' must be a list of at least 2 non-empty strings, got {choices!r}")
    label = rec.get("label")
    if label is not None:
        if choices is None:
            raise ValueError(f"{where}: 'label' needs 'answer_choices' (it indexes them); add the choices or drop the label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise ValueError(f"{where}: 'label'={label!r} must be an integer index in [0, {len(choices) - 1}]")
    target = rec.get("target")
    if target is None:
        if label is None:
            raise ValueError(f"{where}: the record has no 'target' (and no 'label' to derive it); add the expected output")
        target = choices[label]
    if not isinstance(target, str) or not target:
        raise ValueError(f"{where}: 'target' must be a non-empty string, got {target!r}")
    if label is not None and target != choices[label]:
        raise ValueError(f"{where}: 'target' {target!r} differs from answer_choices[{label}] {choices[label]!r}; "
                         f"make them agree or drop one")
    task = rec.get("task", "")
    if not isinstance(task, str):
        raise ValueError(f"{where}: 'task' must be a string, got {task!r}")
    return {"input": inp, "target": target, "answer_choices": choices or [], "label": -1 if label is None else label,
            "task": task}


def read_records(files: list[str]) -> list[dict]:
    """All validated records of the files, in order. Blank lines are skipped."""
    out = []
    for f in files:
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{f}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start}); fix the file") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg}); one JSON object per line") from None
                out.append(validate_record(rec, where))
    if not out:
        raise ValueError(f"no multitask records in {files}; each line must be a JSON object with 'input' and 'target'")
    return out


def load_multitask(files: list[str], cache_dir: str):
    """Validated records as a `datasets.Dataset` (cached as Arrow in cache_dir, keyed by file stats)."""
    import hashlib

    import datasets

    key = hashlib.sha256(json.dumps([(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f))
                                     for f in files]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, "multitask", key)
    if os.path.isdir(path):
        return datasets.load_from_disk(path)
    recs = read_records(files)
    features = datasets.Features({"input": datasets.Value("string"), "target": datasets.Value("string"),
                                  "answer_choices": datasets.List(datasets.Value("string")),
                                  "label": datasets.Value("int32"), "task": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({k: [r[k] for r in recs] for k in FIELDS}, features=features)
    with atomic_path(path) as tmp:  # a directory: complete or absent, whoever reads the cache
        ds.save_to_disk(str(tmp))
    return datasets.load_from_disk(path)


def rank_classification_examples(record: dict, tok) -> dict:
    """For zero-shot rank classification: the tokenized input and one target per answer choice.

    Returns {"input_ids": [...], "choices": [[...], ...], "label": int, "task": str}. Score each
    choice by the model's log-likelihood of its tokens given the input; predict the best one.
    """
    rec = validate_record(record, "record")
    if not rec["answer_choices"]:
        raise ValueError("rank classification needs 'answer_choices' in the record")
    enc = lambda t: tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]  # noqa: E731
    return {"input_ids": enc(rec["input"]), "choices": [enc(c) + [tok.eos_token_id] for c in rec["answer_choices"]],
            "label": rec["label"], "task": rec["task"]}
