"""Rank classification on prompted task files (T0 / the reference experiment): read and validate
task files, score each answer choice, aggregate accuracy per prompt, dataset and overall (with
its binomial standard error). See evaluate.py's docstring for the method.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .scoring import Scorer
from .stats import binomial_se


# ============================================================================ rank classification
def read_task_file(path: str | Path, limit: int = 0) -> list[dict]:
    """Validated prompted records with answer choices (train.data.multitask format), each with
    `task` (default: the file's stem) and `dataset` (see the module docstring).

    Errors name `file:line` (a label outside its choices, no choices, bad JSON, ...)."""
    from ..data.multitask import read_records

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task file {path} does not exist (or is not a file); pass prompted JSON Lines with "
                         f"answer_choices and label (docs/data.md)")
    records = read_records([str(path)])  # validates every line; errors say file:line
    numbered = [(i + 1, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if line.strip()]
    out = []
    for rec, (lineno, line) in zip(records, numbered):
        r = json.loads(line)  # the raw record: its optional `dataset` key
        if not rec["answer_choices"] or rec["label"] < 0:
            missing = "no choices" if not rec["answer_choices"] else "no label"
            raise ValueError(f"{path}:{lineno}: rank classification needs 'answer_choices' and a 'label' (the index "
                             f"of the correct choice); this record has {missing}")
        task = rec["task"] or path.stem
        dataset = r.get("dataset")
        if dataset is not None and (not isinstance(dataset, str) or not dataset):
            raise ValueError(f"{path}:{lineno}: 'dataset' must be a non-empty string, got {dataset!r}")
        out.append({**rec, "task": task, "dataset": dataset or task.split("/", 1)[0]})
        if limit and len(out) >= limit:
            break
    return out


def rank_classify(scorer: Scorer, tokenizer, records: list[dict]) -> list[dict]:
    """Per record: {task, dataset, label, pred, pred_norm, scores: [[sum, tokens], ...]}."""
    from ..data.multitask import rank_classification_examples

    examples = [rank_classification_examples(r, tokenizer) for r in records]
    requests = [(ex["input_ids"], ch) for ex in examples for ch in ex["choices"]]
    scores = scorer.loglikelihoods(requests)
    out, k = [], 0
    for rec, ex in zip(records, examples):
        s = scores[k:k + len(ex["choices"])]
        k += len(ex["choices"])
        out.append({"task": rec["task"], "dataset": rec["dataset"], "label": ex["label"],
                    "pred": max(range(len(s)), key=lambda i: s[i].sum),
                    "pred_norm": max(range(len(s)), key=lambda i: s[i].mean),
                    "scores": [[x.sum, x.tokens] for x in s]})
    return out


def aggregate(predictions: list[dict]) -> dict:
    """Accuracy per task; median over a dataset's prompts; mean over datasets (the reference's
    reporting). Returns {"tasks": {...}, "datasets": {...}, "mean": {"acc", "acc_norm"}}."""
    tasks: dict[str, dict] = {}
    for p in predictions:
        t = tasks.setdefault(p["task"], {"dataset": p["dataset"], "n": 0, "correct": 0, "correct_norm": 0})
        if t["dataset"] != p["dataset"]:
            raise ValueError(f"task {p['task']!r} belongs to two datasets ({t['dataset']!r}, {p['dataset']!r}); "
                             f"give each prompt one dataset")
        t["n"] += 1
        t["correct"] += int(p["pred"] == p["label"])
        t["correct_norm"] += int(p["pred_norm"] == p["label"])
    for t in tasks.values():
        t["acc"], t["acc_norm"] = t.pop("correct") / t["n"], t.pop("correct_norm") / t["n"]
    datasets: dict[str, dict] = {}
    for name, t in sorted(tasks.items()):
        datasets.setdefault(t["dataset"], {"prompts": []})["prompts"].append(name)
    for d in datasets.values():
        for m in ("acc", "acc_norm"):
            d[m] = statistics.median(tasks[p][m] for p in d["prompts"])
    mean = {m: (statistics.fmean(d[m] for d in datasets.values()) if datasets else None) for m in ("acc", "acc_norm")}
    n, correct = len(predictions), sum(int(p["pred"] == p["label"]) for p in predictions)
    for t in tasks.values():
        t["se"] = binomial_se(round(t["acc"] * t["n"]), t["n"])
    pooled = {"acc": correct / n if n else None, "se": binomial_se(correct, n), "n": n}  # every record, one binomial
    return {"tasks": tasks, "datasets": datasets, "mean": mean, "pooled": pooled}
