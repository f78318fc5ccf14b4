"""The Slurm launchers against a real single-node Slurm cluster (slurm/local_cluster.sh).

The trainer is played by a stand-in program (STANDIN below) that keeps the trainer's side of the
contract: it counts steps, keeps RUN/checkpoints/latest, saves and exits on USR1 or TERM, resumes
from the latest checkpoint and writes RUN/FINISHED at the end. Every job that takes a while is
submitted at once by the `launched` fixture, so they run side by side (the node declares 8 CPUs)
while the quick tests run; each slow test then polls for its own job's outcome.

The real trainer (`python -m train train`, on the CPU) runs two jobs (the `real` fixture): a tiny
run submitted with `archscale submit`, and a run cut by its two-minute time limit that must save,
requeue, resume and end with the same weights as an uninterrupted run of the same config (which
runs beside it, outside Slurm).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import random
import re
import statistics
import threading
import socket
import subprocess
import sys
import time

import pytest

import slurm
from slurm import Resources, cluster
from slurm.render import compress
from rehearse import clean_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "local_cluster.sh"

STANDIN = r'''
"""Stand-in trainer: counts steps, keeps checkpoints/latest, saves and exits on USR1/TERM."""
import json, os, pathlib, signal, sys, time

kv = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)  # argv: CONFIG a=b ... run_dir=RUN
run = pathlib.Path(kv["run_dir"])
steps, dt, mode = int(kv.get("steps", 10)), float(kv.get("dt", 0.05)), kv.get("mode", "ok")
rank = int(os.environ.get("RANK", 0))
ckpt = run / "checkpoints" / "latest"
ckpt.parent.mkdir(parents=True, exist_ok=True)
step = int(ckpt.read_text().split("-")[1]) if ckpt.exists() else 0
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))


def event(kind, **kw):
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID")}
    rec = {"event": kind, "time": time.time(), "step": step, "rank": rank, "config": sys.argv[1],
           "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)), **env, **kw}
    with open(run / "events.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def save():
    if rank == 0:
        tmp = ckpt.with_suffix(".tmp")
        tmp.write_text(f"step-{step:08d}\n")
        tmp.replace(ckpt)


event("start", overrides=sys.argv[2:])
restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
first_crash = kv.get("crash_first_run") == "1" or ("seed" in kv and kv.get("crash_first_run_of_seed") == kv["seed"])
if mode == "crash" or (first_crash and restart == 0):
    event("crash")
    sys.exit(3)
while step < steps:
    if got:
        save()
        event("saved", signal=got[0])
        sys.exit(0)
    time.sleep(dt)
    step += 1
    if step % 10 == 0:
        save()
save()
event("end")
if rank == 0:
    (run / "FINISHED").write_text("")
'''


# ---------------------------------------------------------------- helpers
def wait_for(pred, timeout: float, what: str, logs: pathlib.Path | None = None):
    """Poll pred() every 0.5 s until it returns something truthy; fail with `what` (and the job
    logs under `logs`) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = ""
            if logs is not None:
                detail = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(logs.rglob("*.out")))
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{detail}")
        time.sleep(0.5)


# States a job ends in (PREEMPTED is not one: a --requeue job comes back).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def final_state(job_id: str) -> str | None:
    """The job's state once it has ended (None while queued, running, being requeued or in any
    passing state: a job that requeues itself goes through several)."""
    state = cluster.job_states([job_id]).get(job_id, (None,))[0]
    word = state.split()[0].rstrip("+") if state else None
    return word if word in ENDED else None


def settled_state(job_id: str) -> str | None:
    """final_state, read twice a second apart (a requeueing job passes through several states)."""
    state = final_state(job_id)
    if state:
        time.sleep(1)
        return state if final_state(job_id) == state else None
    return None


def events(run_dir) -> list[dict]:
    p = pathlib.Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


# ---------------------------------------------------------------- the cluster (tests/conftest.py's slurm_cluster)
@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> list[str]:
    """The `entry` that replaces `-m train train`: the stand-in trainer script."""
    path = tmp_path_factory.mktemp("standin") / "standin.py"
    path.write_text(STANDIN)
    return [str(path)]


