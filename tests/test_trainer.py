"""The real trainer (train/trainer/loop.py on DeepSpeed, CPU): single-process runs of CD, ND and ED with
their accounting; 2-process ZeRO-1/2/3 against the 1-process loss curve; SIGKILL at a random
step and during a save, then a bitwise-identical finish; a 2-process checkpoint resumed on 1
process; bad configurations refused by the CLI before any work.

Cost control (2 CPU cores, a DeepSpeed launch is ~10 s of imports): all 2-process runs share one
`torchrun` launch (tests/workers/trainer_worker.py runs them in turn); runs that need no process
of their own run in this process (`train(cfg)`); the kill test launches `python -m train train`
twice (both killed) and the CLI test once. Every process uses one thread (2 processes x 2
threads on 2 cores make each step ~20x slower). The data is a tiny synthetic corpus written
here with the byte tokenizer (nothing to train, tokenized in well under a second), cached in
this module's temporary directory: no dependence on ~/.cache and nothing slow on a fresh CI
machine.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6  # optimizer steps of the loss-curve runs
LOSS_TOL = 1e-5  # fp32: different reduction orders only (seen: 0 to ~1e-7)
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")


def clean_env(**extra) -> dict:
    """This process's environment for a process it starts, without the rendezvous variables (a
    world of one run in this process may have set them: a child would take them for a
    launcher's and bind the same port), with `extra` on top."""
    return {**{k: v for k, v in os.environ.items() if k not in DIST_ENV}, **extra}


# ----------------------------------------------------------------------------------------------
# shared set-up
# ----------------------------------------------------------------------------------------------

def _write_corpus(d: Path, n_docs: int = 24, seed: int = 0) -> None:
    """Short synthetic documents (a few hundred words from a small vocabulary): learnable, and a
    few dozen 64-token pieces each, so packing a batch is cheap."""
    r = random.Random(seed)
    words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 8))) for _ in range(150)]
    d.mkdir(parents=True)
    for i in range(n_docs):
        sentences = []
        for _ in range(r.randint(10, 30)):
            sentences.append(" ".join(r.choice(words) for _ in range(r.randint(4, 14))).capitalize() + ".")
        (d / f"doc{i:03d}.txt").write_text(" ".join(sentences) + "\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("trainer")
    _write_corpus(w / "corpus")
    (w / "tmp").mkdir()  # TMPDIR of the launched processes (torchrun leaves torchelastic_* there)
    return w


def base_overrides(work: Path) -> list[str]:
    """Overrides every run here shares: tiny data, debug model, short rows, loss logged every step."""
    return [
        "data.source=files", f"data.train_files={json.dumps([str(work / 'corpus' / '*.txt')])}",
        "data.tokenizer=builtin-bytes", f"data.cache_dir={work / 'cache'}", "data.eval_fraction=0.1",
        "model.size=debug", "objective.seq_length=64", "parallel.micro_batch_size=2",
        "optim.lr=3e-3", "schedule.name=constant", "logging.every_n_steps=1", "logging.progress_bar=false",
        "eval.num_batches=1", "eval.every_n_steps=0", "checkpoint.keep_last=0",
    ]


@pytest.fixture(scope="module")
def base(work) -> list[str]:
    return base_overrides(work)


def _env(work: Path, **extra) -> dict:
    """Environment of a launched process: CPU, one thread, TMPDIR inside the test's directory, and
    none of the rendezvous variables an in-process run of this module put into os.environ."""
    env = {k: v for k, v in clean_env().items() if k != "ARCHSCALE_TEST_SAVE_DELAY"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TMPDIR=str(work / "tmp"),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p), **extra)
    return env


@pytest.fixture(scope="module")
def inproc():
    """Runs of train() inside this process: one thread, and afterwards the process group and the
    environment put back as they were (other test modules may launch processes of their own;
    DS_ACCELERATOR=cpu also on a machine with a GPU: compared with CPU processes)."""
    from rehearse import inprocess  # rehearse imports this module: import it when the fixture runs

    with inprocess():
        yield


