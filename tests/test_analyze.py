"""archscale analyze: attention rank per layer of a run's checkpoint, causal vs bidirectional."""
import json

import pytest

from test_export import tiny_run  # noqa: E402  (tests/ is on sys.path under pytest)
from train.commands.analyze import main


@pytest.mark.slow
def test_analyze_compares_causal_and_bidirectional_on_the_same_weights(tmp_path, capsys):
    run = tiny_run(tmp_path, "cd", "flm", 0)
    assert main([str(run), "--rows", "2", "--seq-len", "32", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "causal (CD mask)" in out and "prefix 16 bidirectional (ND mask)" in out
    res = json.loads((tmp_path / "out" / "attention_rank.json").read_text())
    causal, bidir = res["causal (CD mask)"], res["prefix 16 bidirectional (ND mask)"]
    assert len(causal) == len(bidir) == 2 * 4  # layers x heads of the debug size
    assert all(r["numerical_rank"] == 32 for r in causal)  # triangular with a positive diagonal
    assert all(1.0 <= r["effective_rank"] <= 32 for r in causal + bidir)
    assert (tmp_path / "out" / "attention_rank.png").stat().st_size > 1000
    assert main([str(tmp_path / "nothing")]) == 2