@pytest.fixture(scope="module")
def launched(slurm_cluster, standin, tmp_path_factory):
    """Submit every slow job at once; the tests below wait for their own."""
    base = tmp_path_factory.mktemp("jobs")
    jobs = {"base": base, "entry": standin}
    cfg = str(base / "config.yaml")
    pathlib.Path(cfg).write_text("# the stand-in ignores its config\n")
    jobs["cfg"] = cfg
    # USR1 25 s before a 1-minute limit: slurmctld signals at its first limit check (every 30 s) that
    # finds less than 25 + 30 s left, so 5-35 s after each start (not at once, before the stand-in has
    # installed its handler); 40 s of work therefore needs at least one requeue.
    jobs["timelimit"] = slurm.submit(
        cfg, ["steps=400", "dt=0.1"], run_dir=base / "timelimit", entry=standin,
        resources=Resources(time="1", signal_seconds=25, max_restarts=6))
    jobs["crash"] = slurm.submit(cfg, ["mode=crash"], run_dir=base / "crash", entry=standin,
                                 resources=Resources(max_restarts=2))
    jobs["ranks"] = slurm.submit(cfg, ["steps=20"], run_dir=base / "ranks", entry=standin,
                                 resources=Resources(gpus_per_node=2, time="5", signal_seconds=60))
    sweep = slurm.Sweep(dir=base / "sweep", config=cfg, grid={"model.arch": ["cd", "nd"], "seed": [0, 1]},
                        overrides=["steps=30", "crash_first_run_of_seed=1"], concurrency=2, entry=standin, name="tiny")
    jobs["sweep"] = sweep, slurm.submit_sweep(sweep)
    # pretrain crashes in its first run and requeues itself: its dependents must keep waiting
    stages = [slurm.Stage(cfg, base / f"chain/{n}", ["steps=10", f"crash_first_run={int(n == 'pretrain')}"],
                          entry=standin, name=n) for n in ("pretrain", "adapt", "finetune")]
    jobs["chain"] = slurm.submit_chain(stages)
    bad = [slurm.Stage(cfg, base / "badchain/pretrain", ["mode=crash"], Resources(max_restarts=0), standin),
           slurm.Stage(cfg, base / "badchain/adapt", [], entry=standin),
           slurm.Stage(cfg, base / "badchain/eval", [], entry=standin)]
    jobs["badchain"] = slurm.submit_chain(bad)
    return jobs


# ---------------------------------------------------------------- the real trainer
# CPU, one thread per process (the same numbers in and outside Slurm, and room on 2 cores).
REAL_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
# The time-limited run: --time=2 and USR1 41 s before. Slurm signals at its first limit check (every
# 30 s) that finds less than 41 + 30 s left, so 49-79 s after the start: late enough for the
# trainer's start-up (20-30 s on 2 busy cores; a signal before its handlers are installed would end
# it unsaved) and, with 150 s of steps at the tiny run's pace (its first steps are slower than the
# long run's: 80 s of them once ran in 65 s), always before the end of the run.
LONG_RUN = dict(time="2", signal_seconds=41)
LONG_RUN_SECONDS = 150


def _corpus(path: pathlib.Path) -> None:
    """A small text corpus (fixed words, fixed seed): tokenizing it takes a fraction of a second."""
    rng = random.Random(0)
    words = ("the of and to in model train data step token loss layer attention encoder decoder prefix "
             "mask span objective batch job signal checkpoint resume").split()
    paras = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) + "." for _ in range(400)]
    path.write_text("\n\n".join(paras) + "\n")


def _step_seconds(run_dir: pathlib.Path) -> float | None:
    """The median seconds per step of a run logged every step (metrics.jsonl), first step excluded."""
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return None
    recs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("tokens_per_s")]
    dts = [(b["tokens_seen"] - a["tokens_seen"]) / b["tokens_per_s"] for a, b in zip(recs, recs[1:])]
    return statistics.median(dts) if dts else None


def _weights(ckpt_dir: pathlib.Path) -> pathlib.Path:
    return ckpt_dir / "engine" / "mp_rank_00_model_states.pt"


def _tail(path: pathlib.Path, n: int = 4000) -> str:
    return f"--- {path}\n{path.read_text(errors='replace')[-n:]}" if path.exists() else f"--- {path}: missing"