def run_inproc(overrides: list[str], **kw):
    from train.config import load_config
    from train.trainer.loop import train

    return train(load_config(None, overrides), **kw)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def state(run_dir: Path, step: int | None = None) -> dict:
    ckpts = Path(run_dir) / "checkpoints"
    name = (ckpts / "latest").read_text().strip() if step is None else f"step-{step:08d}"
    return json.loads((ckpts / name / "trainer_state.json").read_text())


def fp32_weights(step_dir: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="engine")


# ----------------------------------------------------------------------------------------------
# 5. single process: CD:FLM, ND:PLM, ED:MLM finish, write their files, and count what they saw
# ----------------------------------------------------------------------------------------------

CELLS = {
    "cd": ["model.arch=cd", "objective.name=flm"],
    "nd": ["model.arch=nd", "objective.name=plm"],
    "ed": ["model.arch=ed", "objective.name=mlm", "objective.inputs_length=64", "objective.targets_length=14"],
}


@pytest.mark.parametrize("arch", list(CELLS))
def test_single_process_run_writes_its_files_and_counts(arch, work, base, inproc):
    from train import registry
    from train.config import load_config
    from train.data import build_stream, prepare
    from train.objectives import pop_counts

    run_dir = work / f"single-{arch}"
    ov = base + CELLS[arch] + [f"run_dir={run_dir}", "schedule.max_steps=4", "parallel.gradient_accumulation_steps=2",
                               "checkpoint.every_n_steps=2", "eval.every_n_steps=2"]
    result = run_inproc(ov)
    assert result.step == 4 and result.stopped_by is None

    assert json.loads((run_dir / "FINISHED").read_text()) == {"step": 4}
    for f in ("config.yaml", "ds_config.json"):
        assert (run_dir / f).is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    for d in ("step-00000002", "step-00000004"):
        for f in ("COMPLETE", "trainer_state.json", "config.yaml", "engine/mp_rank_00_model_states.pt"):
            assert (ckpts / d / f).is_file(), (d, f)
    rec = metrics(run_dir)
    assert [r["step"] for r in rec if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rec if "eval_loss" in r] == [2, 4]
    assert all(r["eval_loss"] > 0 for r in rec if "eval_loss" in r)

    # the accounting equals the sums over the batches of the data stream, recomputed here
    cfg = load_config(None, ov)
    spec = registry.get(arch)
    prepared = prepare(cfg.data, cfg.objective)
    config = spec.make_config(cfg.model, registry.padded_vocab(prepared.tokens.vocab_size))
    stream = build_stream(prepared, cfg.objective, arch, global_batch_size=4, seed=cfg.data.seed, data=cfg.data)
    tokens = targets = 0
    flops = 0.0
    per_step = []
    for _ in range(4):
        b = next(stream)
        counts = pop_counts(b)
        tokens += counts["num_tokens"]
        targets += counts["num_target_tokens"]
        flops += spec.batch_flops(config, b)
        per_step.append((tokens, targets, flops))
    st = state(run_dir)
    assert (st["step"], st["tokens_seen"], st["target_tokens"]) == (4, tokens, targets)
    assert st["flops"] == pytest.approx(flops, rel=1e-12)
    assert 0 < targets < tokens if arch != "cd" else 0 < targets <= tokens
    assert [(r["tokens_seen"], r["target_tokens"], pytest.approx(r["flops"], rel=1e-12))
            for r in rec if "loss" in r] == per_step
    assert (result.tokens_seen, result.target_tokens) == (tokens, targets)
    assert st["world_size"] == 1 and st["config"]["model"]["arch"] == arch


# ----------------------------------------------------------------------------------------------
# 1 + 3. 2 processes: ZeRO-1/2/3 follow 1 process; a 2-process checkpoint resumes on 1
# ----------------------------------------------------------------------------------------------

