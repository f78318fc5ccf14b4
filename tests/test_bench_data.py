"""bench/data.py keeps working: its smoke mode measures the four loader cases (no time asserted)."""
import pytest

from bench.data import bench_data, format_rows


def test_bench_data_smoke_measures_every_case():
    rows = bench_data(smoke=True, batches=2, repeats=1)
    assert [r["name"] for r in rows] == ["CD:FLM", "ND:PLM", "ED:MLM", "ED:MLM"]
    assert [r["shape"] for r in rows] == ["128 x8", "128 x8", "98/22 x8", "64/64 x8"]
    for r in rows:
        assert set(r) == {"name", "shape", "tokens_per_s", "batches_per_s", "ms_per_batch", "note"}
        assert r["tokens_per_s"] > 0 and r["batches_per_s"] > 0 and r["ms_per_batch"] > 0
    assert "tokens/s" in format_rows(rows)
    with pytest.raises(ValueError, match="batches=0 must be a positive integer"):
        bench_data(smoke=True, batches=0)


@pytest.mark.slow
def test_bench_data_scale_smoke_measures_tokenization_memory_and_resume(capsys):
    from bench.data import main

    assert main(["--scale", "--smoke"]) == 0
    out = capsys.readouterr().out
    assert "tokenization" in out and "epoch plan" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("permutation", "feistel"))]
    assert [r[0] for r in rows] == ["permutation", "feistel"] * 2 and [r[1] for r in rows[::2]] == ["20,000", "100,000"]
    assert all(float(r[2]) > 0 and float(r[-1]) > 0 for r in rows)  # RSS and the resume time were measured