@pytest.fixture(scope="module")
def real(slurm_cluster, tmp_path_factory):
    """Real training jobs. First a tiny run through `archscale submit` (it also tokenizes the corpus
    into the shared cache and times a step); then, side by side, a run long enough for its time
    limit to cut it, and the same run uninterrupted in this process's machine (the reference)."""
    base = tmp_path_factory.mktemp("real")
    corpus, cache = base / "corpus.txt", base / "cache"
    _corpus(corpus)
    cfg = base / "run.yaml"
    cfg.write_text(
        "model: {arch: cd, size: debug}\n"
        "objective: {name: flm, seq_length: 64}\n"
        f"data: {{source: files, train_files: [{corpus}], text_sample_by: paragraph, tokenizer: builtin-bytes, "
        f"cache_dir: {cache}}}\n"
        "parallel: {micro_batch_size: 2}\n"
        "eval: {every_n_steps: 0, num_batches: 1}\n"
        "logging: {every_n_steps: 1, progress_bar: false, tensorboard: false}\n")
    jobs = {"base": base, "cfg": cfg}

    # 1. the tiny run, as a user submits it
    tiny = base / "tiny"
    p = subprocess.run([sys.executable, "-m", "train", "submit", str(cfg), "schedule.max_steps=12",
                        "checkpoint.every_n_steps=4", "--run-dir", str(tiny), "--time", "10",
                        *(f"--env={k}={v}" for k, v in REAL_ENV.items())],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    jobs["tiny"] = tiny, p.stdout.strip()
    wait_for(lambda: final_state(jobs["tiny"][1]), 240, f"the tiny training job {jobs['tiny'][1]}", tiny)

    # 2. a run that the time limit cuts: as many steps as LONG_RUN_SECONDS take at the tiny run's pace
    step_s = _step_seconds(tiny) or 0.2
    steps = min(max(math.ceil(LONG_RUN_SECONDS / step_s), 150), 12000)
    overrides = [f"schedule.max_steps={steps}", "checkpoint.every_n_steps=100"]
    jobs["steps"], jobs["step_s"] = steps, step_s
    jobs["long"] = long = slurm.submit(str(cfg), overrides, run_dir=base / "long", env=REAL_ENV,
                                       resources=Resources(**LONG_RUN, max_restarts=6))
    # Once the time limit has cut it and it has saved, give the job 10 minutes (as root may), so the
    # resumed run finishes instead of being cut every minute: one cut is what this test is about,
    # the stand-in's test covers many. Best effort: without the right, it is cut a few times more.
    stop = threading.Event()

    def extend():
        log = long.run_dir / "slurm" / f"job-{long.job_id}.out"
        while not stop.wait(0.5):
            if log.exists() and "stopped by SIGUSR1 at step" in log.read_text(errors="replace"):
                r = subprocess.run(["scontrol", "update", f"JobId={long.job_id}", "TimeLimit=10"],
                                   capture_output=True, text=True)
                jobs["extended"] = r.returncode == 0 or r.stderr
                return

    watcher = threading.Thread(target=extend, daemon=True)
    watcher.start()
    ref = base / "ref"
    log = open(base / "ref.log", "w")
    jobs["ref"] = ref, subprocess.Popen(
        [sys.executable, "-m", "train", "train", str(cfg), *overrides, f"run_dir={ref}"], cwd=base,
        env=clean_env(**REAL_ENV), stdout=log, stderr=subprocess.STDOUT)
    yield jobs
    stop.set()
    for job_id in (long.job_id, jobs["tiny"][1]):  # a failed test leaves no job behind
        if final_state(job_id) is None:
            subprocess.run(["scancel", job_id], capture_output=True)
    proc = jobs["ref"][1]
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_cluster_up_and_jobs_queued(launched):
    parts = cluster.partitions()
    assert parts["debug"].default and parts["debug"].gpus_per_node == 2
    for key in ("timelimit", "crash", "ranks"):
        assert launched[key].job_id.isdigit()
    # the rendered script lives in the run directory; the submission is recorded
    sub = launched["ranks"]
    assert sub.script_path == sub.run_dir / "slurm" / "job.sh" and sub.script_path.read_text() == sub.script
    assert slurm.submit.__module__  # the API is importable from the package root


def test_real_jobs_started(real):
    """Sets up the real trainer's jobs early (the tiny one has run), so they run beside the rest."""
    assert real["long"].job_id.isdigit() and real["ref"][1].pid
    assert (real["tiny"][0] / "FINISHED").exists() or final_state(real["tiny"][1])


# ---------------------------------------------------------------- rendering (no cluster needed)
def test_rendered_script_is_thin_and_complete(tmp_path):
    cmd = slurm.trainer_command("cfg.yaml", ["model.arch=nd", "optim.lr=3e-4"], tmp_path / "run")
    assert cmd[1:] == ["-m", "train", "train", "cfg.yaml", "model.arch=nd", "optim.lr=3e-4",
                       f"{slurm.RUN_DIR_KEY}={tmp_path / 'run'}"]
    res = Resources(nodes=2, gpus_per_node=4, time="2:00:00", partition="gpu", account="proj",
                    signal_seconds=120, max_restarts=5)
    s = slurm.render_job(cmd, tmp_path / "run", res, after="41")
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --time=2:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --dependency=afterok:41", "#SBATCH --kill-on-invalid-dep=yes",
                 f"#SBATCH --output={tmp_path}/run/slurm/job-%j.out", "MAX_RESTARTS=5"]:
        assert line in s.splitlines(), line
    # rendezvous: first host of the node list, a port from the job id
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in s
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 12000))" in s
    # signals are trapped and forwarded to srun, which runs in the background so the trap can run
    assert "trap 'forward USR1' USR1" in s and "trap 'forward TERM' TERM" in s
    assert "srun --kill-on-bad-exit=1" in s and "model.arch=nd optim.lr=3e-4" in s
    assert 'wait "$child"' in s and 'scontrol requeue "$JOB"' in s
    # an array task requeues itself alone: the bare array id would requeue every task of the array
    assert 'JOB=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}}' in s
    assert "SLURM_RESTART_COUNT" in s
    # no training logic in bash: the script is short and calls one Python entry point
    assert len(s.splitlines()) < 80 and s.count("-m train train") == 1
    # without GPUs: one task per node, no --gpus line, and valid bash
    s0 = slurm.render_job(cmd, tmp_path / "run")
    assert "#SBATCH --ntasks-per-node=1" in s0 and "--gpus" not in s0 and "--dependency" not in s0
    script = tmp_path / "job.sh"
    script.write_text(s)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_render_refuses_paths_sbatch_cannot_take(tmp_path):
    with pytest.raises(ValueError, match="whitespace"):
        slurm.render_job(["x"], tmp_path / "my run")
    with pytest.raises(slurm.SlurmError, match="whitespace"):
        slurm.submit("c.yaml", run_dir=tmp_path / "a b", dry_run=True)