def curve_overrides(base: list[str], run_dir: Path, zero: int, processes: int) -> list[str]:
    """The same global batch (4 rows) on 1 or 2 processes: micro 2 x accumulation (2 / processes)."""
    return base + [f"run_dir={run_dir}", "model.arch=cd", "objective.name=flm", f"schedule.max_steps={STEPS}",
                   f"parallel.zero_stage={zero}", f"parallel.gradient_accumulation_steps={2 // processes}",
                   "checkpoint.every_n_steps=3"]


@pytest.fixture(scope="module")
def two_process_runs(work, base):
    """One torchrun launch with every 2-process run: ZeRO-1 (+ the rows each rank reads), ZeRO-2
    stopped after 3 steps, copied, and resumed on 2 processes to the end, ZeRO-3."""
    runs = {z: work / f"two-zero{z}" for z in (1, 2, 3)}
    runs.update({k: work / k for k in ("pipe-cd", "pipe-ed")})
    spec = [
        {"overrides": curve_overrides(base, runs[1], 1, 2), "rows": STEPS},
        {"overrides": curve_overrides(base, runs[2], 2, 2), "max_steps_now": 3, "copy_to": str(work / "two-zero2-at3")},
        {"overrides": curve_overrides(base, runs[2], 2, 2)},
        {"overrides": curve_overrides(base, runs[3], 3, 2)},
        # 2 pipeline stages (data-parallel size 1, so accumulation 2 keeps the 4-row global batch):
        # stopped after 3 steps, copied, resumed to the end in the same launch; and ED
        {"overrides": pipe_overrides(base, runs["pipe-cd"]), "max_steps_now": 3, "copy_to": str(work / "pipe-cd-at3")},
        {"overrides": pipe_overrides(base, runs["pipe-cd"])},
        {"overrides": pipe_overrides(base, runs["pipe-ed"], ed=True)},
    ]
    launch_workers(work, spec)
    return runs


def launch_workers(work: Path, spec: list[dict], timeout: int = 600) -> None:
    """Run `spec` (see tests/workers/trainer_worker.py) in one 2-process torchrun launch."""
    (work / "spec.json").write_text(json.dumps(spec))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "tests" / "workers" / "trainer_worker.py"), str(work / "spec.json")],
                       cwd=work, env=_env(work), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    print(f"2-process launch: {time.perf_counter() - t:.1f}s")
    print("\n".join(line for line in p.stdout.splitlines() if line.startswith("trainer_worker:")))


def pipe_overrides(base: list[str], run_dir: Path, ed: bool = False) -> list[str]:
    """2 pipeline stages on 2 processes, ZeRO-1, the loss-curve run's global batch."""
    cell = CELLS["ed"] if ed else ["model.arch=cd", "objective.name=flm"]
    return base + cell + [f"run_dir={run_dir}", f"schedule.max_steps={STEPS}", "parallel.zero_stage=1",
                          "parallel.pipeline_stages=2", "parallel.gradient_accumulation_steps=2",
                          "checkpoint.every_n_steps=3", "eval.every_n_steps=3"]


@pytest.fixture(scope="module")
def one_process_curve(work, base, inproc):
    run_dir = work / "one-zero0"
    run_inproc(curve_overrides(base, run_dir, 0, 1))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_two_processes_follow_the_one_process_loss_curve(zero, two_process_runs, one_process_curve):
    one, two = losses(one_process_curve), losses(two_process_runs[zero])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    diff = max(abs(one[s] - two[s]) for s in one)
    print(f"ZeRO-{zero}: max |loss(1 process) - loss(2 processes)| = {diff:.3g}")
    assert diff <= LOSS_TOL, (one, two)
    assert one[STEPS] < one[1] - 0.05  # it learns (so equal curves mean something)
    norms = [[r["grad_norm"] for r in metrics(d) if "loss" in r] for d in (one_process_curve, two_process_runs[zero])]
    assert all(isinstance(v, float) and v > 0 for v in norms[0] + norms[1]), norms  # ZeRO-0 reports it too
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    s1, s2 = state(one_process_curve), state(two_process_runs[zero])
    assert (s2["step"], s2["world_size"], s1["world_size"]) == (STEPS, 2, 1)
    assert (s1["tokens_seen"], s1["target_tokens"], s1["flops"]) == (s2["tokens_seen"], s2["target_tokens"], s2["flops"])
    assert (two_process_runs[zero] / "FINISHED").is_file()


