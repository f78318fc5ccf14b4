"""The benchmark harness keeps working: its CPU smoke mode runs every part and writes JSON, the
profiler mode writes its tables, runs merge into one table with the issue's targets.
(No test asserts a time; speed targets live in bench/RESULTS.md.)"""
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.__main__ import Row, link_anchors, main, targets  # noqa: E402
from rehearse import clean_env  # noqa: E402


def _bench(args, tmp_path, **kw):
    env = clean_env(DS_ACCELERATOR="cpu", TMPDIR=str(tmp_path))
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.mark.slow
def test_bench_smoke_runs_every_part(tmp_path):
    out = tmp_path / "bench.json"
    proc = _bench(["--smoke", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    names = {(r["group"], r["name"]) for r in rows}
    assert {("peak", "matmul"), ("hf", "HF Llama"), ("hf", "HF T5"), ("archscale", "CD:FLM"),
            ("archscale", "CD:FLM selective AC"), ("archscale", "ND:PLM"), ("archscale", "ED:MLM")} <= names
    assert sum(r["group"] == "attention" for r in rows) == 6
    assert sum(r["group"] == "data" for r in rows) == 4
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["tokens_per_s"] > 0 for r in rows if r["group"] in ("hf", "archscale", "data"))
    assert all(r["vs_anchor"] > 0 for r in rows if r["group"] == "archscale")  # linked to its HF row
    assert "CD:FLM" in proc.stdout and "TFLOP/s" in proc.stdout and "say nothing about the GPU" in proc.stdout


@pytest.mark.slow
def test_bench_profile_writes_tables(tmp_path):
    proc = _bench(["--smoke", "--profile", str(tmp_path / "prof"), "--models", "ED:MLM"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "prof" / "profile_ED_MLM.txt").read_text()
    assert "aten::mm" in table  # the op table, sorted by self time
    summary = (tmp_path / "prof" / "profile_summary.txt").read_text()
    line = next(x for x in summary.splitlines() if x.startswith("ED:MLM"))
    shares = [float(x.rstrip("%")) for x in line.split()[3:]]
    assert len(shares) == 6 and sum(shares) == pytest.approx(100, abs=4)  # categories add up (rounding)
    assert shares[2] > 0  # matmuls are found


def test_bench_refuses_gpu_mode_without_gpu():
    proc = subprocess.run([sys.executable, "-m", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "--smoke" in proc.stderr


def test_unknown_model_row_is_refused(capsys):
    assert main(["--smoke", "--models", "CD:FLM,XX"]) == 2
    assert "unknown model row(s) ['XX']" in capsys.readouterr().err


def _rows():
    return [Row("peak", "matmul", "", 1.0, tflops=800.0),
            Row("attention", "causal (flash)", "", 1.0, tflops=400.0, vs_anchor=1.0),
            Row("attention", "prefix per row", "", 1.0, tflops=300.0, vs_anchor=0.75),
            Row("hf", "HF Llama", "", 1.0, tokens_per_s=40e3),
            Row("hf", "HF T5", "", 1.0, tokens_per_s=12e3),
            Row("archscale", "CD:FLM", "", 1.0, tflops=480.0, tokens_per_s=50e3, frac_peak=0.6, anchor="HF Llama"),
            Row("archscale", "ND:PLM", "", 1.0, tflops=420.0, tokens_per_s=45e3, frac_peak=0.525, anchor="HF Llama"),
            Row("archscale", "ED:MLM T5 shape", "", 1.0, tflops=300.0, tokens_per_s=30e3, frac_peak=0.375,
                anchor="HF T5")]


def test_targets_are_the_issues_ratios():
    rows = _rows()
    link_anchors(rows)
    got = {what: (value, want) for what, value, want in targets(rows)}
    assert got["CD:FLM fraction of measured peak"] == (0.6, 0.55)
    assert got["CD:FLM tokens/s vs HF Llama"] == (pytest.approx(1.25), 1.2)
    assert got["ND:PLM model TFLOP/s vs CD:FLM"] == (pytest.approx(0.875), 0.9)
    assert got["ED:MLM T5 shape tokens/s vs HF T5"] == (pytest.approx(2.5), 3.0)
    assert got["ED:MLM fraction of peak vs CD:FLM's"] == (None, 0.9)  # no such row in this run
    assert got["attention prefix per row vs flash causal (TFLOP/s)"] == (0.75, 0.8)


def test_merge_joins_runs_of_one_device_and_refuses_two(tmp_path, capsys):
    rows = _rows()
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    env = {"device": "NVIDIA H100 80GB HBM3"}
    a.write_text(json.dumps({"env": env, "rows": [asdict(r) for r in rows[:5]]}))
    b.write_text(json.dumps({"env": env, "rows": [asdict(r) for r in rows[5:]]}))
    assert main(["--merge", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "CD:FLM tokens/s vs HF Llama" in out and "1.25" in out  # anchors linked across the files
    c.write_text(json.dumps({"env": {"device": "NVIDIA H200"}, "rows": []}))
    assert main(["--merge", str(a), str(c)]) == 2
    assert "different devices" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a bench JSON file"):
        main(["--merge", str(tmp_path / "bad.json")])
