"""Configs that cannot say two things (issue 32 item 4): inf and nan are refused in one line in every
float field of the run config (train/config/coerce.py), whether they come from a YAML file (`.inf`,
`.nan`) or the command line (`optim.lr=inf`, which YAML reads as the string 'inf'); the one field
where +inf means something (optim.clip_threshold: Adafactor without update clipping) keeps it. And
the last YAML reader that went around train/yamlfile.load_yaml (report's run config) goes through it."""
import math
import typing

import pytest

from train.cli import main
from train.config import ConfigError, RunConfig, config_to_yaml, load_config
from train.config.coerce import _hints, _is_dataclass_type, _unwrap_optional


def _float_fields(cls=RunConfig, where=""):
    """(dotted key, how to write one value of it on the command line with X in the float's place)."""
    for name, tp in _hints(cls).items():
        key = f"{where}.{name}" if where else name
        inner = _unwrap_optional(tp)
        if _is_dataclass_type(inner):
            yield from _float_fields(inner, key)
        elif inner is float:
            yield key, "{}", cls, name
        elif typing.get_origin(inner) in (tuple, list) and float in typing.get_args(inner):
            n = len([a for a in typing.get_args(inner) if a is not Ellipsis])
            yield key, "[" + ", ".join(["0.5"] * (n - 1) + ["{}"]) + "]", cls, name


FIELDS = list(_float_fields())


def test_the_walk_finds_the_float_fields():
    keys = {k for k, *_ in FIELDS}
    assert {"optim.lr", "optim.betas", "optim.beta1", "schedule.min_lr_ratio", "data.eval_fraction",
            "eval.prefix_fractions", "model.z_loss"} <= keys and len(keys) >= 15


@pytest.mark.parametrize("key, form, cls, name", FIELDS, ids=[f[0] for f in FIELDS])
def test_every_float_field_refuses_nan_and_inf_in_one_line(key, form, cls, name):
    allowed = name in getattr(cls, "INFINITY_OK", ())
    for text in ("nan", ".nan", "inf", ".inf", "-inf", "-.inf"):
        if allowed and text in ("inf", ".inf"):
            continue
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={form.format(text)}"])
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(key) and "is not a finite number" in msg, msg
        assert "give a finite one" in msg and msg.endswith("(from command line)"), msg


def test_clip_threshold_takes_infinity_and_keeps_it_through_the_saved_config(tmp_path):
    from train.config.sections import OptimConfig

    assert OptimConfig.INFINITY_OK == {"clip_threshold"}  # the only one; every other float refuses inf
    cfg = load_config(None, ["optim.name=adafactor", "optim.clip_threshold=inf"])
    assert cfg.optim.clip_threshold == math.inf
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(cfg))  # a resume reads this back
    assert load_config(saved, []).optim.clip_threshold == math.inf
    with pytest.raises(ConfigError, match=r"optim.clip_threshold=0.0 must be > 0"):
        load_config(None, ["optim.clip_threshold=0"])


def test_a_file_with_inf_or_nan_is_one_line_naming_the_file(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    for text, key in (("optim:\n  lr: .inf\n", "optim.lr: inf"), ("schedule:\n  decay_fraction: .nan\n",
                                                                  "schedule.decay_fraction: nan"),
                      ("model:\n  overrides:\n    norm_eps: .inf\n", "model.overrides.norm_eps: inf")):
        run.write_text(text)
        capsys.readouterr()
        assert main(["train", str(run), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0] and "not a finite number" in err[0] and str(run) in err[0], err
    # integers already refused both; finite values are untouched
    with pytest.raises(ConfigError, match=r"seed: expected an integer, got inf"):
        load_config(None, ["seed=.inf"])
    assert load_config(None, ["optim.lr=1e-3", "optim.betas=[0.9, 0.99]"]).optim.betas == (0.9, 0.99)


def test_report_reads_a_run_config_through_the_one_yaml_reader(tmp_path, capsys):
    from train.commands.report import main as report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("optim: {lr: 0.001, lr: 0.5}\n")  # a hand edit
    capsys.readouterr()
    assert report([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'optim.lr' is given twice" in err[0] and "config.yaml" in err[0], err