@pytest.mark.slow
def test_each_rank_reads_its_share_of_the_global_batch(work, base, two_process_runs):
    """Rank r of 2 reads rows [2r, 2r+2) of each 4-row global batch that 1 process reads whole."""
    import hashlib

    from train.config import load_config
    from train.data import build_stream, prepare
    from train.objectives import pop_counts

    run = two_process_runs[1]
    ranks = [json.loads((run / f"rows-rank{r}.json").read_text()) for r in (0, 1)]
    cfg = load_config(None, curve_overrides(base, work / "unused", 1, 1))
    stream = build_stream(prepare(cfg.data, cfg.objective), cfg.objective, "cd", global_batch_size=4,
                          seed=cfg.data.seed, data=cfg.data)
    for i in range(STEPS):
        b = next(stream)
        pop_counts(b)
        whole = [hashlib.sha1(r.numpy().tobytes()).hexdigest()[:16] for r in b["input_ids"]]
        assert ranks[0][i] + ranks[1][i] == whole, i
        assert len(set(whole)) == 4  # four different rows, so the split is not trivially equal


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process(work, base, two_process_runs, inproc):
    """The ZeRO-2 run's step-3 checkpoint (2 processes) continues on 1 process through a universal
    checkpoint, with the same command but for the process count (accumulation 2 instead of 1)."""
    run_dir = work / "two-zero2-at3"
    step3 = run_dir / "checkpoints" / "step-00000003"
    assert state(run_dir)["step"] == 3 and state(run_dir)["world_size"] == 2
    assert not (run_dir / "FINISHED").exists()
    run_inproc(curve_overrides(base, run_dir, 2, 1))
    assert (step3 / "engine_universal" / "COMPLETE").is_file()
    one, two = losses(run_dir), losses(two_process_runs[2])
    assert sorted(one) == list(range(1, STEPS + 1))
    diff = max(abs(one[s] - two[s]) for s in range(4, STEPS + 1))
    print(f"2 -> 1 process resume: max |loss diff| over steps 4-{STEPS} = {diff:.3g}")
    assert diff <= LOSS_TOL, (one, two)
    s1, s2 = state(run_dir), state(two_process_runs[2])
    assert (s1["step"], s1["world_size"]) == (STEPS, 1)
    assert (s1["tokens_seen"], s1["target_tokens"], s1["flops"]) == (s2["tokens_seen"], s2["target_tokens"], s2["flops"])
    w1, w2 = fp32_weights(run_dir / "checkpoints" / f"step-{STEPS:08d}"), \
        fp32_weights(two_process_runs[2] / "checkpoints" / f"step-{STEPS:08d}")
    assert w1.keys() == w2.keys()
    wdiff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"2 -> 1 process resume: max |weight diff| at step {STEPS} = {wdiff:.3g}")
    assert wdiff < 1e-4


# ----------------------------------------------------------------------------------------------
# 2. SIGKILL at a random step, then during a save; resume: bitwise the uninterrupted weights
# ----------------------------------------------------------------------------------------------

KILL_STEPS = 14


def _cli(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "train", "train", *overrides]


