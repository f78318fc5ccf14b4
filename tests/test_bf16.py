"""bf16 through the real trainer and DeepSpeed on CPU (issue 30 item 1): DeepSpeed's CPU
accelerator has bf16, so the engine paths a GPU run takes in bf16 are rehearsed here on 2 CPU
processes over gloo.

The matrix: CD:FLM, ND:PLM and ED:MLM trained with parallel.precision=bf16 at ZeRO 0, 1, 2 and 3
(2 data-parallel ranks, accumulation 2) and on 2 pipeline stages (ZeRO-1, accumulation 4), the
same global batch of 8 rows as each cell's fp32 run. Each shows:
- the loss curve within LOSS_TOL of the fp32 run (and the loss drop within DROP_TOL of fp32's);
- the weights the model computes with are bf16 while the master weights and the optimizer state
  are fp32 (the checkpoint's files: 3 fp32 numbers per parameter, AdamW's two moments and the
  master, over the ranks' partitions);
- a kill and resume ends bitwise equal to the uninterrupted bf16 run: one cell per ZeRO stage,
  each cell on one stage at least (CD ZeRO-0 by a real SIGKILL of the 2-process launch, inside the
  steps after a checkpoint; ND ZeRO-1, ED ZeRO-2, CD ZeRO-3 and the CD pipeline stopped after a
  step and resumed);
- `archscale export --dtype` writes the dtype asked for, from the fp32 master;
- Adafactor under bf16 is refused where DeepSpeed hands it flat partitions, and factored where not.

Cost: one 2-process launch that is killed (~15 s), one 2-process launch of all 29 runs and 2
refusals (~90 s on 2 free cores), then reads of the files and 8 exports in this process (~20 s).
The runs are shared by every test (module fixture).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rehearse import CELLS, WORKER, base_overrides, env, launch, losses, make_work, metrics, state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS, EVERY = 8, 3
ZEROS = (0, 1, 2, 3)
# Tolerance of bf16 against fp32, per logged step (loss in nats, ~5.9 at the start): bf16 keeps 8
# significant bits, so each matmul output is rounded by up to 2^-9 (0.2%) relative; the loss of a
# debug model over 8 x 64 tokens averages those errors out to ~1e-4 (step 1: 1.7e-5 seen), and with
# fp32 master weights and fp32 optimizer state the two trajectories drift apart only through
# the rounding of the gradients (seen: <= 5e-4 over 8 steps, every cell and stage). 0.01 nats is
# 20x that and 4% of the ~0.25 nats the runs learn in 8 steps: a path that takes a wrong step is
# outside it (DeepSpeed's ZeRO-0 wrapper's first step, 0.74 of Adam's: 0.018 nats behind after 6
# steps, fixed in train/engine/runtime.undo_init_step).
LOSS_TOL = 0.01
DROP_TOL = 0.05  # relative: (loss_1 - loss_8) of bf16 within 5% of fp32's (seen < 1%)
KILL = {0: "cd", 1: "nd", 2: "ed", 3: "cd"}  # the cell killed / stopped and resumed at each ZeRO stage
SAVE_DELAY = "1.0"  # ARCHSCALE_TEST_SAVE_DELAY in the killed launch: the step after a save is logged before the next save


def overrides(work: Path, name: str, cell: str, *, zero: int = 0, precision: str = "bf16", stages: int = 1,
              extra=()) -> list[str]:
    return base_overrides(work) + CELLS[cell] + [
        f"run_dir={work / name}", f"schedule.max_steps={STEPS}", f"parallel.zero_stage={zero}",
        f"parallel.precision={precision}", f"parallel.pipeline_stages={stages}", "parallel.global_batch_size=8",
        f"checkpoint.every_n_steps={EVERY}", *extra]


def killed_launch(work: Path, name: str, cell: str, zero: int) -> tuple[int, int]:
    """A 2-process launch of one bf16 run, SIGKILLed (the whole process group) once it has logged
    the step after its first checkpoint; returns (the last step it logged, its newest checkpoint's)."""
    from bench.faults.common import kill_group, logged_step, wait_for

    spec = work / f"{name}.json"
    spec.write_text(json.dumps([{"overrides": overrides(work, name, cell, zero=zero)}]))
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(WORKER), str(spec)], cwd=work, env=env(work, ARCHSCALE_TEST_SAVE_DELAY=SAVE_DELAY),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        reached = wait_for(p, lambda: logged_step(work / name) >= EVERY + 1, timeout=300)
    finally:
        kill_group(p)
    assert reached, f"the launch to kill ended (rc {p.returncode}) before logging step {EVERY + 1}"
    return logged_step(work / name), state(work / name)["step"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = make_work(tmp_path_factory, "bf16")
    killed_at = killed_launch(work, "kill-cd-z0", "cd", 0)
    spec = [{"overrides": overrides(work, "kill-cd-z0", "cd", zero=0)}]  # the resume of the killed run
    for cell in CELLS:
        spec.append({"overrides": overrides(work, f"{cell}-fp32", cell, precision="fp32")})
        for z in ZEROS:
            spec.append({"overrides": overrides(work, f"{cell}-z{z}", cell, zero=z)})
        spec.append({"overrides": overrides(work, f"{cell}-pipe", cell, zero=1, stages=2)})
    stops = [(f"stop-{KILL[z]}-z{z}", KILL[z], dict(zero=z)) for z in ZEROS if z] + [
        ("stop-cd-pipe", "cd", dict(zero=1, stages=2))]
    for name, cell, kw in stops:  # stopped after step EVERY + 1 (a tail save), resumed to the end
        spec.append({"overrides": overrides(work, name, cell, **kw), "max_steps_now": EVERY + 1})
        spec.append({"overrides": overrides(work, name, cell, **kw)})
    ada = ["optim.name=adafactor", "optim.lr=0.01"]
    spec.append({"overrides": overrides(work, "adafactor-z0", "cd", extra=ada)})
    for name, kw in (("adafactor-pipe", dict(stages=2)), ("adafactor-z1", dict(zero=1))):
        (work / name).mkdir()  # refused before it makes its run directory: the worker writes error.txt there
        spec.append({"overrides": overrides(work, name, "cd", extra=ada, **kw), "expect_error": True})
    launch(work, 2, spec, "launch2", timeout=1800)  # ~90 s on 2 free cores; 15 min seen on a shared, loaded one
    return work, killed_at


@pytest.mark.slow
@pytest.mark.parametrize("layout", [f"z{z}" for z in ZEROS] + ["pipe"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_bf16_loss_follows_fp32(runs, cell, layout):
    work, _ = runs
    ref, got = losses(work / f"{cell}-fp32"), losses(work / f"{cell}-{layout}")
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    diff = max(abs(got[s] - ref[s]) for s in ref)
    drop, ref_drop = got[1] - got[STEPS], ref[1] - ref[STEPS]
    print(f"{cell} {layout} bf16 vs fp32: max |loss diff| {diff:.2e}, drop {drop:.4f} vs {ref_drop:.4f}")
    assert ref_drop > 0.1  # the fp32 run learns: the comparison means something
    assert diff <= LOSS_TOL, (got, ref)
    assert abs(drop - ref_drop) <= DROP_TOL * ref_drop, (got, ref)
    ds = json.loads((work / f"{cell}-{layout}" / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] and "bf16" not in json.loads((work / f"{cell}-fp32" / "ds_config.json").read_text())


# ---------------------------------------------------------------------------------- what is fp32
def engine_tensors(run: Path, step: int = STEPS) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of a checkpoint's DeepSpeed files (all ranks), by file and path inside it."""
    from train.trainer.integrity import safe_torch_load

    out: dict = {}

    def walk(o, path, into):
        if torch.is_tensor(o):
            into[path] = o
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{path}/{k}", into)
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{path}/{i}", into)

    for f in sorted((run / "checkpoints" / f"step-{step:08d}" / "engine").glob("*.pt")):
        walk(safe_torch_load(f), "", out.setdefault(f.name, {}))
    return out


def split_states(tensors: dict) -> tuple[list, list]:
    """(the weights the model computes with, the optimizer's tensors incl. the master) of
    engine_tensors: a pipeline's layer files and a model-states file's `module` are weights, a
    ZeRO optim-states file and a ZeRO-0 model-states file's `optimizer` the optimizer's."""
    weights, optim = [], []
    for name, ts in tensors.items():
        for path, t in ts.items():
            if not t.is_floating_point():
                continue
            if name.startswith("layer_") or path.startswith("/module/"):
                weights.append(t)
            elif "optim_states" in name or path.startswith("/optimizer/"):
                optim.append(t)
    return weights, optim


@pytest.fixture(scope="module")
def n_params(runs):
    """Trainable parameters of each cell's model (tied weights once), as the ZeRO-1 checkpoint
    records the shapes of what its optimizer holds (param_shapes)."""
    from train.trainer.integrity import safe_torch_load

    work, _ = runs
    files = {c: work / f"{c}-z1" / "checkpoints" / f"step-{STEPS:08d}" / "engine" / "mp_rank_00_model_states.pt"
             for c in CELLS}
    return {c: sum(s.numel() for g in safe_torch_load(f)["param_shapes"] for s in g.values()) for c, f in files.items()}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [f"z{z}" for z in ZEROS] + ["pipe"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_master_weights_and_optimizer_state_are_fp32(runs, n_params, cell, layout):
    """Every preset keeps an fp32 master and fp32 AdamW moments beside the bf16 weights: 3 fp32
    numbers per parameter over the ranks' files (ZeRO pads each partition a little; 2 pipeline
    stages each hold the tied embedding / output matrix, DeepSpeed's TiedLayerSpec); the fp32 run
    keeps 2 (no master: the weights are the master). AdamW's step count is the trainer's on every
    rank (ZeRO-0's wrapper took one step more before train/engine/runtime.undo_init_step)."""
    work, _ = runs
    tensors = engine_tensors(work / f"{cell}-{layout}")
    weights, optim = split_states(tensors)
    tied = sum(t.numel() for t in tensors.get("layer_00-model_states.pt", {}).values())  # pipe: the embedding
    p = n_params[cell] + tied
    assert {t.dtype for t in weights} <= {torch.bfloat16}, {t.dtype for t in weights}
    if layout != "z3":  # ZeRO-3 saves no whole weights, only the fp32 partitions
        assert sum(t.numel() for t in weights) >= n_params[cell]
    assert {t.dtype for t in optim if t.numel() > 1} == {torch.float32}, {t.dtype for t in optim}
    n = sum(t.numel() for t in optim if t.numel() > 1)
    print(f"{cell} {layout}: {n / p:.4f} fp32 optimizer numbers per parameter")
    assert 3 * p <= n <= 3 * p * 1.01 + 4096, (n, p)
    steps = {float(t) for ts in tensors.values() for k, t in ts.items() if k.endswith("/step")}
    assert steps == {float(STEPS)}, steps
    w32, o32 = split_states(engine_tensors(work / f"{cell}-fp32"))
    assert {t.dtype for t in w32} == {torch.float32}
    assert sum(t.numel() for t in o32 if t.numel() > 1) == 2 * n_params[cell]


# ---------------------------------------------------------------------------------- kill and resume
def equal_checkpoints(a: Path, b: Path) -> str:
    """'' when the final checkpoints' DeepSpeed files hold bitwise the same tensors (bf16 weights,
    fp32 master, optimizer moments, loss-scale state), else the first difference."""
    ta, tb = engine_tensors(a), engine_tensors(b)
    if ta.keys() != tb.keys():
        return f"files {sorted(ta)} != {sorted(tb)}"
    for f in ta:
        if ta[f].keys() != tb[f].keys():
            return f"{f}: tensors {sorted(set(ta[f]) ^ set(tb[f]))[:3]} in one only"
        bad = [k for k in ta[f] if ta[f][k].dtype != tb[f][k].dtype or not torch.equal(ta[f][k], tb[f][k])]
        if bad:
            return f"{f}: {bad[:3]} differ"
    return ""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kill-cd-z0"] + [f"stop-{KILL[z]}-z{z}" for z in ZEROS if z] + ["stop-cd-pipe"])
def test_kill_and_resume_in_bf16_ends_bitwise_equal(runs, name):
    work, killed_at = runs
    cell, layout = name.split("-")[1:]
    ref, run = work / f"{cell}-{layout}", work / name
    if name.startswith("kill"):  # killed in the steps after a checkpoint: those steps run again
        logged, saved = killed_at
        assert saved < logged < STEPS, killed_at
    assert (run / "FINISHED").is_file() and state(run)["step"] == STEPS
    assert [m["step"] for m in metrics(run) if "loss" in m] == list(range(1, STEPS + 1))  # each step once
    assert losses(run) == losses(ref)  # bitwise
    a, b = state(ref), state(run)
    assert [a[k] for k in ("step", "tokens_seen", "target_tokens", "flops", "data_position")] == \
        [b[k] for k in ("step", "tokens_seen", "target_tokens", "flops", "data_position")]
    assert equal_checkpoints(ref, run) == ""  # bf16 weights, fp32 master, moments, loss-scale state


# ---------------------------------------------------------------------------------- export
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cd-z0", "nd-z1", "ed-z3", "cd-pipe"])
def test_export_writes_the_dtype_asked_for(runs, name, tmp_path):
    """fp32 (the default): the fp32 master, which holds numbers bf16 cannot (the weights it
    computed with are those rounded); bf16: those numbers cast, config.json saying bfloat16, and
    from_pretrained loads them as bf16."""
    from safetensors.torch import load_file
    from transformers import T5ForConditionalGeneration

    import model_zoo
    from train.commands.export import main as export_main

    work, _ = runs
    got = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        assert export_main([str(work / name), "--out", str(out), "--dtype", dtype]) == 0
        got[dtype] = load_file(out / "model.safetensors")
        want = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        assert {t.dtype for t in got[dtype].values()} == {want}
        assert json.loads((out / "config.json").read_text())["dtype"] == str(want).split(".")[1]
        form = json.loads((out / "archscale_export.json").read_text())["form"]
        loaded = T5ForConditionalGeneration.from_pretrained(out) if form == "t5" else model_zoo.load(out)
        assert next(loaded.parameters()).dtype == want
    assert got["fp32"].keys() == got["bf16"].keys()
    assert all(torch.equal(got["fp32"][k].bfloat16(), got["bf16"][k]) for k in got["fp32"])
    off = sum(int((t != t.bfloat16().float()).sum()) for t in got["fp32"].values())
    assert off > 0, "the fp32 export holds only bf16 numbers: the bf16 weights, not the fp32 master"
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'fp16' (choose from fp32, bf16)", exit 2
        export_main([str(work / name), "--out", str(tmp_path / "x"), "--dtype", "fp16"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", [f"z{z}" for z in ZEROS] + ["pipe"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_checkpoint_weights_read_back_are_the_fp32_master(runs, cell, layout):
    """What export, evaluation and init.from_checkpoint read (train.trainer.weights.load_model) is
    the fp32 master: rounded to bf16 it is bitwise the working copy the model computed with, and
    it holds numbers bf16 cannot. (Before: the bf16 preset's checkpoint did not load at all,
    zero_to_fp32's "not a zero checkpoint"; ZeRO-0 and pipelines gave the bf16 working copy.)"""
    from train.engine.pipeline import model_state_dict_from_layer_files
    from train.trainer.integrity import safe_torch_load
    from train.trainer.weights import checkpoint_dir, load_model

    work, _ = runs
    step_dir = checkpoint_dir(work / f"{cell}-{layout}")
    model = load_model(step_dir)[0]
    master = model.state_dict()
    engine = step_dir / "engine"
    if layout == "pipe":
        working = model_state_dict_from_layer_files(model.config, str(engine))
    elif layout == "z3":  # no whole working copy is saved; the partitions are fp32 (test above)
        working = {}
    else:
        working = safe_torch_load(engine / "mp_rank_00_model_states.pt")["module"]
    assert all(working[k].dtype == torch.bfloat16 and torch.equal(master[k].bfloat16(), working[k]) for k in working)
    assert layout == "z3" or len(working) >= len(dict(model.named_parameters()))
    assert any(bool((t != t.bfloat16().float()).any()) for t in master.values() if t.is_floating_point())


# ---------------------------------------------------------------------------------- Adafactor
@pytest.mark.slow
@pytest.mark.parametrize("name", ["adafactor-pipe", "adafactor-z1"])
def test_adafactor_under_bf16_is_refused_where_flat(runs, name):
    """bf16 with pipeline stages (BF16_Optimizer, even at ZeRO-0) and bf16 at ZeRO-1 hand Adafactor
    flat partitions: the real trainer on 2 processes refuses in one line naming the way out, before
    it writes a checkpoint."""
    work, _ = runs
    msg = (work / name / "error.txt").read_text().strip()
    assert "\n" not in msg and "ConfigError" in msg and "optim.allow_flat_adafactor=true" in msg, msg
    assert ("bf16 with pipeline stages" if name.endswith("pipe") else "ZeRO stage 1") in msg, msg
    assert not (work / name / "checkpoints").exists()


@pytest.mark.slow
def test_adafactor_under_bf16_at_zero0_is_factored_and_counts_its_steps(runs):
    """bf16 at ZeRO-0 (FP16_UnfusedOptimizer) hands Adafactor each matrix: a factored second
    moment (a row and a column per matrix) in fp32 beside the fp32 master, and its step count is
    the trainer's (the wrapper's zero-gradient step at construction, undone by
    train/engine/runtime.undo_init_step, made it one more: Adafactor's decay schedule one step late)."""
    from train.trainer.integrity import safe_torch_load
    from train.trainer.weights import checkpoint_dir

    work, _ = runs
    states = safe_torch_load(checkpoint_dir(work / "adafactor-z0") / "engine" / "mp_rank_00_model_states.pt")
    opt = states["optimizer"]
    per_param = list(opt["optimizer_state_dict"]["state"].values())
    assert any("exp_avg_sq_row" in st for st in per_param)
    assert all(st["exp_avg_sq"].ndim == 1 for st in per_param if "exp_avg_sq" in st)  # vectors only
    assert {int(st["step"]) for st in per_param} == {STEPS}
    assert {t.dtype for st in per_param for t in st.values() if torch.is_tensor(t)} == {torch.float32}
    assert {t.dtype for g in opt["fp32_groups"] for t in g} == {torch.float32}
    assert {t.dtype for t in states["module"].values()} == {torch.bfloat16}
    assert losses(work / "adafactor-z0")[STEPS] < losses(work / "adafactor-z0")[1]
