"""The reference presets (configs/reference_*.yaml) refuse to train on the embedded corpus: the
trainer's start-up check (also run by --dry-run and compare) and `archscale submit` say so in one
line naming data.train_files, unless data.allow_embedded=true; planning reads no data and is not
affected. Other configs keep the embedded corpus as their default."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from train.config import ConfigError, load_config
from train.trainer.loop import check

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(str(p) for p in (ROOT / "configs").glob("reference_*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: Path(p).stem)
def test_reference_preset_refuses_the_embedded_corpus(preset):
    assert len(PRESETS) >= 2
    with pytest.raises(ConfigError, match=r"data.allow_embedded=false .*data.train_files=") as e:
        check(load_config(preset), 64)
    assert "\n" not in str(e.value)
    check(load_config(preset, ["data.allow_embedded=true"]), 64)  # a rehearsal on the embedded corpus
    check(load_config(preset, ["data.source=files", "data.train_files=[/data/c4/*.json.gz]"]), 64)


def test_other_configs_keep_the_embedded_default():
    cfg = load_config(None, ["schedule.max_steps=1"])
    assert cfg.data.source == "embedded" and cfg.data.allow_embedded
    check(cfg, 1)


def test_submit_refuses_before_queueing_and_plan_is_unaffected(tmp_path):
    preset = str(ROOT / "configs" / "reference_cd_4.8b.yaml")
    p = subprocess.run([sys.executable, "-m", "slurm", "submit", preset, "--run-dir", str(tmp_path / "run"),
                        "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip().count("\n") == 0 and "data.train_files" in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()
    from train.commands.plan import plan_config

    assert plan_config(load_config(preset), gpus=64, gpu="h100-80gb", fix=False)