def _wait(proc: subprocess.Popen, cond, what: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}:\n{out[-4000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def _logged_step(run_dir: Path) -> int:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in text.splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return max(steps)


def _sigkill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the whole session: nothing of the run survives
    proc.wait(timeout=30)


def kill_overrides(base: list[str], run_dir: Path) -> list[str]:
    """ND:PLM, ZeRO-1 (sharded optimizer files), checkpoints every 3 steps (kills land between them),
    keep 2 (pruning runs), held-out loss every 4 steps (eval in the middle of the run)."""
    return base + [f"run_dir={run_dir}", "model.arch=nd", "objective.name=plm", "parallel.zero_stage=1",
                   "parallel.gradient_accumulation_steps=2", f"schedule.max_steps={KILL_STEPS}",
                   "checkpoint.every_n_steps=3", "checkpoint.keep_last=2", "eval.every_n_steps=4"]


@pytest.fixture(scope="module")
def uninterrupted(work, base, inproc) -> Path:
    """The uninterrupted run: in this process (one launch less; one thread, as the launched runs)."""
    run_inproc(kill_overrides(base, work / "uninterrupted"))
    return work / "uninterrupted"


def assert_same_run(ref: Path, run: Path) -> None:
    """Final weights bitwise equal, every logged loss bitwise equal and logged once, same counts."""
    final = f"step-{KILL_STEPS:08d}"
    w_ref, w_run = fp32_weights(ref / "checkpoints" / final), fp32_weights(run / "checkpoints" / final)
    assert w_ref.keys() == w_run.keys() and w_ref
    different = [k for k in w_ref if not torch.equal(w_ref[k], w_run[k])]
    assert not different, different
    assert losses(ref) == losses(run)
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, KILL_STEPS + 1))
    s_ref, s_run = state(ref), state(run)
    for k in ("step", "tokens_seen", "target_tokens", "flops", "data_position"):
        assert s_ref[k] == s_run[k], k


@pytest.mark.slow
def test_sigkill_at_a_random_step_and_during_a_save_then_resume_is_bitwise_exact(work, base, uninterrupted):
    from train.trainer.checkpointing import find_resume_point, list_checkpoints

    def overrides(run_dir):
        return kill_overrides(base, run_dir)

    def launch(run_dir, **env):
        return subprocess.Popen(_cli(overrides(run_dir)), cwd=work, env=_env(work, **env), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    run = work / "kill-run"

    # 1. SIGKILL once the run has logged a step drawn from a fixed seed (checkpoints every 3 steps)
    kill_at = random.Random(4).randint(4, KILL_STEPS - 4)  # >= 4: step 3 is saved
    p = launch(run)
    _wait(p, lambda: _logged_step(run) >= kill_at, f"step {kill_at}")
    _sigkill(p)
    assert not (run / "FINISHED").exists()
    killed_at = _logged_step(run)
    assert killed_at < KILL_STEPS
    before = [s for s, _ in list_checkpoints(run / "checkpoints")]
    print(f"killed at step {killed_at} (aimed at {kill_at}); complete checkpoints {before}")

    # 2. resume, and SIGKILL it inside its first save (the test hook sleeps after the engine files)
    # a .tmp the first kill may have left predates this; the new save comes seconds (imports) after
    started = time.time() + 1.0
    p = launch(run, ARCHSCALE_TEST_SAVE_DELAY="60")
    resumed_from = max(before)

    def saving() -> list[Path]:
        return [d for d in (run / "checkpoints").glob("step-*.tmp")
                if int(d.name[5:13]) > resumed_from and any((d / "engine").glob("*optim_states.pt"))
                and (d / "engine").stat().st_mtime >= started]

    _wait(p, lambda: bool(saving()), "a save in progress")
    _sigkill(p)
    tmp = saving()[0]
    assert not (tmp / "COMPLETE").exists()
    prev = find_resume_point(run, "auto")
    assert prev is not None and int(prev.name[5:]) == resumed_from == max(s for s, _ in list_checkpoints(run / "checkpoints"))
    assert (run / "checkpoints" / "latest").read_text().strip() == prev.name
    assert fp32_weights(prev)  # the previous checkpoint still loads

    # 3. resume (in this process, as the reference): it starts from that checkpoint, ends bitwise exact
    result = run_inproc(overrides(run))
    assert result.losses[0][0] == resumed_from + 1
    assert (run / "FINISHED").is_file()
    assert_same_run(uninterrupted, run)


def test_sigusr1_saves_and_stops_then_resume_is_bitwise_exact(work, base, uninterrupted):
    """SIGUSR1 (Slurm's warning before the time limit) mid-run: the run saves at the step it is
    at, returns with stopped_by set, and the same command finishes it exactly."""
    import threading

    run = work / "sigusr1-run"
    sent = threading.Event()

    def send_when_step_2_is_logged():
        end = time.monotonic() + 120
        while _logged_step(run) < 2 and time.monotonic() < end:
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGUSR1)
        sent.set()

    old = signal.signal(signal.SIGUSR1, lambda *a: None)  # a signal after the run must not end pytest
    try:
        threading.Thread(target=send_when_step_2_is_logged, daemon=True).start()
        result = run_inproc(kill_overrides(base, run))
        sent.wait(30)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert result.stopped_by == "SIGUSR1" and 2 <= result.step < KILL_STEPS
    assert state(run)["step"] == result.step  # saved where it stopped
    assert not (run / "FINISHED").exists()
    stopped_at = result.step
    result = run_inproc(kill_overrides(base, run))
    assert result.stopped_by is None and result.losses[0][0] == stopped_at + 1
    assert_same_run(uninterrupted, run)


