"""Multitask mixtures (examples-proportional with T0's per-dataset cap) and the MT-F preset."""
import json
from collections import Counter
from pathlib import Path

import pytest

from train import registry
from train.data.mixture import build_mixture, main as mixture_main, mixing_rates, read_tasks, task_caps

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, task: str, n: int, dataset: str | None = None) -> Path:
    recs = [{"input": f"{task} question {i}?", "answer_choices": ["yes", "no"], "label": i % 2, "task": task,
             **({"dataset": dataset} if dataset else {})} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture
def files(tmp_path):
    return [_write(tmp_path / "big1.jsonl", "big/p1", 300), _write(tmp_path / "big2.jsonl", "big/p2", 300),
            _write(tmp_path / "small.jsonl", "small/p1", 10), _write(tmp_path / "nli.jsonl", "entail", 40, "rte")]


def test_rates_and_caps_golden():
    # T5: r_i = min(n_i, K) / sum_j min(n_j, K)
    assert mixing_rates({"a": 10, "b": 1000}, {"a": 100, "b": 100}) == {"a": 10 / 110, "b": 100 / 110}
    tasks = {"big/p1": [{"dataset": "big"}], "big/p2": [{"dataset": "big"}], "small/p1": [{"dataset": "small"}]}
    assert task_caps(tasks, 200) == {"big/p1": 100, "big/p2": 100, "small/p1": 200}  # T0: K / prompts


def test_mixture_file_has_each_task_at_its_rate(files, tmp_path):
    out = tmp_path / "mix" / "train.jsonl"
    stats = build_mixture(files, out, cap=200, rounds=2, seed=3)
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    per_round = {"big/p1": 100, "big/p2": 100, "small/p1": 10, "entail": 40}  # rte has one prompt: cap 200
    assert Counter(r["task"] for r in recs) == {t: 2 * k for t, k in per_round.items()}
    rates = {t: s["rate"] for t, s in stats["tasks"].items()}
    assert rates == pytest.approx({t: k / 250 for t, k in per_round.items()})
    assert {r["dataset"] for r in recs} == {"big", "small", "rte"}
    # the two rounds of a capped task are different samples (its first 200 of a permutation of 300)
    big = [r["input"] for r in recs if r["task"] == "big/p1"]
    assert len(set(big)) == 200
    # deterministic, and the file reads back as prompted records (labels and targets agree)
    assert build_mixture(files, tmp_path / "again.jsonl", cap=200, rounds=2, seed=3)["tasks"] == stats["tasks"]
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()
    tasks = read_tasks([out])
    assert sum(len(v) for v in tasks.values()) == 500
    assert json.loads(Path(f"{out}.stats.json").read_text())["records"] == 500


def test_bad_mixtures(files, tmp_path, capsys):
    with pytest.raises(ValueError, match="empty mixture: no input files"):
        build_mixture([], tmp_path / "m.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: empty file"):
        build_mixture(files + [empty], tmp_path / "m.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "q", "answer_choices": ["a", "b"], "label": 3}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'label'=3 must be an integer index in \[0, 1\]"):
        build_mixture([bad], tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="cap=0 must be >= 1"):
        build_mixture(files, tmp_path / "m.jsonl", cap=0)
    assert mixture_main([str(tmp_path / "m.jsonl")]) == 2
    assert "empty mixture" in capsys.readouterr().err
    assert not (tmp_path / "m.jsonl").exists()


def test_mtf_preset():
    from train import registry
    from train.config import load_config

    cfg = load_config(ROOT / "configs" / "mtf.yaml", ["model.arch=ed"])
    assert (cfg.optim.lr, cfg.schedule.name, cfg.schedule.warmup_steps) == (1e-3, "constant", 0)
    assert cfg.model.overrides == {"dropout": 0.1}
    assert registry.get("ed").make_config(cfg.model, 512).dropout == 0.1
    o = cfg.objective
    assert (o.name, o.inputs_length, o.targets_length, o.seq_length) == ("prompted", 1024, 256, 1280)
    assert registry.get("ed").tokens_per_row(o) == registry.get("cd").tokens_per_row(o) == 1280  # the same budget per row
    assert (cfg.data.format, cfg.schedule.train_tokens) == ("multitask", 13_000_000_000)