def test_array_syntax_and_times():
    assert compress([0, 1, 2, 5, 7, 8]) == ["0-2", "5", "7-8"]
    assert cluster.parse_time("90") == 5400 and cluster.parse_time("1:30:00") == 5400
    assert cluster.parse_time("1-02:00:00") == 93600 and cluster.parse_time("2-3") == 183600
    assert cluster.parse_time("10:30") == 630 and cluster.parse_time("infinite") is None
    assert cluster.gpus_in("gpu:a100:4(S:0-1),gpu:v100:2,shard:8") == 6
    assert cluster.gpus_in("(null)") == 0


def test_dry_run_submits_nothing(tmp_path, monkeypatch):
    def no_slurm(*a, **k):
        raise AssertionError(f"a dry run ran a Slurm command: {a}")
    monkeypatch.setattr(cluster, "run", no_slurm)
    run_dir = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("schedule: {max_steps: 5}\n")
    sub = slurm.submit(str(cfg), ["model.arch=nd"], run_dir=run_dir, dry_run=True)
    assert sub.job_id is None and sub.script_path is None and sub.script.startswith("#!/bin/bash")
    assert f"-m train train {cfg} model.arch=nd run_dir={run_dir}" in sub.script
    assert not run_dir.exists()
    from slurm.cli import main_submit
    assert main_submit([str(cfg), "model.arch=nd", "--run-dir", str(run_dir), "--dry-run"]) == 0
    # no config file: the defaults and the overrides, as `archscale train a.b=c` takes them
    assert main_submit(["schedule.max_steps=5", "--run-dir", str(run_dir), "--dry-run", "--env", "A_B=c d"]) == 0
    assert not run_dir.exists()


