"""Run-directory mechanics: atomic checkpoints, crash safety, pruning, resume selection, trainer state, RNG."""
from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest

from train.trainer.checkpointing import (COMPLETE, LATEST, STATE_FILE, CheckpointError, RunLayout, TrainerState,
                                 capture_rng_state, find_resume_point, list_checkpoints, parse_step,
                                 prune_checkpoints, read_latest, restore_rng_state, save_checkpoint, step_dir_name)
from train.config import load_config, to_dict


def engine_writer(payload: str = "weights"):
    def write(d: Path) -> None:
        (d / "engine").mkdir()
        (d / "engine" / "model.pt").write_text(payload)
    return write


def save(ckpt: Path, step: int, **kw) -> Path:
    return save_checkpoint(ckpt, TrainerState(step=step, tokens_seen=step * 10), engine_writer(f"w{step}"), **kw)


def names(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir())


def test_names():
    assert step_dir_name(1200) == "step-00001200"
    assert parse_step("step-00001200") == 1200
    assert parse_step("step-00001200.tmp") is None and parse_step("latest") is None


def test_save_writes_the_layout(tmp_path):
    ckpt = tmp_path / "checkpoints"
    final = save(ckpt, 1200, config_yaml="a: 1\n")
    assert final == ckpt / "step-00001200"
    assert names(ckpt) == [LATEST, "step-00001200"]
    assert sorted(p.name for p in final.iterdir()) == [COMPLETE, "config.yaml", "engine", STATE_FILE]
    assert (ckpt / LATEST).read_text() == "step-00001200\n"
    assert json.loads((final / COMPLETE).read_text())["step"] == 1200
    assert TrainerState.load(final / STATE_FILE).tokens_seen == 12000
    assert (final / "engine" / "model.pt").read_text() == "w1200"


def test_crash_inside_the_writer_keeps_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints"
    save(ckpt, 10)

    def crashing(d: Path) -> None:
        (d / "half-written.pt").write_text("partial")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_checkpoint(ckpt, TrainerState(step=20), crashing, keep_last=1)
    assert read_latest(ckpt) == ckpt / "step-00000010"
    assert (ckpt / "step-00000020.tmp").is_dir() and not (ckpt / "step-00000020.tmp" / COMPLETE).exists()
    assert not (ckpt / "step-00000020").exists()
    assert [s for s, _ in list_checkpoints(ckpt)] == [10]
    assert find_resume_point(tmp_path, "auto") == ckpt / "step-00000010"
    # the next save of that step replaces the leftover
    save(ckpt, 20)
    assert names(ckpt) == [LATEST, "step-00000010", "step-00000020"]
    assert not (ckpt / "step-00000020" / "half-written.pt").exists()


def test_readers_skip_tmp_and_unmarked_dirs(tmp_path):
    ckpt = tmp_path / "checkpoints"
    save(ckpt, 10)
    (ckpt / "step-00000030.tmp").mkdir()
    (ckpt / "step-00000030.tmp" / COMPLETE).write_text("{}")    # marked but never renamed
    (ckpt / "step-00000040").mkdir()                             # renamed by hand, no marker
    (ckpt / LATEST).write_text("step-00000040\n")               # latest naming an incomplete dir
    assert [s for s, _ in list_checkpoints(ckpt)] == [10]
    assert read_latest(ckpt) is None
    assert find_resume_point(tmp_path) == ckpt / "step-00000010"


