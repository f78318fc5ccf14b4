"""The start-up fit check (train/trainer/fitcheck.py, issue 32 item 1): a run the planner says
cannot fit the device's memory is refused in one line before any file or tensor; a run that fits
logs its planned peak against the measured one in its first metrics line; parallel.fit_check=false
skips the check."""
from __future__ import annotations

import resource
import subprocess
import sys
import time

import pytest

from test_trainer import ROOT, _env, _write_corpus, base_overrides, inproc, metrics, run_inproc  # noqa: F401 (inproc: a fixture)

# The user's command of issue 32: 20 GB of RSS in 80 s on a 24 GB machine before it was killed.
TOO_LONG = ["model.size=debug", "model.overrides.position=learned", "objective.seq_length=100000",
            "schedule.max_steps=10"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("fitcheck")
    _write_corpus(d / "corpus")
    (d / "tmp").mkdir()
    return d


def _cap_memory() -> None:
    """A check that regressed must not take the machine with it: 6 GiB of data segment at most."""
    resource.setrlimit(resource.RLIMIT_DATA, (6 * 2 ** 30, 6 * 2 ** 30))


def test_the_users_command_is_refused_in_one_line_before_any_work(work):
    run_dir = work / "too-long"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "train", "train", *TOO_LONG, f"run_dir={run_dir}"],
                          cwd=ROOT, env=_env(work), capture_output=True, text=True, timeout=300,
                          preexec_fn=_cap_memory)
    took = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    line = lines[0]
    assert "does not fit" in line and "planner's peak" in line and "available RAM" in line
    assert "activations" in line  # the biggest term
    assert "objective.seq_length" in line and "parallel.fit_check=false" in line  # the fix and the escape
    assert not run_dir.exists()  # refused before any file
    assert took < 120, took  # no data preparation, no model: only imports and the plan


def test_refused_before_data_or_model(work, monkeypatch, inproc):
    """In process: neither the data nor the model is touched before the refusal."""
    from train.config import ConfigError
    from train.trainer import loop

    def never(*a, **k):
        raise AssertionError("work started before the fit check")

    monkeypatch.setattr(loop, "_prepare_data", never)
    monkeypatch.setattr(loop, "build_engine", never)
    with pytest.raises(ConfigError, match="does not fit"):
        run_inproc(base_overrides(work) + TOO_LONG + [f"run_dir={work / 'inproc'}"])
    assert not (work / "inproc").exists()


def _debug(work, name: str, *extra: str) -> list[str]:
    return base_overrides(work) + ["model.arch=cd", "objective.name=flm", "schedule.max_steps=2",
                                   f"run_dir={work / name}", *extra]


def test_a_debug_run_fits_and_logs_planned_against_measured_peak(work, inproc):
    run_inproc(_debug(work, "fits"))
    rows = [r for r in metrics(work / "fits") if "loss" in r]
    first = rows[0]
    assert first["planned_peak_gib"] > 0
    assert first["measured_peak_gib"] > first["startup_rss_gib"] > 0  # peak RSS, and the RSS at the check
    assert all("planned_peak_gib" not in r for r in rows[1:])  # the first line only


def test_small_memory_is_refused_and_the_escape_runs_anyway(work, monkeypatch, inproc):
    from train.config import ConfigError
    from train.trainer import fitcheck

    monkeypatch.setattr(fitcheck, "available_memory", lambda device: (2.0 ** 20, "available RAM (MemAvailable)"))
    with pytest.raises(ConfigError, match=r"does not fit.* and available RAM \(MemAvailable\) is 0\.00 GiB"):
        run_inproc(_debug(work, "small"))
    assert not (work / "small").exists()
    run_inproc(_debug(work, "escaped", "parallel.fit_check=false"))
    rows = [r for r in metrics(work / "escaped") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert "planned_peak_gib" not in rows[0]  # not checked: nothing planned


def test_cpu_plan_counts_sdpa_masks_as_t_squared():
    """device="cpu" adds SDPA's fp32 mask per block (4 B T^2 each): quadrupling with T doubled,
    where the CUDA plan (flex attention, no T x T tensor) grows linearly."""
    from train.commands.plan import plan

    def act(device: str, T: int) -> float:
        p = plan(None, ["model.size=debug", f"objective.seq_length={T}", "schedule.max_steps=1"], gpu="h100-80gb",
                 device=device)
        return p["memory"]["stages"][0]["activations"]

    assert act("cuda", 8192) < 2.5 * act("cuda", 4096)
    assert act("cpu", 8192) > 3.5 * act("cpu", 4096)
    assert act("cpu", 4096) > act("cuda", 4096)


def test_the_refusal_names_the_fix_search_change(work, monkeypatch, inproc):
    """At T = 1024 the debug model plans ~532 MiB at micro-batch 8 and ~267 MiB at 4 (fp32, CPU):
    with 300 MiB there (270 usable), the fix search's first change that fits is micro-batch 4."""
    from train.config import ConfigError
    from train.trainer import fitcheck

    monkeypatch.setattr(fitcheck, "available_memory", lambda device: (300 * 2.0 ** 20, "available RAM (MemAvailable)"))
    with pytest.raises(ConfigError, match=r"largest term: activations.*set parallel\.micro_batch_size=4 \(planned"):
        run_inproc(_debug(work, "fix", "objective.seq_length=1024", "parallel.micro_batch_size=8",
                          "parallel.global_batch_size=8"))
    assert not (work / "fix").exists()


def test_cuda_branch_compares_the_devices_total_memory(monkeypatch):
    """No GPU here: the CUDA branch with torch.cuda's two calls stubbed. The plan is the GPU plan
    (bf16 as the trainer resolves it on bf16 hardware, no CPU mask term), against total_memory."""
    import types

    import torch

    from train.config import ConfigError, load_config
    from train.trainer import fitcheck
    from train.trainer.loop import check

    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2 ** 30)
    cfg = load_config(None, ["model.size=debug", "objective.seq_length=4096", "schedule.max_steps=1"])
    derived = check(cfg, 1, bf16_supported=True)
    plan = fitcheck.fit_check(cfg, derived, torch.device("cuda"), 1)
    assert plan.device == "cuda" and plan.available == 80 * 2 ** 30 and plan.startup_rss == 0
    assert 0 < plan.planned_peak < 2 ** 30  # flex attention on a GPU: no 4096^2 mask per block
    assert fitcheck.memory_record(plan, torch.device("cuda")) == {
        "planned_peak_gib": plan.planned_peak / 2 ** 30, "measured_peak_gib": 3.0}
    props.total_memory = 2 ** 20
    with pytest.raises(ConfigError, match=r"NVIDIA H100 80GB HBM3's total memory is 0\.00 GiB"):
        fitcheck.fit_check(cfg, derived, torch.device("cuda"), 1)


