"""Multitask mixtures for finetuning (MT-F): examples-proportional mixing with a cap, as T0 did.

    python -m train.data.mixture mixtures/t0_train.jsonl prompted/*.jsonl --cap 500000
    archscale train configs/mtf.yaml data.train_files=[mixtures/t0_train.jsonl] init.from_checkpoint=runs/nd-mlm

T5's examples-proportional mixing samples task i with rate r_i = min(n_i, K) / sum_j min(n_j, K):
large datasets are capped at K examples so that they do not drown the small ones. T0 applied the
cap per *dataset* (K = 500,000), shared by the dataset's prompts: each prompted version of a
dataset with P prompts is capped at K / P examples.

This module writes the mixture as one prompted JSON Lines file (docs/data.md) that the
`prompted` objective reads: every round holds exactly min(n_i, cap_i) records of task i (a
seeded random subset when the task is larger than its cap, a different subset in each round;
all records otherwise), so within a round the trainer's shuffled stream visits tasks at exactly
the rates r_i. `--rounds R` writes R rounds (R passes of the small tasks, R different samples of
the capped ones). A `<OUT>.stats.json` next to it records sizes, caps and rates.

Tasks and datasets: a record's task is its `task` field (else the file's stem); its dataset is its
`dataset` field, else the part of the task before the first '/', else the task (the convention of
train/eval/evaluate.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, atomic_write_text
T0_CAP = 500_000  # examples per dataset (T0, following T5's examples-proportional mixing)


def read_tasks(files: list[str | Path]) -> "OrderedDict[str, list[dict]]":
    """Validated records of every file, grouped by task (in order of first appearance)."""
    from .multitask import read_records

    if not files:
        raise ValueError("empty mixture: no input files; pass prompted JSON Lines files (docs/data.md)")
    tasks: OrderedDict[str, list[dict]] = OrderedDict()
    for f in map(Path, files):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such file (a mixture input)")
        lines = [line for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{f}: empty file; a mixture's every input needs records (drop it, or fix it)")
        for rec, line in zip(read_records([str(f)]), lines):  # validated; errors say file:line
            raw = json.loads(line)
            rec["task"] = rec["task"] or f.stem
            rec["dataset"] = raw.get("dataset") if isinstance(raw.get("dataset"), str) and raw.get("dataset") \
                else rec["task"].split("/", 1)[0]
            tasks.setdefault(rec["task"], []).append(rec)
    return tasks


def task_caps(tasks: dict[str, list[dict]], cap: int) -> dict[str, int]:
    """Per task: cap // (prompts of its dataset), T0's per-dataset cap shared by its prompts."""
    if cap < 1:
        raise ValueError(f"cap={cap} must be >= 1 (T0: {T0_CAP:,} examples per dataset)")
    prompts: dict[str, int] = {}
    for recs in tasks.values():
        prompts[recs[0]["dataset"]] = prompts.get(recs[0]["dataset"], 0) + 1
    return {t: max(1, cap // prompts[recs[0]["dataset"]]) for t, recs in tasks.items()}


def mixing_rates(sizes: dict[str, int], caps: dict[str, int]) -> dict[str, float]:
    """Examples-proportional rates r_i = min(n_i, cap_i) / sum_j min(n_j, cap_j)."""
    eff = {t: min(n, caps[t]) for t, n in sizes.items()}
    total = sum(eff.values())
    if total == 0:
        raise ValueError("empty mixture: every task has 0 records")
    return {t: v / total for t, v in eff.items()}


def build_mixture(files: list[str | Path], out: str | Path, *, cap: int = T0_CAP, rounds: int = 1,
                  seed: int = 0) -> dict:
    """Write the mixture file `out` (and `out`.stats.json); return the stats."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    tasks = read_tasks(files)
    caps = task_caps(tasks, cap)
    sizes = {t: len(r) for t, r in tasks.items()}
    rates = mixing_rates(sizes, caps)
    rng = np.random.Generator(np.random.Philox(seed))
    perms = {t: rng.permutation(n) for t, n in sizes.items()}
    chosen = []
    for r in range(rounds):
        for t, recs in tasks.items():
            k = min(sizes[t], caps[t])
            idx = perms[t][(np.arange(k) + r * k) % sizes[t]]  # round r: the next k of the task's permutation
            chosen.extend(recs[i] for i in idx)
    order = rng.permutation(len(chosen))  # file order mixed too (the stream shuffles again per epoch)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for i in order:
            rec = chosen[i]
            fh.write(json.dumps({k: v for k, v in rec.items() if not (k == "answer_choices" and not v)
                                 and not (k == "label" and v < 0)}, ensure_ascii=False) + "\n")
    stats = {"files": [str(f) for f in files], "cap": cap, "rounds": rounds, "seed": seed, "records": len(chosen),
             "tasks": {t: {"dataset": tasks[t][0]["dataset"], "records": sizes[t], "cap": caps[t],
                           "per_round": min(sizes[t], caps[t]), "rate": rates[t]} for t in tasks}}
    atomic_write_text(f"{out}.stats.json", json.dumps(stats, indent=1) + "\n")
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.data.mixture", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the mixture file to write (JSON Lines)")
    p.add_argument("files", nargs="*", help="prompted JSON Lines files (docs/data.md)")
    p.add_argument("--cap", type=int, default=T0_CAP, help="examples per dataset, shared by its prompts (T0: 500000)")
    p.add_argument("--rounds", type=int, default=1, help="rounds written (new samples of capped tasks in each)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        stats = build_mixture(a.files, a.out, cap=a.cap, rounds=a.rounds, seed=a.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for t, s in stats["tasks"].items():
        print(f"{t:40s} {s['records']:>10,} records  cap {s['cap']:>9,}  rate {s['rate']:.4f}")
    print(f"{a.out}: {stats['records']:,} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
