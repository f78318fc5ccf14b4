"""The DeepSpeed JSON as a function of the run config: presets, merged fields, contradictions,
optimizer and schedule; and a real ``deepspeed.initialize`` that accepts what we generate."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from train.config import ConfigError, derive, load_config
from train.config.presets import PRESET_DIR, choose_preset, list_presets, load_preset
from train.engine.ds_config import build_ds_config, build_lr_scheduler, build_optimizer, lr_multiplier, param_groups

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "pipeline", "bf16"}


def ds_for(*overrides, world_size=1, **kw):
    cfg = load_config(overrides=["schedule.max_steps=10", *overrides])
    d = derive(cfg, world_size, **kw)
    return cfg, d, build_ds_config(cfg, d)


# ---------------------------------------------------------------- presets

def test_presets_exist_are_documented_and_state_no_derived_values():
    assert set(list_presets()) == PRESETS
    for name in PRESETS:
        raw = json.loads((PRESET_DIR / f"{name}.json").read_text())
        assert raw["_doc"], name
        p = load_preset(name)
        assert "_doc" not in p
        assert "train_batch_size" not in p and "optimizer" not in p
        assert isinstance(p["zero_optimization"]["stage"], int)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"no such preset; available: bf16, pipeline, zero0, zero1"):
        ds_for("parallel.ds_preset=zero4")


def test_preset_must_not_hand_copy_derived_values(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match=r"sets train_batch_size: these are derived"):
        ds_for(f"parallel.ds_preset={p}")
    p.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": False}}))
    _, d, ds = ds_for(f"parallel.ds_preset={p}")
    assert d.zero_stage == 1 and ds["zero_optimization"]["overlap_comm"] is False


# ---------------------------------------------------------------- generated fields

@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_generated_fields_per_zero_stage(stage):
    cfg, d, ds = ds_for(f"parallel.zero_stage={stage}", "parallel.micro_batch_size=4",
                        "parallel.global_batch_size=64", "optim.grad_clip=0.5", world_size=4)
    assert d.ds_preset == f"zero{stage}" and not d.ds_preset_named
    assert ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4
    # DeepSpeed's own consistency rule: train_batch = micro x accumulation x data-parallel size.
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["steps_per_print"] >= 10**6
    assert "bf16" not in ds and "fp16" not in ds and "optimizer" not in ds and "scheduler" not in ds
    json.dumps(ds)  # plain JSON


def test_zero3_offload_chosen_and_torch_optimizer_allowed_under_offload():
    _, d, ds = ds_for("parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_param=true",
                      "optim.offload_cpu_adam=false")
    assert d.ds_preset == "zero3_offload"
    z = ds["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False   # DeepSpeed refuses a torch optimizer otherwise
    _, _, ds = ds_for("parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_param=true")
    assert "zero_force_ds_cpu_optimizer" not in ds       # DeepSpeed's CPU Adam: nothing to force
    _, d, ds = ds_for("parallel.zero_stage=3", "parallel.offload_optimizer=true")   # partial offload
    assert d.ds_preset == "zero3" and "offload_param" not in ds["zero_optimization"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_named_preset_fills_unset_values():
    _, d, ds = ds_for("parallel.ds_preset=zero3_offload")
    assert (d.zero_stage, d.offload_optimizer, d.offload_param) == (3, True, True)
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 50_000_000
    _, d, ds = ds_for("parallel.ds_preset=bf16")
    assert d.precision == "bf16" and ds["bf16"]["enabled"] is True
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and d.zero_stage == 1


def test_named_preset_contradicted_by_the_config_is_an_error():
    with pytest.raises(ConfigError, match=r"ds_preset=zero3 sets zero_optimization.stage=3 but parallel config says 1"):
        ds_for("parallel.ds_preset=zero3", "parallel.zero_stage=1")
    with pytest.raises(ConfigError, match=r"ds_preset=bf16 sets bf16.enabled=True but parallel config says False"):
        ds_for("parallel.ds_preset=bf16", "parallel.precision=fp32")
    with pytest.raises(ConfigError, match=r"sets offload_param=True but parallel config says False"):
        ds_for("parallel.ds_preset=zero3_offload", "parallel.offload_param=false")


def test_precision_auto_follows_the_machine():
    _, d, ds = ds_for(bf16_supported=False)
    assert d.precision == "fp32" and "bf16" not in ds
    _, d, ds = ds_for(bf16_supported=True)
    assert d.precision == "bf16" and ds["bf16"] == {"enabled": True}
    _, d, ds = ds_for("parallel.precision=bf16", "parallel.zero_stage=1")
    assert d.ds_preset == "bf16" and ds["data_types"]["grad_accum_dtype"] == "fp32"
    _, d, ds = ds_for("parallel.precision=bf16")                       # bf16 without ZeRO
    assert d.ds_preset == "zero0" and ds["bf16"] == {"enabled": True} and "data_types" not in ds


def test_pipeline_preset_and_activation_checkpoint_interval():
    _, d, ds = ds_for("parallel.pipeline_stages=2", "parallel.zero_stage=1", "parallel.activation_checkpointing=true",
                      world_size=4)
    assert d.ds_preset == "pipeline" and d.data_parallel_size == 2
    assert ds["pipeline"]["activation_checkpoint_interval"] == 1 and ds["zero_optimization"]["stage"] == 1
    _, _, ds = ds_for("parallel.pipeline_stages=2", world_size=2)
    assert ds["pipeline"]["activation_checkpoint_interval"] == 0 and ds["zero_optimization"]["stage"] == 0


def test_choose_preset_table():
    assert choose_preset(1, False, False, 2, "fp32") == "pipeline"
    assert choose_preset(2, True, False, 1, "fp32") == "zero2_offload"
    assert choose_preset(3, True, True, 1, "bf16") == "zero3_offload"
    assert choose_preset(1, False, False, 1, "bf16") == "bf16"
    assert choose_preset(2, False, False, 1, "bf16") == "zero2"


def test_load_universal_flag():
    cfg = load_config(overrides=["schedule.max_steps=1", "parallel.zero_stage=2"])
    ds = build_ds_config(cfg, derive(cfg, 1), load_universal=True)
    assert ds["checkpoint"]["load_universal"] is True


# ---------------------------------------------------------------- schedule and optimizer

def test_inverse_sqrt_is_the_reference_schedule():
    cfg = load_config(overrides=["optim.lr=0.01", "schedule.name=inverse_sqrt", "schedule.rsqrt_steps=10000"])
    for step in (0, 1, 5000, 10_000, 10_001, 40_000, 250_000):
        lr = cfg.optim.lr * lr_multiplier(cfg.schedule, step, 300_000)
        assert lr == pytest.approx(1 / math.sqrt(max(step, 10_000)), rel=1e-12)


def test_cosine_with_warmup_and_constant():
    s = load_config(overrides=["schedule.warmup_steps=10", "schedule.min_lr_ratio=0.1"]).schedule
    assert lr_multiplier(s, 0, 110) == pytest.approx(0.1)
    assert lr_multiplier(s, 9, 110) == pytest.approx(1.0)
    assert lr_multiplier(s, 10, 110) == pytest.approx(1.0)
    assert lr_multiplier(s, 60, 110) == pytest.approx(0.55)
    assert lr_multiplier(s, 110, 110) == pytest.approx(0.1)
    c = load_config(overrides=["schedule.name=constant"]).schedule
    assert lr_multiplier(c, 12345, 10) == 1.0


def test_client_optimizers_and_scheduler():
    import torch
    from transformers.optimization import Adafactor

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg, d, _ = ds_for("optim.lr=0.002", "optim.weight_decay=0.1", "optim.betas=[0.8, 0.9]")
    groups = param_groups(model.named_parameters(), cfg.optim.weight_decay)
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["weight_decay"] == 0.0
    opt = build_optimizer(groups, cfg.optim, d)
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.8, 0.9)
    sched = build_lr_scheduler(opt, cfg.schedule, d.max_steps, cfg.optim)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002)   # cosine, no warmup: peak at step 0

    cfg, d, _ = ds_for("optim.name=adafactor", "optim.lr=0.01", "schedule.name=inverse_sqrt")
    opt = build_optimizer(model.parameters(), cfg.optim, d)
    assert isinstance(opt, Adafactor)
    assert opt.defaults["decay_rate"] == -0.8 and opt.defaults["relative_step"] is False
    assert opt.defaults["lr"] == 0.01 and opt.defaults["scale_parameter"] is True

    cfg, d, _ = ds_for("optim.name=adafactor", "optim.relative_step=true", "schedule.name=constant")
    opt = build_optimizer(model.parameters(), cfg.optim, d)
    assert opt.defaults["lr"] is None
    assert build_lr_scheduler(opt, cfg.schedule, d.max_steps, cfg.optim) is None
    del sched


# ---------------------------------------------------------------- real deepspeed.initialize

DS_SCRIPT = r'''
import json, sys, torch, deepspeed
from train.config import load_config, derive
from train.engine.ds_config import build_ds_config, build_optimizer, build_lr_scheduler, write_ds_config

# One process needs no shared-memory allreduce; DeepSpeed would compile that C++ op first (~45-120 s on CPU).
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo")
cases = json.loads(sys.argv[1])
out = {}
for name, overrides in cases.items():
    torch.manual_seed(0)
    cfg = load_config(overrides=["schedule.max_steps=4", "parallel.micro_batch_size=2",
                                 "parallel.gradient_accumulation_steps=2", *overrides])
    d = derive(cfg, world_size=1)
    path = f"{sys.argv[2]}/{name}.json"
    write_ds_config(build_ds_config(cfg, d), path)          # through JSON, as the trainer writes it
    ds = json.load(open(path))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model.parameters(), cfg.optim, d)
    sched = build_lr_scheduler(opt, cfg.schedule, d.max_steps, cfg.optim)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    for _ in range(d.gradient_accumulation_steps):
        loss = engine(torch.randn(2, 8, dtype=dtype)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    state_keys = sorted({k for s in inner.state.values() for k in s})
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        changed = any(not torch.equal(b, p.detach().float().cpu().to(b.dtype)) for b, p in zip(before, engine.module.parameters()))
    out[name] = dict(stage=engine.zero_optimization_stage(), train_batch=engine.train_batch_size(),
                     acc=engine.gradient_accumulation_steps(), global_steps=engine.global_steps,
                     bf16=engine.bfloat16_enabled(), changed=changed, state_keys=state_keys)
print("RESULT " + json.dumps(out))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deepspeed_initialize_accepts_the_generated_config(tmp_path):
    cases = {
        "zero0": ["parallel.zero_stage=0"],
        "zero1": ["parallel.zero_stage=1"],
        "zero2": ["parallel.zero_stage=2"],
        "zero3": ["parallel.zero_stage=3"],
        "bf16_preset": ["parallel.ds_preset=bf16"],
        "adafactor_zero0": ["optim.name=adafactor", "optim.lr=0.01", "schedule.name=inverse_sqrt"],
        "adafactor_zero1_flat": ["optim.name=adafactor", "parallel.zero_stage=1", "optim.allow_flat_adafactor=true"],
    }
    script = tmp_path / "ds_init.py"
    script.write_text(DS_SCRIPT)
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", TMPDIR=str(tmp_path),
               PYTHONPATH=str(ROOT), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    r = subprocess.run([sys.executable, str(script), json.dumps(cases), str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(lines[0][len("RESULT "):])
    for name in ("zero0", "zero1", "zero2", "zero3"):
        assert res[name]["stage"] == int(name[-1]), res[name]
    for name, v in res.items():
        assert (v["train_batch"], v["acc"], v["global_steps"]) == (4, 2, 1), (name, v)
        assert v["changed"], name
    assert res["bf16_preset"]["bf16"] and res["bf16_preset"]["stage"] == 1
    assert not res["zero1"]["bf16"]
    # deepspeed.md: under ZeRO-0 Adafactor sees each matrix (factored second moment) ...
    assert "exp_avg_sq_row" in res["adafactor_zero0"]["state_keys"], res["adafactor_zero0"]
    # ... under ZeRO-1 it sees one flat partition: a full, unfactored exp_avg_sq (why we refuse it by default).
    assert "exp_avg_sq" in res["adafactor_zero1_flat"]["state_keys"], res["adafactor_zero1_flat"]
    assert "exp_avg_sq_row" not in res["adafactor_zero1_flat"]["state_keys"]