def test_no_fit_check_flag_runs_anyway_and_warns(work, monkeypatch, inproc, capsys, caplog):
    """`archscale train --no-fit-check` is parallel.fit_check=false from the command line: a run the
    check would refuse trains, and a warning says the check is off."""
    from train.cli import cmd_train
    from train.trainer import fitcheck

    monkeypatch.setattr(fitcheck, "available_memory", lambda device: (2.0 ** 20, "available RAM (MemAvailable)"))
    assert cmd_train(_debug(work, "refused")) == 2  # the check is on without the flag
    assert "does not fit" in capsys.readouterr().err
    with caplog.at_level("WARNING"):
        assert cmd_train(["--no-fit-check", *_debug(work, "flagged")]) == 0
    assert "fit_check=false" in caplog.text
    assert [r["step"] for r in metrics(work / "flagged") if "loss" in r] == [1, 2]


# `archscale submit`'s fit check (slurm/submit.py check_config -> fitcheck.submit_fit_check): planned for
# the job's world and GPUs before anything is queued; --dry-run renders nothing for a run that cannot fit.
WIDE = ["model.size=debug", "schedule.max_steps=10", "model.overrides.d_model=16384", "model.overrides.n_layers=64",
        "model.overrides.d_ff=65536"]  # ~4.5 TiB planned: bench/faults' run_cannot_fit


def _submit(tmp_path, capsys, *args):
    from slurm.cli import main_submit

    rc = main_submit([*args, "--run-dir", str(tmp_path / "run"), "--dry-run"])
    out = capsys.readouterr()
    return rc, out.out, [l for l in out.err.splitlines() if l.strip()]


@pytest.mark.parametrize("res, says", [
    (["--gpus-per-node", "8", "--nodes", "2"], "the memory of the job's GPU kind"),
    (["--gpus-per-node", "4", "--gpu", "a100-40gb"], "(--gpu a100-40gb)"),
    (["--mem", "64G", "--tasks-per-node", "2"], "--mem=64G per node / 2 tasks"),
])
def test_submit_refuses_a_run_that_cannot_fit_the_jobs_memory(tmp_path, capsys, res, says):
    rc, out, err = _submit(tmp_path, capsys, *WIDE, *res)
    assert rc == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith("archscale submit: error: this run does not fit: the planner's peak is ") and says in err[0]
    assert "pass --no-fit-check (parallel.fit_check=false) to run anyway" in err[0]
    assert not (tmp_path / "run").exists()


def test_submit_fit_check_plans_the_jobs_world_and_can_be_skipped(tmp_path, capsys):
    from train.config import ConfigError, load_config
    from train.trainer import fitcheck

    # what fits 16 GPUs with ZeRO-3 does not fit 1: the plan is the job's world, not one device
    cfg = load_config(None, ["model.size=debug", "schedule.max_steps=10", "model.overrides.d_model=4096", "model.overrides.n_layers=16",
                             "model.overrides.d_ff=16384", "parallel.zero_stage=3", "parallel.precision=bf16"])
    with pytest.raises(ConfigError, match="the memory of the job's GPU kind a100-40gb .* set parallel"):
        fitcheck.submit_fit_check(cfg, nodes=1, tasks_per_node=1, gpus_per_node=1, gpu="a100-40gb")
    many = fitcheck.submit_fit_check(cfg, nodes=2, tasks_per_node=8, gpus_per_node=8, gpu="a100-40gb")
    assert many["memory"]["fits"] and many["memory"]["peak_gib"] < 36
    rc, out, err = _submit(tmp_path, capsys, *WIDE, "--gpus-per-node", "8", "--no-fit-check")  # the job skips it too
    assert rc == 0 and err == [] and "parallel.fit_check=false" in out
    rc, out, err = _submit(tmp_path, capsys, *WIDE)  # a CPU job without --mem: left to the start-up check
    assert rc == 0 and err == [] and "parallel.fit_check=false" not in out
    rc, _, err = _submit(tmp_path, capsys, *WIDE, "--gpus-per-node", "1", "--gpu", "no-such-gpu")
    assert rc == 2 and len(err) == 1 and "--gpu: unknown GPU 'no-such-gpu'" in err[0]
    assert fitcheck._mem_bytes("64G") == 64 * 2 ** 30 and fitcheck._mem_bytes("500") == 500 * 2 ** 20