# ----------------------------------------------------------------------------------------------
# 4. bad configurations: one line on stderr, exit 2, nothing written, no data prepared
# ----------------------------------------------------------------------------------------------

BAD = {
    "unknown_key": (["optim.lrr=0.1"], "unknown key 'optim.lrr'"),
    "batch_does_not_divide": (["parallel.global_batch_size=5"], "parallel.global_batch_size=5 is not divisible"),
    "batch_contradicts": (["parallel.global_batch_size=6", "parallel.gradient_accumulation_steps=2"],
                          "parallel.global_batch_size=6 != micro_batch_size x gradient_accumulation_steps"),
    "more_stages_than_layers": (["parallel.pipeline_stages=3"], "more than the model's 2 layers"),
    "zero2_with_pipeline": (["parallel.pipeline_stages=2", "parallel.zero_stage=2"],
                            "DeepSpeed's pipeline engine refuses ZeRO-2"),
    "bad_model_option": (["model.overrides.n_layer=4"], "unknown model option(s) n_layer"),
    "resume_from_nothing": (["checkpoint.resume=/nonexistent/step-00000010"], "no such path"),
}


def _bad_overrides(work: Path, name: str) -> tuple[list[str], Path, Path]:
    run_dir, cache = work / f"bad-{name}", work / f"bad-cache-{name}"
    return (["data.tokenizer=builtin-bytes", f"data.cache_dir={cache}", f"run_dir={run_dir}", "schedule.max_steps=2",
             *BAD[name][0]], run_dir, cache)


