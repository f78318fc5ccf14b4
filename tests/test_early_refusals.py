"""Refused before any work (issue 32): lengths an objective cannot build with, found by the config
check (train/trainer/loop.check calls train/objectives' check_objective_config, build_objective's
checks with the tokens the data section will add), not by rank 0's stream build after the
tokenization and the run directory (before: a rank-0 traceback from build_objective)."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from train import registry  # noqa: E402
from train.cli import main  # noqa: E402
from train.objectives import ObjectiveConfig, TokenInfo, build_objective, check_objective_config  # noqa: E402

ED_MLM = ["model.size=debug", "model.arch=ed", "objective.name=mlm", "schedule.max_steps=2"]


@pytest.mark.parametrize("args, says", [
    (["objective.targets_length=50"], "set objective.targets_length=114"),
    (["objective.inputs_length=4", "objective.targets_length=2"], "too short"),
    (["data.num_sentinels=3"], "set data.num_sentinels >= 28"),
    (["data.num_sentinels=0"], "set data.num_sentinels > 0"),
])
def test_ed_mlm_lengths_that_cannot_build_are_one_line_before_any_work(tmp_path, capsys, args, says):
    run_dir = tmp_path / "run"
    rc = main(["train", *ED_MLM, *args, f"run_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not run_dir.exists() and not (tmp_path / "cache").exists()  # nothing tokenized, nothing written


def test_the_stand_in_tokens_give_build_objectives_verdict():
    """The check's stand-in TokenInfo (as many sentinels and modes as the data section adds) accepts
    what build_objective with a real tokenizer's ids accepts, and refuses what it refuses."""
    ed = registry.get("ed")
    ok = ObjectiveConfig(name="ul2")
    real = TokenInfo(vocab_size=8400, pad_id=8300, eos_id=8301, sentinel_ids=tuple(range(8399, 8299, -1)),
                     mode_ids=(("[NLU]", 8192), ("[NLG]", 8193), ("[S2S]", 8194)))
    build_objective(ok, ed, real)
    check_objective_config(ok, ed, 100, ["[NLU]", "[NLG]", "[S2S]"])
    with pytest.raises(ValueError, match="mode token '\\[NLG\\]' is not in the tokenizer"):
        check_objective_config(ok, ed, 100, ["[NLU]", "[S2S]"])
