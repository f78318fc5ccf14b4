"""`bash bench/device_run.sh check --device cpu` (issue 30 item 3): the one-call GPU check runs end
to end on CPU at tiny shapes, its JSON names every item (measured, or skipped with a reason),
and a budget too small for the later items skips them with a `[check] skip` line. The wheels
the call carries are bench/device_wheels.sh's (6.6 MiB, docs/performance.md), far under the
device tool's 64 MiB."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.check import ITEMS, main  # noqa: E402
from rehearse import clean_env  # noqa: E402


def _check(tmp_path, *args):
    env = clean_env(DS_ACCELERATOR="cpu", TMPDIR=str(tmp_path), OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/device_run.sh", "check", "--device", "cpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "out" / "check.json").read_text())
    return proc, report


@pytest.mark.slow
def test_cpu_check_runs_every_item_end_to_end(tmp_path):
    proc, report = _check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    items = report["items"]
    assert list(items) == list(ITEMS)
    # no GPU: pytest ran tests/test_gpu.py's cases and skipped each; the item says why
    assert items["gpu_tests"]["status"] == "skipped" and "no CUDA GPU" in items["gpu_tests"]["reason"]
    assert items["gpu_tests"]["skipped"] >= 7
    assert all(items[k]["status"] == "done" for k in ("matmul", "models", "attention", "profile")), items
    names = {(r["group"], r["name"]) for r in report["rows"]}
    assert {("peak", "matmul"), ("hf", "HF Llama"), ("hf", "HF T5"), ("archscale", "CD:FLM"),
            ("archscale", "ND:PLM"), ("archscale", "ED:MLM"), ("attention", "causal (flash)"),
            ("attention", "prefix per row"), ("attention", "T5 bias, causal")} == names
    ed = next(r for r in report["rows"] if r["name"] == "ED:MLM")
    assert ed["vs_anchor"] > 0 and ed["anchor"] == "HF T5"  # linked to the HF row of its shape
    assert [s["name"] for s in items["profile"]["summaries"]] == ["CD:FLM", "ND:PLM", "ED:MLM"]
    assert (tmp_path / "out" / "profile_ED_MLM.txt").exists() and (tmp_path / "out" / "check.log").exists()


def test_a_small_budget_skips_the_later_items_with_a_line(tmp_path):
    # 3 s from the script's start: the wheel check and the imports spend most of it, the models
    # item needs 5 s on CPU, so models, attention (or earlier) and profile are skipped, each named
    proc, report = _check(tmp_path, "--budget-s", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    items = report["items"]
    assert list(items) == list(ITEMS)
    for name in ("models", "profile"):
        assert items[name]["status"] == "skipped", items[name]
        assert "s budget, the item needs" in items[name]["reason"]
        assert f"[check] skip {name}:" in proc.stdout
    assert all(e["status"] in ("done", "skipped", "partial") for e in items.values())


def test_gpu_mode_without_a_gpu_is_refused(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err
