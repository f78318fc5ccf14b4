"""A real 2-node Slurm cluster on one machine (`slurm/local_cluster.sh start --nodes 2`: slurmctld
here, each slurmd in its own network namespace with its own hostname and address on a bridge),
and the real trainer through `archscale submit` across it:

- srun over 2 nodes x 2 tasks: the tasks run on asnode1 / asnode2 with their own addresses;
- CD:FLM at ZeRO-2 and ED:MLM at ZeRO-3, 2 nodes x 2 processes over gloo across the namespaces
  (the rendezvous is MASTER_ADDR = the first node's name, from SLURM_JOB_NODELIST), 2 steps each,
  equal to the same run on 1 process in this test's process (same 8-row global batch);
- the CD run resumed as 1 node x 2 processes (a universal checkpoint) for 2 more steps, equal to
  the uninterrupted 1-process run.

This cluster has its own directory and port (ARCHSCALE_SLURM_DIR, ARCHSCALE_SLURM_PORT), so it runs
beside tests/test_slurm.py's one-node cluster; it is stopped afterwards (namespaces, links and its
/etc/hosts lines removed) unless ARCHSCALE_SLURM_KEEP=1. Where namespaces cannot be made (not
root, no iproute2, a sandbox without them) or Slurm is missing, the tests skip with one line.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rehearse import inprocess, losses, state
from test_trainer import _write_corpus

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "slurm" / "local_cluster.sh"
CLUSTER_ENV = {"ARCHSCALE_SLURM_DIR": "/tmp/archscale-slurm-multinode", "ARCHSCALE_SLURM_PORT": "6827",
               "ARCHSCALE_SLURM_NET": "10.77.0", "ARCHSCALE_SLURM_NODE_PREFIX": "asnode"}
JOB_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
LOSS_TOL = 1e-5


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("a multi-node local cluster needs root (network namespaces and veth pairs)")
    if not all(shutil.which(c) for c in ("sbatch", "slurmctld", "slurmd", "munged")):
        pytest.skip("Slurm is not installed (tests/test_slurm.py's cluster installs it: slurmctld slurmd "
                    "slurm-client munge)")
    if not all(shutil.which(c) for c in ("ip", "nsenter", "unshare")):
        pytest.skip("network namespaces need ip (iproute2), nsenter and unshare")
    env = {**os.environ, **CLUSTER_ENV}
    p = subprocess.run(["bash", str(SCRIPT), "start", "--nodes", "2"], env=env, capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        if "not available here" in last or "cannot create the" in last:
            pytest.skip(f"network namespaces cannot be made here: {last}")
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


def submit(cfg: Path, run_dir: Path, nodes: int, overrides: list[str]) -> str:
    p = subprocess.run([sys.executable, "-m", "train", "submit", str(cfg), *overrides, "--run-dir", str(run_dir),
                        "--nodes", str(nodes), "--gpus-per-node", "2", "--time", "15",
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


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    _write_corpus(work / "corpus")
    cfgs = {a: write_config(work, a) for a in CELLS}
    times = {}
    out = {}
    jobs = [("cd", work / "cd-2x2", 2, ["parallel.zero_stage=2", "schedule.max_steps=2"]),
            ("ed", work / "ed-2x2", 2, ["parallel.zero_stage=3", "schedule.max_steps=2"])]
    for arch, run_dir, nodes, ov in jobs:  # one after the other: each takes both nodes' 2 "GPUs"
        t = time.perf_counter()
        job = submit(cfgs[arch], run_dir, nodes, ov)
        out[run_dir.name] = (job, wait_job(job, run_dir))
        times[run_dir.name] = round(time.perf_counter() - t, 1)
    # the CD run continues as 1 node x 2 processes: its checkpoints in a new run directory (the
    # 2-step run is finished), 2 more steps
    resumed = work / "cd-1x2"
    resumed.mkdir()
    shutil.copytree(work / "cd-2x2" / "checkpoints", resumed / "checkpoints")
    shutil.copy(work / "cd-2x2" / "metrics.jsonl", resumed / "metrics.jsonl")
    t = time.perf_counter()
    job = submit(cfgs["cd"], resumed, 1, ["parallel.zero_stage=2", "schedule.max_steps=4"])
    out[resumed.name] = (job, wait_job(job, resumed))
    times[resumed.name] = round(time.perf_counter() - t, 1)
    # the references: the same runs on 1 process here
    from train.config import load_config
    from train.trainer.loop import train

    for arch, zero in (("cd", 2), ("ed", 3)):
        with inprocess():
            train(load_config(str(cfgs[arch]), [f"run_dir={work / f'ref-{arch}'}", f"parallel.zero_stage={zero}",
                                                "schedule.max_steps=4"]))
    print("multinode job seconds (submit to end):", json.dumps(times))
    return work, out, times


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
@pytest.mark.parametrize("arch", ["cd", "ed"])
def test_two_nodes_by_two_processes_train_like_one_process(arch, runs):
    work, out, _ = runs
    run = work / f"{arch}-2x2"
    job, st = out[run.name]
    assert st == "COMPLETED", job_log(run)
    log = job_log(run)
    assert "on asnode[1-2]" in log, log[-2000:]
    s = state(run)
    assert (s["step"], s["world_size"]) == (2, 4)
    got, ref = losses(run), losses(work / f"ref-{arch}")
    diff = max(abs(got[k] - ref[k]) for k in (1, 2))
    print(f"{arch.upper()} 2 nodes x 2 processes vs 1 process: max |loss diff| = {diff:.3g}")
    assert sorted(got) == [1, 2] and diff <= LOSS_TOL, (got, ref)
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
    got, ref = losses(run), losses(work / "ref-cd")
    diff = max(abs(got[k] - ref[k]) for k in range(1, 5))
    print(f"CD 2x2 -> 1x2 resume: max |loss diff| vs uninterrupted, steps 1-4 = {diff:.3g}")
    assert sorted(got) == [1, 2, 3, 4] and diff <= LOSS_TOL, (got, ref)