def test_bad_config_fails_in_the_cli_process_before_any_work(work):
    """A real `python -m train train`: exit status 2, one line on stderr. (The checks after the
    config is loaded cost a launch of ~10 s of imports; the next test runs them all in process.)"""
    name = "unknown_key"
    overrides, run_dir, cache = _bad_overrides(work, name)
    p = subprocess.run(_cli(overrides), cwd=work, env=_env(work), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and BAD[name][1] in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert not run_dir.exists() and not cache.exists()  # nothing written, no data prepared


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_fails_with_one_line(name, work, capsys, inproc):
    from train.cli import main

    overrides, run_dir, cache = _bad_overrides(work, name)
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and BAD[name][1] in err, err
    assert not run_dir.exists() and not cache.exists()


# ----------------------------------------------------------------------------------------------
# pipeline parallelism through the trainer: 2 stages follow 1 process, resume, export
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("ed", [False, True])
def test_two_stage_pipeline_follows_one_process(ed, work, base, two_process_runs, inproc):
    pipe = two_process_runs["pipe-ed" if ed else "pipe-cd"]
    ref = work / ("one-ed-ref" if ed else "one-cd-ref")
    ov = [o for o in pipe_overrides(base, ref, ed) if not o.startswith("parallel.pipeline_stages")]
    run_inproc(ov)  # the same run unpipelined (ZeRO-1, 1 process)
    one, two = losses(ref), losses(pipe)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    diff = max(abs(one[s] - two[s]) for s in one)
    print(f"{'ED' if ed else 'CD'} 2-stage pipeline: max |loss diff| = {diff:.3g}")
    assert diff <= LOSS_TOL
    s1, s2 = state(ref), state(pipe)
    assert (s1["tokens_seen"], s1["target_tokens"], s1["flops"]) == (s2["tokens_seen"], s2["target_tokens"], s2["flops"])
    ev1 = [r["eval_loss"] for r in metrics(ref) if "eval_loss" in r]
    ev2 = [r["eval_loss"] for r in metrics(pipe) if "eval_loss" in r]
    assert len(ev1) == len(ev2) == 2 and ev1 == pytest.approx(ev2, rel=1e-3)  # pipeline: mean over micro-batches
    # the pipeline checkpoint exports to the same weights as the unpipelined run's
    from train.trainer.weights import checkpoint_dir, load_model

    m1, _, _ = load_model(checkpoint_dir(ref))
    m2, _, _ = load_model(checkpoint_dir(pipe))
    w1, w2 = m1.state_dict(), m2.state_dict()
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5


@pytest.mark.slow
def test_pipeline_resume_matches_and_refuses_an_unpipelined_resume(work, base, two_process_runs, inproc):
    """The CD pipeline run stopped at step 3 and resumed (same launch) logs each step once, equal to
    1 process; its step-3 copy refuses to resume without a pipeline, naming both layouts."""
    from train.config import ConfigError

    pipe = two_process_runs["pipe-cd"]
    rec = [r["step"] for r in metrics(pipe) if "loss" in r]
    assert rec == list(range(1, STEPS + 1))
    at3 = work / "pipe-cd-at3"
    assert state(at3)["step"] == 3
    ov = [o for o in pipe_overrides(base, at3) if not o.startswith("parallel.pipeline_stages")]
    with pytest.raises(ConfigError, match="pipeline_stages=2; this run has 1"):
        run_inproc(ov)


def test_signal_during_start_up_stops_before_the_first_step(work, base, inproc, monkeypatch):
    """SIGUSR1 while the run is still starting (here: as the process group comes up) does not
    kill the process: the run returns stopped_by before its first step, without a checkpoint."""
    from train.engine import runtime as eng

    real = eng.setup_distributed

    def setup_then_signal():
        os.kill(os.getpid(), signal.SIGUSR1)
        return real()

    monkeypatch.setattr(eng, "setup_distributed", setup_then_signal)
    run_dir = work / "signal-at-start"
    result = run_inproc(base + CELLS["cd"] + [f"run_dir={run_dir}", "schedule.max_steps=4"])
    assert (result.stopped_by, result.step) == ("SIGUSR1", 0)
    assert not list((run_dir / "checkpoints").glob("step-*")) and not (run_dir / "FINISHED").exists()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is put back


def test_init_from_checkpoint_records_the_parent_and_can_take_its_optimizer(work, base, inproc):
    """NC-A's first move: a CD run's weights (and, asked for, its AdamW moments) start an ND run;
    the child's checkpoints name the parent and its cost."""
    parent = work / "init-parent"
    run_inproc(base + CELLS["cd"] + [f"run_dir={parent}", "schedule.max_steps=3"])
    child = work / "init-child"
    run_inproc(base + ["model.arch=nd", "objective.name=plm", f"run_dir={child}", "schedule.max_steps=3",
                       f"init.from_checkpoint={parent}", "init.load_optimizer=true"], max_steps_now=0)
    p, c = state(parent), state(child, 0)
    assert c["init"]["checkpoint"] == str((parent / "checkpoints" / "step-00000003").resolve())
    assert (c["init"]["step"], c["init"]["tokens_seen"], c["init"]["flops"]) == (3, p["tokens_seen"], p["flops"])
    load = lambda d: torch.load(d / "engine" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    po, co = load(parent / "checkpoints" / "step-00000003"), load(child / "checkpoints" / "step-00000000")
    for k, v in po["module"].items():
        assert torch.equal(v, co["module"][k]), k
    moments = [(a["exp_avg"], b["exp_avg"]) for a, b in zip(po["optimizer"]["state"].values(),
                                                             co["optimizer"]["state"].values())]
    assert moments and all(torch.equal(a, b) for a, b in moments)


PORT_PROBE = r"""
import os, socket, sys
import train.engine.runtime as rt
busy = socket.socket(); busy.bind(("127.0.0.1", 0)); busy.listen(); taken = busy.getsockname()[1]
mode = sys.argv[1]
if mode == "user":
    os.environ["MASTER_PORT"] = str(taken)
picks = iter([taken])
real_pick = rt._free_port
rt._free_port = lambda: next(picks, None) or real_pick()
try:
    rt.setup_distributed()
except Exception as e:
    print("raised", type(e).__name__, "EADDRINUSE" in str(e)); sys.exit(0)
print("port", taken, os.environ["MASTER_PORT"])
rt.teardown_distributed()
"""


@pytest.mark.parametrize("mode", ["picked", "user"])
def test_a_world_of_one_repicks_a_port_taken_after_its_pick(mode, tmp_path):
    """A port the process picked and another process took before the store bound it (the cluster
    rehearsal's reference run met this) is picked again; a port the user set is never changed."""
    out = subprocess.run([sys.executable, "-c", PORT_PROBE, mode], env=clean_env(DS_ACCELERATOR="cpu"),
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    words = out.stdout.split()
    assert out.returncode == 0 and words, out.stderr[-2000:]
    if mode == "picked":
        assert words[0] == "port" and words[1] != words[2], out.stdout
    else:
        assert words == ["raised", "DistNetworkError", "True"], out.stdout + out.stderr[-2000:]


ENV_PROBE = r"""
import json, os, sys
import train.engine.runtime as rt
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
if sys.argv[1] == "user":
    os.environ["MASTER_ADDR"] = "127.0.0.1"
before = {k: os.environ.get(k) for k in keys}
rt.setup_distributed()
during = {k: os.environ.get(k) for k in keys}
rt.teardown_distributed()
after = {k: os.environ.get(k) for k in keys}
rt.setup_distributed()  # a second world of one in the same process picks its own port again
again = os.environ.get("MASTER_PORT")
rt.teardown_distributed()
print(json.dumps([before, during, after, again, os.environ.get("RANK")]))
"""


@pytest.mark.parametrize("mode", ["bare", "user"])
def test_teardown_puts_back_the_rendezvous_variables_a_world_of_one_set(mode):
    """A world of one sets RANK, MASTER_PORT, ...; after teardown they are gone (a process started
    next, such as the cluster rehearsal's reference run, took them for a launcher's and bound the
    same port: EADDRINUSE in CI), and a variable the user had set is left as it was."""
    out = subprocess.run([sys.executable, "-c", ENV_PROBE, mode], env=clean_env(DS_ACCELERATOR="cpu"),
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    before, during, after, again, rank = json.loads(out.stdout.splitlines()[-1])
    assert during["RANK"] == "0" and during["WORLD_SIZE"] == "1" and during["MASTER_PORT"]
    assert after == before and rank is None
    assert before["MASTER_ADDR"] == ("127.0.0.1" if mode == "user" else None)
    assert again and again.isdigit()
