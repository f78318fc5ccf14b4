"""archscale export: a trained run's checkpoint becomes a Hugging Face model directory."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model_zoo
from train.trainer.weights import checkpoint_dir, engine_weights
from train.commands.export import main as export_main

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(tmp_path, arch, objective, zero):
    run = tmp_path / f"{arch}-{zero}"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TMPDIR": str(tmp_path)}
    args = [sys.executable, "-m", "train", "train", f"run_dir={run}", f"model.arch={arch}",
            f"objective.name={objective}", "objective.seq_length=64", "objective.inputs_length=48",
            "objective.targets_length=12", "data.tokenizer=builtin-bytes", "data.max_documents=30",
            f"data.cache_dir={tmp_path / 'cache'}", "parallel.micro_batch_size=2", f"parallel.zero_stage={zero}",
            "schedule.max_steps=3", "checkpoint.every_n_steps=2", "eval.every_n_steps=0", "eval.num_batches=1",
            "logging.tensorboard=false"]
    subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("arch,objective,zero", [("nd", "plm", 0), ("ed", "mlm", 1)])
def test_export_loads_with_from_pretrained(tmp_path, arch, objective, zero):
    run = tiny_run(tmp_path, arch, objective, zero)
    step_dir = checkpoint_dir(run)
    assert step_dir.name == "step-00000003"
    assert export_main([str(run), "--out", str(tmp_path / "hf")]) == 0
    model = model_zoo.load(tmp_path / "hf")
    assert model.config.arch == arch
    weights = engine_weights(step_dir)
    state = model.state_dict()
    for k, v in weights.items():
        assert torch.equal(state[k].float(), v), k
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert "<extra_id_0>" in tok.get_vocab()
    assert model.config.vocab_size >= len(tok)
    # an exported checkpoint at an older step, and a step that does not exist
    assert export_main([str(run), "--step", "2", "--out", str(tmp_path / "hf2")]) == 0
    assert export_main([str(run), "--step", "7"]) == 2
