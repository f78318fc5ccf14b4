"""The fault campaign of issue 19 (bench/faults), CI-sized: each test runs one part of
`python -m bench.faults` through the real CLI on a tiny CPU run and asserts that every case passed.

- security: no unsafe YAML / torch.load in the code; a rendered job script run by bash with hostile
  overrides and run directory passes them through byte for byte and runs nothing injected;
- bad inputs (a CI selection of bench/faults/inputs.py's cases, the rest run in the bench): one
  `error:` line, exit != 0, no traceback, no file of the run directory or the inputs changed, no
  payload run; a damaged cache (shard cut short or with flipped bytes, tokenizer cut short): one
  warning line naming the file, then the run trains;
- SIGKILL at 4 seeded points (2 inside a save, 1 during start-up) of one 12-step run, and 2 inside its
  final evaluation (before and after its line), then a resume that ends bitwise equal to the
  uninterrupted run, each metrics.jsonl line once (the bench kills 20 times, 6 in the save);
- SIGUSR1 then SIGTERM to the process group: saved, exit 0 for the requeue, resumed bitwise equal;
- disk full on a 3 MB tmpfs (skipped with the reason when no tmpfs can be mounted).

Slurm's requeue by time limit (>= 3 cuts) takes ~6 minutes on the local cluster: it runs in the
bench only (`python -m bench.faults --only requeue`); tests/test_slurm.py covers one cut in CI.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CI_INPUTS = [
    # the config file and the overrides: cheap (refused before torch is imported)
    "yaml_syntax", "yaml_top_level_list", "yaml_wrong_type", "yaml_section_scalar", "yaml_unknown_key",
    "yaml_python_object", "yaml_binary", "yaml_missing", "yaml_is_a_directory", "yaml_duplicate_key",
    "yaml_non_finite", "override_unknown_key", "override_without_equals", "override_empty_key",
    "override_python_tag", "override_non_finite", "negative_max_steps", "zero_micro_batch",
    "negative_seq_length", "batch_not_divisible", "run_cannot_fit",
    # damaged caches: one warning line, rebuilt, then a 2-step run trains (~10 s each)
    "cache_shard_truncated", "cache_shard_flipped", "cache_tokenizer_truncated",
    # checkpoints: a DeepSpeed start-up each (the data cases run in the bench; tests/test_data.py
    # checks the data errors in process)
    "shard_truncated", "malicious_pickle_checkpoint",
    "checkpoint_of_another_arch", "run_dir_in_use",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from bench.faults.common import setup

    return setup(tmp_path_factory.mktemp("faults"))


def _check(row) -> None:
    from bench.faults.common import format_table

    print(format_table([row]))
    if row.skipped:
        pytest.skip(row.skipped)
    assert row.tried and row.passed == row.tried, "\n".join(row.failures)


def test_no_unsafe_yaml_or_torch_load_in_the_code():
    from bench.faults.security import UNSAFE, grep_unsafe_loads

    assert grep_unsafe_loads() == []
    assert UNSAFE[1][0].search("x = torch.load(p, map_location='cpu')")  # the grep would find one
    assert not UNSAFE[1][0].search("x = torch.load(p, map_location='cpu', weights_only=True)")


def test_rendered_sbatch_script_takes_no_injection(work):
    from bench.faults.security import sbatch_injection

    assert sbatch_injection(work) == []


@pytest.mark.slow
def test_bad_inputs_are_refused_with_one_line_and_touch_nothing(work):
    from bench.faults.inputs import CASES, REPAIRS, bad_inputs

    assert len(CASES) >= 30 and set(CI_INPUTS) <= {c[0] for c in CASES + REPAIRS}
    _check(bad_inputs(work, CI_INPUTS))


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bitwise_exact(work):
    from bench.faults.kills import kill_campaign

    row = kill_campaign(work, kills=4, in_save=2, at_start=1, steps=12)
    _check(row)
    assert row.tried == 7  # 4 kills, 2 inside the final evaluation, and the final comparison


@pytest.mark.slow
def test_sigusr1_and_sigterm_save_exit_for_requeue_and_resume_exactly(work):
    from bench.faults.kills import signal_campaign

    _check(signal_campaign(work))


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_save_keeps_the_previous_checkpoint_and_resumes(work):
    from bench.faults.disk import disk_full

    _check(disk_full(work))