def test_sweep_cells_and_yaml(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("{}\n")
    (tmp_path / "grid.yaml").write_text(
        "config: base.yaml\nconcurrency: 3\noverrides: [schedule.max_steps=100]\n"
        "grid:\n  model.arch: [cd, nd, ed]\n  objective.name: [plm, mlm]\n  model.size: [debug]\n  seed: [0, 1]\n"
        "slurm: {gpus-per-node: 1, time: '04:00:00'}\n")
    sweep = slurm.Sweep.from_yaml(tmp_path / "grid.yaml")
    cells = sweep.cells()
    assert len(cells) == 12 and len({c["run_dir"] for c in cells}) == 12
    assert cells[0]["name"] == "cd-plm-debug-seed0"
    assert cells[0]["overrides"] == ["schedule.max_steps=100", "model.arch=cd", "objective.name=plm",
                                     "model.size=debug", "seed=0"]
    assert sweep.dir == tmp_path / "runs" / "grid" and sweep.resources.gpus_per_node == 1
    sub = slurm.submit_sweep(sweep, dry_run=True)
    assert "#SBATCH --array=0-11%3" in sub.script and "SLURM_ARRAY_TASK_ID" in sub.script
    assert not sweep.dir.exists()
    from slurm.cli import main_sweep
    assert main_sweep([str(tmp_path / "grid.yaml"), "--dry-run", "--time", "30"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --time=30" in out and "# cell 11: ed-mlm-debug-seed1: schedule.max_steps=100" in out
    assert not sweep.dir.exists()
    # a cell whose objective does not fit its architecture: the registry's line, before anything is written
    (tmp_path / "edflm.yaml").write_text("config: base.yaml\noverrides: [schedule.max_steps=100]\n"
                                         "grid: {model.arch: [cd, ed], objective.name: [flm]}\n")
    with pytest.raises(slurm.SlurmError, match="cell ed-flm: bad config: objective 'flm' does not fit arch 'ed'"):
        slurm.submit_sweep(slurm.Sweep.from_yaml(tmp_path / "edflm.yaml"), dry_run=True)
    (tmp_path / "bad.yaml").write_text("config: base.yaml\ngrid: {seed: [0]}\nsbatch: {}\n")
    with pytest.raises(slurm.SlurmError, match="unknown key.*sbatch"):
        slurm.Sweep.from_yaml(tmp_path / "bad.yaml")


def test_slurm_package_stays_light():
    """`archscale submit` runs on a login node: importing slurm pulls in no torch, no model code."""
    code = ("import sys, slurm, slurm.cli; bad = [m for m in ('torch', 'deepspeed', 'model_zoo', 'numpy') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    layering = pathlib.Path("/work/shared/tools/layering.py")
    if layering.exists():
        subprocess.run([sys.executable, str(layering), str(ROOT), "slurm-light"], check=True,
                       capture_output=True)


# ---------------------------------------------------------------- bad input, against the cluster
def test_bad_input_fails_at_submit_time(slurm_cluster, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("schedule: {max_steps: 5}\n")

    def err(**kw):
        kw.setdefault("run_dir", tmp_path / "run")
        with pytest.raises(slurm.SlurmError) as e:
            slurm.submit(str(cfg), **kw)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "partition 'nope' does not exist; available: debug, long" in err(resources=Resources(partition="nope"))
    assert "3 GPUs per node asked for" in err(resources=Resources(gpus_per_node=3))
    assert "at most 2" in err(resources=Resources(gpus_per_node=3))
    assert "2 nodes asked for" in err(resources=Resources(nodes=2))
    assert "not a Slurm time" in err(resources=Resources(time="soon"))
    # USR1 comes signal_seconds + up to 30 s before the limit: a shorter limit signals at the start
    assert "would be signalled as it starts" in err(resources=Resources(time="5"))  # 300 s, default 300
    (tmp_path / "file").write_text("")
    assert "is not writable" in err(run_dir=tmp_path / "file" / "run")
    assert not (tmp_path / "run").exists()  # nothing was written for the refused submissions
    # the command line says the same in one line, exit code 2
    from slurm.cli import main_submit
    p = subprocess.run([sys.executable, "-m", "slurm", "submit", str(cfg), "--run-dir", str(tmp_path / "r"),
                        "--partition", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "archscale submit: error: partition 'nope' does not exist; available: debug, long"]
    assert main_submit


def test_run_dir_in_use_is_refused(launched):
    sub = launched["timelimit"]
    if final_state(sub.job_id) is None:  # still queued or running (it takes over a minute)
        with pytest.raises(slurm.SlurmError, match=f"already has job {sub.job_id}"):
            slurm.submit(launched["cfg"], run_dir=sub.run_dir, entry=launched["entry"])


# ---------------------------------------------------------------- jobs on the cluster
def test_job_runs_one_task_per_gpu_with_rendezvous(launched):
    sub = launched["ranks"]
    wait_for(lambda: final_state(sub.job_id), 90, f"job {sub.job_id}", sub.run_dir)
    assert final_state(sub.job_id) == "COMPLETED"
    ev = [e for e in events(sub.run_dir) if e["event"] == "start"]
    assert sorted(e["rank"] for e in ev) == [0, 1]
    assert {e["LOCAL_RANK"] for e in ev} == {"0", "1"} and {e["WORLD_SIZE"] for e in ev} == {"2"}
    assert {e["MASTER_ADDR"] for e in ev} == {socket.gethostname().split(".")[0]}
    assert {e["MASTER_PORT"] for e in ev} == {str(20000 + int(sub.job_id) % 12000)}
    assert (sub.run_dir / "FINISHED").exists()
    assert (sub.run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000020"
    [row] = slurm.status(sub.run_dir)
    assert (row.state, row.step, row.job_id) == ("done", 20, sub.job_id)


@pytest.mark.slow
def test_sweep_is_one_array_and_resubmission_skips_finished(launched):
    sweep, sub = launched["sweep"]
    cells = sweep.cells()
    assert "#SBATCH --array=0-3%2" in sub.script
    manifest = json.loads((sweep.dir / "sweep.json").read_text())
    assert [c["name"] for c in manifest["cells"]] == ["cd-seed0", "cd-seed1", "nd-seed0", "nd-seed1"]
    wait_for(lambda: all((pathlib.Path(c["run_dir"]) / "FINISHED").exists() for c in cells), 120,
             "every cell to finish", sweep.dir)
    for c in cells:
        starts = [e for e in events(c["run_dir"]) if e["event"] == "start"]
        # seed 1 cells crash in their first run: the array task requeues itself and succeeds
        assert [e["restart"] for e in starts] == ([0, 1] if c["name"].endswith("seed1") else [0])
        assert starts[0]["overrides"][-3:-1] == c["overrides"][-2:]  # the cell's own overrides
        assert list(pathlib.Path(c["run_dir"], "slurm").glob(f"job-{sub.job_id}_{c['index']}.out"))
    wait_for(lambda: all(final_state(f"{sub.job_id}_{i}") for i in range(4)), 60, "the array to end")
    assert {final_state(f"{sub.job_id}_{i}") for i in range(4)} == {"COMPLETED"}
    rows = slurm.status(sweep.dir)
    assert [r.state for r in rows] == ["done"] * 4 and [r.step for r in rows] == [30] * 4
    # everything finished: resubmitting queues nothing
    again = slurm.submit_sweep(sweep)
    assert again.job_id is None
    with pytest.raises(slurm.SlurmError, match="is finished"):  # nor does submitting one cell
        slurm.submit(launched["cfg"], run_dir=cells[0]["run_dir"], entry=launched["entry"])
    # one cell not finished: only that cell is resubmitted
    redo = pathlib.Path(cells[2]["run_dir"])
    (redo / "FINISHED").unlink()
    (redo / "checkpoints" / "latest").unlink()
    again = slurm.submit_sweep(sweep)
    assert again.job_id and "#SBATCH --array=2%2" in again.script
    wait_for(lambda: (redo / "FINISHED").exists(), 90, "the resubmitted cell", sweep.dir)
    starts = {c["name"]: len([e for e in events(c["run_dir"]) if e["event"] == "start"]) for c in cells}
    assert starts == {"cd-seed0": 1, "cd-seed1": 2, "nd-seed0": 2, "nd-seed1": 2}


@pytest.mark.slow
def test_chain_runs_in_order(launched):
    subs = launched["chain"]
    assert f"--dependency=afterok:{subs[0].job_id}" in subs[1].script
    assert "--kill-on-invalid-dep=yes" in subs[2].script
    wait_for(lambda: final_state(subs[-1].job_id), 120, "the last stage", subs[0].run_dir.parent)
    assert [final_state(s.job_id) for s in subs] == ["COMPLETED"] * 3
    assert [e["restart"] for e in events(subs[0].run_dir) if e["event"] == "start"] == [0, 1]
    spans = []
    for s in subs:
        ev = events(s.run_dir)
        spans.append((min(e["time"] for e in ev), max(e["time"] for e in ev)))
    assert spans[0][1] <= spans[1][0] and spans[1][1] <= spans[2][0]
    # submitting the chain again skips the finished stages: nothing left to submit
    stages = [slurm.Stage(launched["cfg"], s.run_dir) for s in subs]
    assert slurm.submit_chain(stages) == []


@pytest.mark.slow
def test_failing_parent_cancels_dependents(launched):
    subs = launched["badchain"]
    wait_for(lambda: all(final_state(s.job_id) for s in subs), 120, "the chain to end",
             subs[0].run_dir.parent)
    assert [final_state(s.job_id) for s in subs] == ["FAILED", "CANCELLED", "CANCELLED"]
    assert not events(subs[1].run_dir) and not events(subs[2].run_dir)  # never started
    assert [r.state for r in slurm.status(subs[1].run_dir)] == ["cancelled"]


@pytest.mark.slow
def test_crashing_job_stops_after_max_restarts(launched):
    sub = launched["crash"]
    wait_for(lambda: final_state(sub.job_id), 150, f"crash-looping job {sub.job_id}", sub.run_dir)
    assert final_state(sub.job_id) == "FAILED"
    starts = [e["restart"] for e in events(sub.run_dir) if e["event"] == "start"]
    assert starts == [0, 1, 2]  # the first run and max_restarts=2 requeues, then no more
    log = next((sub.run_dir / "slurm").glob("job-*.out")).read_text()
    assert "not requeueing (exit code 3): 2 restarts already" in log
    [row] = slurm.status(sub.run_dir)
    assert row.state == "failed" and row.slurm_state == "FAILED"


@pytest.mark.slow
def test_time_limit_signal_saves_requeues_and_resumes(launched):
    sub = launched["timelimit"]
    wait_for(lambda: settled_state(sub.job_id), 240, f"time-limited job {sub.job_id}", sub.run_dir)
    ev = events(sub.run_dir)
    assert final_state(sub.job_id) == "COMPLETED", ev
    assert (sub.run_dir / "FINISHED").exists()
    starts = [e for e in ev if e["event"] == "start"]
    saves = [e for e in ev if e["event"] == "saved"]
    assert len(starts) >= 2 and saves and {e["signal"] for e in saves} == {"USR1"}
    assert [e["restart"] for e in starts] == list(range(len(starts)))  # SLURM_RESTART_COUNT 0, 1, ...
    # every restart resumes exactly where the signal stopped the previous one: no step lost or redone
    assert [e["step"] for e in starts] == [0] + [e["step"] for e in saves]
    assert [e for e in ev if e["event"] == "end"][-1]["step"] == 400
    # one log file, appended across restarts
    [log] = (sub.run_dir / "slurm").glob("job-*.out")
    text = log.read_text()
    assert text.count("got SIGUSR1") == len(saves) and text.count("requeueing (time limit") == len(saves)


# ---------------------------------------------------------------- the real trainer on the cluster
def test_submit_checks_the_config_first(tmp_path, monkeypatch, capsys):
    """A bad key or value is refused by `archscale submit` with the trainer's own one-line message
    (train.config, light), before sbatch runs or anything is written."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {arch: cd}\nschedule: {max_steps: 10}\n")
    run_dir = tmp_path / "run"
    # the command line, as users type it (and no sbatch on the PATH: had the submission got that
    # far, the message would be another one)
    p = subprocess.run([sys.executable, "-m", "train", "submit", str(cfg), "bogus.key=1", "--run-dir", str(run_dir)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PATH": "/nonexistent"})
    assert p.returncode == 2 and p.stderr.splitlines() == [
        "archscale submit: error: bad config: unknown key 'bogus' (command line); valid keys of the top level: "
        "run_dir, seed, model, objective, data, optim, schedule, parallel, checkpoint, logging, eval, init"], p.stderr

    def no_slurm(*a, **k):
        raise AssertionError(f"a refused submission ran a Slurm command: {a}")
    monkeypatch.setattr(cluster, "run", no_slurm)
    from slurm.cli import main_submit

    def refused(*args):
        capsys.readouterr()
        assert main_submit([*args, "--run-dir", str(run_dir)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("archscale submit: error: "), lines
        return lines[0]

    from train.registry import ARCHITECTURES

    archs = ", ".join(ARCHITECTURES)
    assert f"model.arch: 'zz' is not one of: {archs} (from command line)" in refused(str(cfg), "model.arch=zz")
    assert "expected an integer, got 'many'" in refused(str(cfg), "schedule.max_steps=many")
    assert "parallel.global_batch_size=3 is not divisible" in refused(str(cfg), "parallel.global_batch_size=3",
                                                                      "parallel.micro_batch_size=2")
    assert "no training length" in refused("model.arch=nd")  # no file: defaults + overrides, as for train
    assert "does not exist" in refused(str(tmp_path / "nope.yaml"))
    assert "drop the override" in refused(str(cfg), f"run_dir={tmp_path}/other")
    (tmp_path / "bad.yaml").write_text("model: [cd\n")
    assert "not valid YAML" in refused(str(tmp_path / "bad.yaml"))
    assert not run_dir.exists()
    # the world size counts: 2 tasks (one per GPU) cannot split a global batch of 2 x 3
    with pytest.raises(slurm.SlurmError, match="global_batch_size=6 is not divisible by .* 2 x 2 = 4"):
        slurm.submit(str(cfg), ["parallel.global_batch_size=6", "parallel.micro_batch_size=2"], run_dir=run_dir,
                     dry_run=True,
                     resources=Resources(gpus_per_node=2))
    # sweeps and chains check every cell / stage before anything is written or queued
    sweep = slurm.Sweep(dir=tmp_path / "sweep", config=str(cfg), grid={"model.arch": ["cd", "xd"]})
    with pytest.raises(slurm.SlurmError, match="cell xd: bad config: model.arch: 'xd'"):
        slurm.submit_sweep(sweep)
    stages = [slurm.Stage(str(cfg), tmp_path / "a"), slurm.Stage(str(cfg), tmp_path / "b", ["optim.lr=-1"], name="adapt")]
    with pytest.raises(slurm.SlurmError, match="stage adapt: bad config: optim.lr=-1.0 must be > 0"):
        slurm.submit_chain(stages)
    assert not any((tmp_path / d).exists() for d in ("sweep", "a", "b"))
    # the check stays light: no torch, no model code (the registry's fit check included; ED:FLM is
    # refused by it, tests/test_registry.py)
    code = ("import sys, slurm; slurm.submit(sys.argv[1], ['model.arch=ed', 'objective.name=mlm'], run_dir=sys.argv[2], dry_run=True); "
            "bad = [m for m in ('torch', 'deepspeed', 'model_zoo', 'train.engine', 'train.trainer.loop') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(cfg), str(run_dir)], check=True, cwd=ROOT)
    # `archscale chain` is wired
    (tmp_path / "chain.yaml").write_text(f"stages:\n  - {{name: pre, config: {cfg}, run_dir: pre}}\n")
    p = subprocess.run([sys.executable, "-m", "train", "chain", str(tmp_path / "chain.yaml"), "--dry-run"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and f"run_dir={tmp_path}/pre" in p.stdout, p.stderr


def test_real_training_job_runs_to_completion(real):
    run_dir, job_id = real["tiny"]
    assert final_state(job_id) == "COMPLETED", _tail(next((run_dir / "slurm").glob("job-*.out")))
    assert (run_dir / "FINISHED").exists()
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-00000012"
    assert (ckpt / "step-00000012" / "COMPLETE").exists() and _weights(ckpt / "step-00000012").exists()
    log = (run_dir / "slurm" / f"job-{job_id}.out").read_text()
    assert "DS_ACCELERATOR=cpu" in (run_dir / "slurm" / "job.sh").read_text()
    assert '"step": 12' in log and "requeueing" not in log  # the trainer's summary line; one run
    p = subprocess.run([sys.executable, "-m", "train", "status", str(run_dir)], capture_output=True, text=True,
                       cwd=ROOT)
    assert p.returncode == 0, p.stderr
    row = p.stdout.splitlines()[1].split()
    assert row[:4] == ["tiny", "done", "12", job_id], p.stdout


@pytest.mark.slow
def test_real_time_limit_requeues_and_ends_with_the_same_weights(real):
    """A time limit (--time=2, USR1 41-71 s before it) cuts the run: the trainer saves at the next
    step and exits, the job requeues itself, resumes from that checkpoint, and finishes with
    bit-identical weights to the uninterrupted reference run."""
    sub, steps = real["long"], real["steps"]
    ref_dir, ref = real["ref"]
    logs = sub.run_dir / "slurm"
    wait_for(lambda: settled_state(sub.job_id), 420, f"time-limited training job {sub.job_id} ({steps} steps, "
             f"~{real['step_s']:.2f} s each)", logs)
    [log_path] = logs.glob("job-*.out")
    log = log_path.read_text()
    assert final_state(sub.job_id) == "COMPLETED", _tail(log_path)
    assert (sub.run_dir / "FINISHED").exists()
    # it was cut and resumed where it stopped, at least once
    stopped = [int(n) for n in re.findall(r"stopped by SIGUSR1 at step (\d+)", log)]
    resumed = [int(n) for n in re.findall(r"resumed \S+ at step (\d+)", log)]
    assert stopped and all(0 < n < steps for n in stopped), _tail(log_path)
    # every restart resumes exactly where the signal stopped the run before it
    assert sorted(set(resumed)) == sorted(set(stopped)), _tail(log_path)
    assert log.count("got SIGUSR1") == log.count("requeueing (time limit") >= len(stopped)
    assert "start 1 (of at most 6 restarts)" in log and log.count("tasks exited with 0 after SIGUSR1") == len(stopped)
    print(f"{steps} steps; stopped at {stopped}; time limit raised after the first cut: {real.get('extended')}")
    [row] = slurm.status(sub.run_dir)
    assert (row.state, row.step) == ("done", steps)
    # the reference, uninterrupted, ran meanwhile
    assert ref.wait(timeout=300) == 0, _tail(real["base"] / "ref.log")
    final = f"step-{steps:08d}"
    a, b = _weights(ref_dir / "checkpoints" / final), _weights(sub.run_dir / "checkpoints" / final)
    code = ("import sys, torch\n"
            "a, b = (torch.load(p, map_location='cpu', weights_only=False)['module'] for p in sys.argv[1:3])\n"
            "diff = sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]\n"
            "print(len(a), diff[:5])\n")
    out = subprocess.run([sys.executable, "-c", code, str(a), str(b)], capture_output=True, text=True, check=True,
                         env={**os.environ, **REAL_ENV}).stdout.split(maxsplit=1)
    assert int(out[0]) > 0 and out[1].strip() == "[]", f"weights differ: {out}"


def test_submit_local_rehearses_on_the_local_cluster(slurm_cluster, tmp_path, capsys, monkeypatch):
    """--local: CPU training on the project's local cluster (a 10-minute limit unless --time), and a
    clear refusal naming the start command when that cluster is not up."""
    from slurm import cli

    run_dir = tmp_path / "run"
    assert cli.main_submit(["model.arch=cd", "schedule.max_steps=3", "--run-dir", str(run_dir), "--local",
                            "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "export DS_ACCELERATOR=cpu" in script and "export OMP_NUM_THREADS=1" in script
    assert "#SBATCH --time=10" in script and not run_dir.exists()
    monkeypatch.setattr(cli, "local_cluster_problem", lambda: "the local Slurm cluster is not running: start it")
    assert cli.main_submit(["schedule.max_steps=3", "--run-dir", str(run_dir), "--local"]) == 2
    err = capsys.readouterr().err
    assert "not running" in err and err.count("\n") == 1
