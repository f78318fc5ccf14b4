"""The benchmark harness keeps working: its CPU smoke mode runs every part and writes JSON.
(No test asserts a time; speed targets live in bench/RESULTS.md.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke_runs_every_part(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    names = {(r["group"], r["name"]) for r in rows}
    assert {("peak", "matmul"), ("hf", "HF Llama"), ("hf", "HF T5"), ("archscale", "CD:FLM"),
            ("archscale", "ND:PLM"), ("archscale", "ED:MLM")} <= names
    assert sum(r["group"] == "attention" for r in rows) == 6
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["tokens_per_s"] > 0 for r in rows if r["group"] in ("hf", "archscale"))
    assert "CD:FLM" in proc.stdout and "TFLOP/s" in proc.stdout


def test_bench_refuses_gpu_mode_without_gpu():
    proc = subprocess.run([sys.executable, "-m", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "--smoke" in proc.stderr