def test_auto_prefers_latest_then_the_highest_complete_step(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (500, 600):
        save(ckpt, step)
    save(ckpt, 100)  # a fresh run in a directory holding an older run's higher steps
    assert find_resume_point(tmp_path, "auto") == ckpt / "step-00000100"
    (ckpt / LATEST).unlink()
    assert find_resume_point(tmp_path, "auto") == ckpt / "step-00000600"


def test_resume_selection(tmp_path):
    assert find_resume_point(tmp_path, "auto") is None              # nothing yet
    ckpt = tmp_path / "checkpoints"
    save(ckpt, 10)
    save(ckpt, 20)
    assert find_resume_point(tmp_path, "never") is None
    assert find_resume_point(tmp_path, "auto") == ckpt / "step-00000020"
    assert find_resume_point(tmp_path, str(ckpt / "step-00000010")) == ckpt / "step-00000010"
    assert find_resume_point("elsewhere", str(tmp_path)) == ckpt / "step-00000020"        # another run dir
    assert find_resume_point("elsewhere", str(ckpt)) == ckpt / "step-00000020"            # its checkpoints dir
    other = tmp_path / "custom"
    save(other, 7)
    assert find_resume_point(tmp_path, "auto", checkpoints_dir=other) == other / "step-00000007"
    (ckpt / "step-00000030.tmp").mkdir()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        find_resume_point(tmp_path, str(ckpt / "step-00000030.tmp"))
    with pytest.raises(CheckpointError, match="no such path"):
        find_resume_point(tmp_path, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_resume_point(tmp_path, str(tmp_path / "empty"))


def test_keep_last_prunes_oldest_and_leftovers(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step-00000002.tmp").mkdir(parents=True)   # a crashed save
    for step in range(1, 7):
        save(ckpt, step, keep_last=2)
    assert names(ckpt) == [LATEST, "step-00000005", "step-00000006"]
    for step in range(7, 13):
        save(ckpt, step, keep_last=1, keep_every_n_steps=4)
    assert names(ckpt) == [LATEST, "step-00000008", "step-00000012"]
    for step in range(13, 16):
        save(ckpt, step)                                 # keep_last=0: keep all
    assert len(list_checkpoints(ckpt)) == 5


def test_pruning_never_deletes_the_newest_or_latest(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save(ckpt, step)
    (ckpt / LATEST).write_text("step-00000010\n")
    removed = prune_checkpoints(ckpt, keep_last=1)
    assert [p.name for p in removed] == ["step-00000020"]
    assert names(ckpt) == [LATEST, "step-00000010", "step-00000030"]
    save(ckpt, 5, keep_last=1)   # lower step than existing ones: the one just written survives
    assert (ckpt / "step-00000005").is_dir() and (ckpt / "step-00000030").is_dir()


def test_saving_a_step_again_replaces_it(tmp_path):
    ckpt = tmp_path / "checkpoints"
    save(ckpt, 10)
    save_checkpoint(ckpt, TrainerState(step=10, tokens_seen=99), engine_writer("again"))
    assert names(ckpt) == [LATEST, "step-00000010"]
    assert (ckpt / "step-00000010" / "engine" / "model.pt").read_text() == "again"
    assert TrainerState.load(ckpt / "step-00000010" / STATE_FILE).tokens_seen == 99


def test_two_ranks_rank0_creates_marks_and_renames(tmp_path):
    ckpt = tmp_path / "checkpoints"
    bar = threading.Barrier(2, timeout=10)
    calls = {0: 0, 1: 0}
    results, errors = {}, []

    def rank(r: int) -> None:
        def barrier() -> None:
            calls[r] += 1
            bar.wait()

        def write(d: Path) -> None:
            assert d.name == "step-00000007.tmp" and d.is_dir()    # made by rank 0 before the barrier
            (d / f"shard-{r}.pt").write_text(str(r))
        try:
            results[r] = save_checkpoint(ckpt, TrainerState(step=7, world_size=2), write,
                                         is_rank0=(r == 0), barrier=barrier)
        except Exception as e:  # surfaced below
            errors.append(e)
            bar.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    final = ckpt / "step-00000007"
    assert results == {0: final, 1: final} and calls == {0: 3, 1: 3}
    assert sorted(p.name for p in final.iterdir()) == [COMPLETE, "shard-0.pt", "shard-1.pt", STATE_FILE]


def test_trainer_state_round_trip_and_strictness(tmp_path):
    cfg = load_config(overrides=["model.arch=nd", "schedule.max_steps=3"])
    s = TrainerState(step=3, tokens_seen=300, target_tokens=120, flops=1.5e12,
                     data_position={"shard": 2, "offset": [1, 2]}, rng_states=[{"a": 1}, {"b": 2}],
                     world_size=2, config=to_dict(cfg))
    s.save(tmp_path / "s.json")
    back = TrainerState.load(tmp_path / "s.json")
    assert back == s
    assert back.rng_state_for(1) == {"b": 2} and back.rng_state_for(2) is None
    (tmp_path / "bad.json").write_text(json.dumps({"step": 1, "stepz": 2}))
    with pytest.raises(CheckpointError, match=r"unknown trainer-state keys \['stepz'\]"):
        TrainerState.load(tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match="cannot read"):
        TrainerState.load(tmp_path / "missing.json")


def test_rng_capture_restore_through_json(tmp_path):
    import numpy as np
    import torch

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()   # leave a cached gaussian in numpy's state
    state = capture_rng_state()
    TrainerState(rng_states=[state]).save(tmp_path / "s.json")
    first = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(TrainerState.load(tmp_path / "s.json").rng_states[0])
    again = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert again == first


def test_run_layout_and_run_files(tmp_path):
    cfg = load_config(overrides=[f"run_dir={tmp_path / 'run'}"])
    lay = RunLayout.from_config(cfg)
    assert lay.checkpoints == tmp_path / "run" / "checkpoints"
    lay.write_run_files("x: 1\n", {"train_batch_size": 8})
    assert lay.config_yaml.read_text() == "x: 1\n"
    assert json.loads(lay.ds_config_json.read_text()) == {"train_batch_size": 8}
    assert lay.metrics_jsonl == tmp_path / "run" / "metrics.jsonl" and lay.tensorboard.name == "tb"
    cfg = load_config(overrides=[f"run_dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ck'}"])
    assert RunLayout.from_config(cfg).checkpoints == tmp_path / "ck"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "config.yaml", "ds_config.json"]
