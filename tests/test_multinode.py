"""A real 2-node Slurm cluster on one machine (`slurm/local_cluster.sh start --nodes 2`: slurmctld
here, each slurmd in its own network namespace with its own hostname and address on a bridge),
and the real trainer through `archscale submit` across it:

- srun over 2 nodes x 2 tasks: the tasks run on asnode1 / asnode2 with their own addresses;
- CD:FLM at ZeRO-2 and ED:MLM at ZeRO-3, 2 nodes x 2 processes over gloo across the namespaces
  (the rendezvous is MASTER_ADDR = the first node's name, from SLURM_JOB_NODELIST), 2 steps each,
  equal to the same run on 1 process in this test's process (same 8-row global batch);
- the CD run resumed as 1 node x 2 processes (a universal checkpoint) for 2 more steps, equal to
  the uninterrupted 1-process run;
- a 2-node CD run stopped and requeued twice by USR1, the signal a time limit sends
  (`--signal=B:USR1@N`; here delivered with `scancel --batch --signal=USR1` when the run has made
  progress, so the test does not wait for Slurm's 30-s limit checks: tests/test_slurm.py covers
  the time-limit timing on one node), resumed each time, and ended with final weights bitwise
  equal to those of the same run uninterrupted (run beside it on the same 2 nodes).

This cluster has its own directory and port (ARCHSCALE_SLURM_DIR, ARCHSCALE_SLURM_PORT), so it runs
beside tests/test_slurm.py's one-node cluster; it is stopped afterwards (namespaces, links and its
/etc/hosts lines removed) unless ARCHSCALE_SLURM_KEEP=1. Where namespaces cannot be made (not
root, no iproute2, a sandbox without them) or Slurm is missing, the tests skip with one line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services import skip_or_fail
from rehearse import clean_env, losses, state
from test_trainer import _write_corpus

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "local_cluster.sh"
LONG = 30  # steps of the requeued run and of its uninterrupted twin
# the 2-node training jobs compared with 1 process: name, arch, ZeRO stage, steps. CI: CD at ZeRO-2
# (also the requeued run's uninterrupted twin) and ED at ZeRO-3; ARCHSCALE_MULTINODE=full adds
# the other two corners (CD at ZeRO-3, ED at ZeRO-2)
TRAIN_JOBS = [("cd-2x2", "cd", 2, LONG), ("ed-2x2", "ed", 3, 2)]
if os.environ.get("ARCHSCALE_MULTINODE") == "full":
    TRAIN_JOBS += [("cd-z3-2x2", "cd", 3, 2), ("ed-z2-2x2", "ed", 2, 2)]
# stand-in GPUs a node: every job of the first wave (2 tasks a node each) runs side by side
CLUSTER_ENV = {"ARCHSCALE_SLURM_DIR": "/tmp/archscale-slurm-multinode", "ARCHSCALE_SLURM_PORT": "6827",
               "ARCHSCALE_SLURM_NET": "10.77.0", "ARCHSCALE_SLURM_NODE_PREFIX": "asnode",
               "ARCHSCALE_SLURM_GPUS": str(2 * (len(TRAIN_JOBS) + 1))}
JOB_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
LOSS_TOL = 1e-5


@pytest.fixture(scope="module")
def cluster(slurm_packages):
    if os.geteuid() != 0:
        skip_or_fail("a multi-node local cluster needs root (network namespaces and veth pairs)")
    env = {**os.environ, **CLUSTER_ENV}
    p = subprocess.run(["bash", str(SCRIPT), "start", "--nodes", "2"], env=env, capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        if "not available here" in last or "cannot create the" in last:
            skip_or_fail(f"network namespaces cannot be made here: {last}")
        pytest.fail(f"local_cluster.sh start --nodes 2 failed:\n{p.stdout}\n{p.stderr}")
    conf = str(Path(CLUSTER_ENV["ARCHSCALE_SLURM_DIR"]) / "etc" / "slurm.conf")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield env
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved
    if not os.environ.get("ARCHSCALE_SLURM_KEEP"):
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def job_state(job_id: str) -> str | None:
    p = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    for field in p.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def wait_job(job_id: str, run_dir: Path, timeout: float = 420) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = job_state(job_id)
        if s in ENDED:
            return s
        time.sleep(1)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((run_dir / "slurm").glob("*.out")))
    pytest.fail(f"job {job_id} did not end within {timeout:.0f} s\n{logs}")


def submit(cfg: Path, run_dir: Path, nodes: int, overrides: list[str], max_restarts: int = 0) -> str:
    p = subprocess.run([sys.executable, "-m", "train", "submit", str(cfg), *overrides, "--run-dir", str(run_dir),
                        "--nodes", str(nodes), "--gpus-per-node", "2", "--time", "15",
                        "--max-restarts", str(max_restarts),
                        *(f"--env={k}={v}" for k, v in JOB_ENV.items())],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout.strip().split()[-1]


def job_log(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("job-*.out")))


CELLS = {"cd": "model: {arch: cd, size: debug}\nobjective: {name: flm, seq_length: 64}\n",
         "ed": "model: {arch: ed, size: debug}\nobjective: {name: mlm, inputs_length: 64, targets_length: 14}\n"}


def write_config(work: Path, arch: str) -> Path:
    cfg = work / f"{arch}.yaml"
    cfg.write_text(
        CELLS[arch]
        + f"data: {{source: files, train_files: ['{work / 'corpus'}/*.txt'], tokenizer: builtin-bytes, "
          f"cache_dir: '{work / 'cache'}', eval_fraction: 0.1}}\n"
          "parallel: {micro_batch_size: 2, global_batch_size: 8}\n"
          "optim: {lr: 3.0e-3}\nschedule: {name: constant}\n"
          "eval: {every_n_steps: 0, num_batches: 1}\ncheckpoint: {every_n_steps: 2, keep_last: 0}\n"
          "logging: {every_n_steps: 1, progress_bar: false, tensorboard: false}\n")
    return cfg


def max_step(run_dir: Path) -> int:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in p.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def requeue_twice(job: str, run_dir: Path, timeout: float = 420) -> list[int]:
    """USR1 to the batch script (as at a time limit) once the run has taken 3 steps past its
    latest start, twice; returns the steps it stopped at."""
    stops: list[int] = []
    deadline = time.monotonic() + timeout
    while len(stops) < 2:
        log = job_log(run_dir)
        started = len(re.findall(r"job \S+: start \d+", log))
        resumed_at = stops[-1] if stops else 0
        if started == len(stops) + 1 and max_step(run_dir) >= resumed_at + 3:
            subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
            while "stopped by SIGUSR1 at step" not in job_log(run_dir).split(f"start {len(stops)} ")[-1]:
                assert time.monotonic() < deadline and job_state(job) not in ENDED, job_log(run_dir)[-3000:]
                time.sleep(0.3)
            stops.append(int(re.findall(r"stopped by SIGUSR1 at step (\d+)", job_log(run_dir))[-1]))
        assert time.monotonic() < deadline, f"no progress to signal: {job_log(run_dir)[-3000:]}"
        assert job_state(job) not in ENDED or len(stops) == 2, f"ended before two cuts: {job_log(run_dir)[-3000:]}"
        time.sleep(0.3)
    return stops


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    _write_corpus(work / "corpus")
    cfgs = {a: write_config(work, a) for a in CELLS}
    t0 = time.perf_counter()
    out, times = {}, {}
    # the references, the same runs on 1 process, meanwhile in a process of their own
    refs = [[sys.executable, "-m", "train", "train", str(cfgs[arch]), f"run_dir={work / f'ref-{name}'}",
             f"parallel.zero_stage={zero}", f"schedule.max_steps={steps}"] for name, arch, zero, steps in TRAIN_JOBS]
    ref_log = open(work / "refs.log", "w")
    ref_proc = subprocess.Popen(["bash", "-c", " && ".join(" ".join(f"'{a}'" for a in cmd) for cmd in refs)],
                                cwd=ROOT, env=clean_env(**JOB_ENV, TMPDIR=str(work)), stdout=ref_log,
                                stderr=subprocess.STDOUT)
    # side by side: the training jobs (the CD one is the uninterrupted twin) and the requeued run
    jobs = {name: submit(cfgs[arch], work / name, 2, [f"parallel.zero_stage={zero}", f"schedule.max_steps={steps}"])
            for name, arch, zero, steps in TRAIN_JOBS}
    jobs["cd-2x2-requeued"] = submit(cfgs["cd"], work / "cd-2x2-requeued", 2,
                                     ["parallel.zero_stage=2", f"schedule.max_steps={LONG}"], max_restarts=4)
    stops = requeue_twice(jobs["cd-2x2-requeued"], work / "cd-2x2-requeued")
    out["cd-2x2"] = (jobs["cd-2x2"], wait_job(jobs["cd-2x2"], work / "cd-2x2"))
    # the CD run's step-2 checkpoint continues as 1 node x 2 processes, 2 more steps
    resumed = work / "cd-1x2"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(work / "cd-2x2" / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    (resumed / "checkpoints" / "latest").write_text("step-00000002\n")
    jobs["cd-1x2"] = submit(cfgs["cd"], resumed, 1, ["parallel.zero_stage=2", "schedule.max_steps=4"])
    for name, job in jobs.items():
        out[name] = (job, wait_job(job, work / name))
        times[name] = round(time.perf_counter() - t0, 1)
    assert ref_proc.wait(timeout=600) == 0, (work / "refs.log").read_text()[-3000:]
    ref_log.close()
    times["references"] = round(time.perf_counter() - t0, 1)
    print(f"multinode jobs, seconds since the first submission: {json.dumps(times)}; requeued run stopped at {stops}")
    return work, out, stops


@pytest.mark.slow
def test_srun_spreads_tasks_over_the_namespaced_nodes(cluster):
    p = subprocess.run(["srun", "-N2", "-n4", "--ntasks-per-node=2", "bash", "-c",
                        "echo $SLURM_PROCID $(hostname) $(ip -4 -o addr show eth0 | awk '{print $4}')"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = sorted(line.split() for line in p.stdout.splitlines())
    assert rows == [["0", "asnode1", "10.77.0.11/24"], ["1", "asnode1", "10.77.0.11/24"],
                    ["2", "asnode2", "10.77.0.12/24"], ["3", "asnode2", "10.77.0.12/24"]], p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name,arch,zero,steps", TRAIN_JOBS, ids=[j[0] for j in TRAIN_JOBS])
def test_two_nodes_by_two_processes_train_like_one_process(name, arch, zero, steps, runs):
    work, out, _ = runs
    run = work / name
    job, st = out[run.name]
    assert st == "COMPLETED", job_log(run)
    log = job_log(run)
    assert "on asnode[1-2]" in log, log[-2000:]
    s = state(run)
    assert (s["step"], s["world_size"], s["config"]["parallel"]["zero_stage"]) == (steps, 4, zero)
    got, ref = losses(run), losses(work / f"ref-{name}")
    assert sorted(got) == sorted(ref) == list(range(1, steps + 1))
    diff = max(abs(got[k] - ref[k]) for k in (1, 2, 3, 4) if k <= steps)
    drift = max(abs(got[k] - ref[k]) for k in got)
    print(f"{arch.upper()} ZeRO-{zero} 2 nodes x 2 processes vs 1 process: max |loss diff| steps 1-{min(4, steps)} = {diff:.3g}, "
          f"all {steps} steps = {drift:.3g}")
    assert diff <= LOSS_TOL, (got, ref)
    assert drift <= 1e-4, (got, ref)  # fp32 reduction-order differences grow slowly over steps
    assert (run / "FINISHED").is_file()


@pytest.mark.slow
def test_two_node_run_resumes_on_one_node(runs):
    work, out, _ = runs
    run = work / "cd-1x2"
    job, st = out[run.name]
    assert st == "COMPLETED", job_log(run)
    assert "on asnode1" in job_log(run) or "on asnode2" in job_log(run)
    assert (run / "checkpoints" / "step-00000002" / "engine_universal" / "COMPLETE").is_file()
    s = state(run)
    assert (s["step"], s["world_size"]) == (4, 2)
    got, ref = losses(run), losses(work / "ref-cd-2x2")
    diff = max(abs(got[k] - ref[k]) for k in (3, 4))
    print(f"CD 2x2 -> 1x2 resume: max |loss diff| vs uninterrupted, steps 3-4 = {diff:.3g}")
    assert sorted(got) == [3, 4] and diff <= LOSS_TOL, (got, ref)


@pytest.mark.slow
def test_two_node_run_requeued_twice_ends_with_the_uninterrupted_weights(runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as fp32

    work, out, stops = runs
    run, twin = work / "cd-2x2-requeued", work / "cd-2x2"
    job, st = out[run.name]
    log = job_log(run)
    assert st == "COMPLETED" and (run / "FINISHED").is_file(), log[-3000:]
    assert len(stops) == 2 and 0 < stops[0] < stops[1] < LONG, stops
    assert log.count("requeueing (time limit or preemption notice)") == 2, log[-3000:]
    assert "start 2 (of at most 4 restarts) on asnode[1-2]" in log, log[-3000:]
    resumed = [int(n) for n in re.findall(r"resumed \S+ at step (\d+)", log)]
    assert resumed == stops, (resumed, stops)
    assert sorted(losses(run)) == list(range(1, LONG + 1))
    final = f"step-{LONG:08d}"
    a = fp32(str(run / "checkpoints" / final), tag="engine")
    b = fp32(str(twin / "checkpoints" / final), tag="engine")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------ ARCHSCALE_MULTINODE=full: real time limits
# USR1 90-120 s after each start (60 s before the 3-minute limit; Slurm checks limits every 30 s):
# 60-90 s of steps per start after the trainer's ~30 s start-up (~0.1 s a step here), so TL_STEPS
# outlast two starts
TIME_LIMIT, SIGNAL_SECONDS, TL_STEPS = "3", 60, 2500


@pytest.fixture(scope="module")
def time_limited(cluster, tmp_path_factory):
    """A 2-node CD run cut by its time limit, requeued and resumed at least twice (its limit is
    raised after the second cut so that it finishes), beside the same run uninterrupted."""
    if os.environ.get("ARCHSCALE_MULTINODE") != "full":
        pytest.skip("real time limits take ~7 minutes: ARCHSCALE_MULTINODE=full runs them")
    work = tmp_path_factory.mktemp("multinode_timelimit")
    _write_corpus(work / "corpus")
    cfg = write_config(work, "cd")
    ov = ["parallel.zero_stage=2", f"schedule.max_steps={TL_STEPS}", "checkpoint.every_n_steps=1000",
          "logging.every_n_steps=10"]
    cut, twin = work / "cd-2x2-timelimit", work / "cd-2x2-timelimit-twin"
    t0 = time.perf_counter()
    twin_job = submit(cfg, twin, 2, ov)
    p = subprocess.run([sys.executable, "-m", "train", "submit", str(cfg), *ov, "--run-dir", str(cut), "--nodes", "2",
                        "--gpus-per-node", "2", "--time", TIME_LIMIT, "--signal-seconds", str(SIGNAL_SECONDS),
                        "--max-restarts", "8", *(f"--env={k}={v}" for k, v in JOB_ENV.items())],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    job = p.stdout.strip().split()[-1]
    deadline = time.monotonic() + 900
    while job_log(cut).count("requeueing (time limit or preemption notice)") < 2:  # one line a cut
        assert job_state(job) not in ENDED, f"ended before two cuts ({TL_STEPS} steps): {job_log(cut)[-3000:]}"
        assert time.monotonic() < deadline, job_log(cut)[-3000:]
        time.sleep(1)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=30"], check=True, timeout=30)
    states = (wait_job(job, cut, timeout=900), wait_job(twin_job, twin, timeout=900))
    print(f"time-limited 2-node run: {TL_STEPS} steps, {time.perf_counter() - t0:.0f} s")
    return cut, twin, states


@pytest.mark.slow
def test_two_node_run_cut_twice_by_its_time_limit_ends_with_the_uninterrupted_weights(time_limited):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as fp32

    cut, twin, states = time_limited
    log = job_log(cut)
    assert states == ("COMPLETED", "COMPLETED"), (states, log[-3000:])
    # one segment per start; a cut start ends with the stop line (printed by every rank) and the requeue
    starts = re.split(r"\[archscale [^]]*\] job \S+: start \d+ ", log)[1:]
    stops = [int(re.findall(r"stopped by SIGUSR1 at step (\d+)", seg)[0]) for seg in starts
             if "requeueing (time limit or preemption notice)" in seg]
    resumed = [int(re.findall(r"resumed \S+ at step (\d+)", seg)[0]) for seg in starts[1:]]
    assert len(stops) >= 2 and len(starts) == len(stops) + 1, (stops, len(starts))  # cut at least twice, then done
    assert resumed == stops, (stops, resumed)  # every start resumes where the cut before it stopped
    assert 0 < stops[0] < stops[-1] < TL_STEPS, stops  # the cuts came mid-run, with progress between them
    print(f"cut by its time limit at steps {stops} of {TL_STEPS}")
    final = f"step-{TL_STEPS:08d}"
    a = fp32(str(cut / "checkpoints" / final), tag="engine")
    b = fp32(str(twin / "checkpoints" / final), tag="engine")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        max(float((a[k] - b[k]).abs().max()) for k in a)
