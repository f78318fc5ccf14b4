"""archscale train --dry-run: decides and prints everything, trains nothing, writes nothing."""
import re

import pytest

from train.cli import main
from train.config import derive, load_config
from train.registry import get


def files_under(d):
    return sorted(p for p in d.rglob("*"))


@pytest.mark.parametrize("arch,objective", [("nd", "plm"), ("ed", "mlm")])
def test_dry_run_prints_the_trainers_numbers_and_writes_nothing(tmp_path, capsys, arch, objective):
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", f"model.arch={arch}", f"objective.name={objective}", "data.tokenizer=builtin-bytes",
                 f"data.cache_dir={tmp_path / 'cache'}", "parallel.micro_batch_size=4", "parallel.global_batch_size=64",
                 "schedule.train_tokens=2e6", "parallel.zero_stage=1"]
    before = files_under(tmp_path)
    assert main(["train", *overrides, "--dry-run", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert files_under(tmp_path) == before  # nothing written: no run dir, no cache
    cfg = load_config(None, overrides)
    d = derive(cfg, 8, tokens_per_sequence=get(arch).tokens_per_row(cfg.objective))
    m = re.search(r"global batch (\d+) = micro-batch (\d+) x accumulation (\d+) x data-parallel (\d+)", out)
    assert tuple(map(int, m.groups())) == (d.global_batch_size, 4, d.gradient_accumulation_steps, 8)
    assert f"{d.max_steps:,} steps" in out
    assert "would start fresh" in out
    assert '"train_batch_size": 64' in out and '"stage": 1' in out
    assert re.search(r"model\.arch +=.*# command line", out) and re.search(r"optim\.lr +=.*# default", out)
    assert "parameters" in out and "training FLOPs per token" in out


def test_dry_run_refuses_bad_batch_arithmetic(tmp_path, capsys):
    assert main(["train", f"run_dir={tmp_path / 'r'}", "parallel.micro_batch_size=4", "parallel.global_batch_size=30",
                 "schedule.max_steps=2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: parallel.global_batch_size=30 is not divisible") and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
