"""YAML files that cannot say two things (issue 32 item 3): a run config and a sweep grid go through
one reader (train/yamlfile.py), which refuses a key given twice at any depth, a tag with no safe
constructor and a syntax error, each in one line naming the file, the line(s) and the fix, through
the CLI entry points a user calls (`archscale train CONFIG --dry-run`, `archscale sweep GRID
--dry-run`)."""
import pytest

from train.cli import main
from train.config import ConfigError, load_config
from train.yamlfile import load_yaml, parse_yaml

PAYLOAD = '!!python/object/apply:os.system ["touch {marker}"]'


def _refused(capsys, argv) -> str:
    """The one line of stderr of a command that must exit 2."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_train_refuses_a_key_given_twice_at_any_depth(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("optim: {lr: 0.001, lr: 0.5}\n")
    line = _refused(capsys, ["train", str(run), "--dry-run"])
    assert str(run) in line and "'optim.lr' is given twice, line 1 (columns 9 and 20)" in line and "keep one" in line
    run.write_text("model:\n  size: debug\n  overrides:\n    d_model: 64\n    n_layers: 2\n    d_model: 32\n")
    line = _refused(capsys, ["train", str(run), "--dry-run"])
    assert "'model.overrides.d_model' is given twice, lines 4 and 6" in line
    run.write_text("seed: 1\noptim: {lr: 0.1}\nseed: 2\n")  # the top level too
    assert "'seed' is given twice, lines 1 and 3" in _refused(capsys, ["train", str(run), "--dry-run"])


def test_keys_that_python_would_merge_are_duplicates_and_merge_keys_are_not():
    with pytest.raises(ConfigError, match=r"'1.0' is given twice"):
        parse_yaml("{1: a, 1.0: b}\n", "f.yaml")
    with pytest.raises(ConfigError, match=r"'lr' is given twice, lines 1 and 2"):
        parse_yaml('"lr": 1\nlr: 2\n', "f.yaml")
    with pytest.raises(ConfigError, match=r"'a\[1\].x' is given twice"):
        parse_yaml("a: [{x: 1}, {x: 1, x: 2}]\n", "f.yaml")
    # `<<: *base` overrides on purpose; the same key in two mappings is no duplicate
    assert parse_yaml("b: &b {c: 1, d: 2}\ne:\n  <<: *b\n  c: 3\nf: {c: 1}\n") == \
        {"b": {"c": 1, "d": 2}, "e": {"c": 3, "d": 2}, "f": {"c": 1}}


def test_a_clean_config_loads_as_before(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("optim: {lr: 0.001}\nmodel: {size: debug, overrides: {d_model: 64}}\n")
    cfg = load_config(run)
    assert cfg.optim.lr == 0.001 and cfg.model.overrides == {"d_model": 64}
    assert load_yaml(tmp_path / "run.yaml") == {"optim": {"lr": 0.001},
                                                "model": {"size": "debug", "overrides": {"d_model": 64}}}


@pytest.mark.parametrize("text, expect", [
    ("model: [cd\n  size: debug\n", "line 2, column 7: not valid YAML: while parsing a flow sequence"),
    ("optim:\n  lr: a: b\n", "line 2, column 8: not valid YAML: mapping values are not allowed here"),
    ("a: 1\n---\nb: 2\n", "line 2, column 1: not valid YAML: expected a single document"),
    ("optim: !fast 3\n", "line 1: not valid YAML: the tag !fast has no safe constructor"),
])
def test_syntax_errors_and_unknown_tags_name_the_line(tmp_path, text, expect):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}, ") and expect in str(e.value) and "\n" not in str(e.value)


def test_an_unsafe_tag_is_one_line_in_train_and_in_sweep(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    (tmp_path / "base.yaml").write_text("{}\n")
    run = tmp_path / "run.yaml"
    run.write_text(f"optim: {PAYLOAD.format(marker=marker)}\n")
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"config: base.yaml\ngrid:\n  seed: {PAYLOAD.format(marker=marker)}\n")
    want = "not valid YAML: the tag !!python/object/apply:os.system has no safe constructor"
    line = _refused(capsys, ["train", str(run), "--dry-run"])
    assert line.startswith("error: ") and f"{run}, line 1: {want}" in line and "remove the tag" in line
    line = _refused(capsys, ["sweep", str(grid), "--dry-run"])
    assert line.startswith("archscale sweep: error: ") and f"{grid}, line 3: {want}" in line
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_sweep_grid_refuses_a_key_given_twice(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("{}\n")
    grid = tmp_path / "grid.yaml"
    grid.write_text("config: base.yaml\ngrid:\n  seed: [0, 1]\n  optim.lr: [0.1]\n  seed: [2]\n")
    line = _refused(capsys, ["sweep", str(grid), "--dry-run"])
    assert f"{grid}: key 'grid.seed' is given twice, lines 3 and 5; keep one" in line
    grid.write_text("config: base.yaml\ngrid: {seed: [0]}\nslurm: {time: '01:00:00', time: '02:00:00'}\n")
    assert "'slurm.time' is given twice, line 3" in _refused(capsys, ["sweep", str(grid), "--dry-run"])
    grid.write_text("config: base.yaml\ngrid: {seed: [0]\n")
    assert f"{grid}, line 3, column 1: not valid YAML" in _refused(capsys, ["sweep", str(grid), "--dry-run"])
    grid.write_text("- config\n- grid\n")
    assert "expected a mapping at the top" in _refused(capsys, ["sweep", str(grid), "--dry-run"])
    assert "does not exist" in _refused(capsys, ["sweep", str(tmp_path / "nope.yaml"), "--dry-run"])
    # the same file, clean, is accepted (a dry run prints the array and the cells)
    grid.write_text("config: base.yaml\noverrides: [schedule.max_steps=10]\ngrid: {seed: [0, 1]}\n")
    capsys.readouterr()
    assert main(["sweep", str(grid), "--dry-run"]) == 0
    assert "# cell 1: seed1: schedule.max_steps=10 seed=1" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_chain_file_goes_through_the_same_reader(tmp_path, capsys):
    chain = tmp_path / "chain.yaml"
    chain.write_text("stages:\n  - {config: a.yaml, run_dir: r, run_dir: s}\n")
    line = _refused(capsys, ["chain", str(chain), "--dry-run"])
    assert "'stages[0].run_dir' is given twice, line 2" in line


def test_a_mapping_override_and_a_compare_grid_refuse_a_key_given_twice(tmp_path, capsys):
    line = _refused(capsys, ["train", "optim={lr: 0.001, lr: 0.5}", "model.size=debug", "--dry-run"])
    assert "override 'optim={lr: 0.001, lr: 0.5}': key 'lr' is given twice, line 1 (columns 2 and 13)" in line
    from train.commands.compare import cells

    grid = tmp_path / "g.yaml"
    grid.write_text("cells:\n  - {cell: cd:flm, set: {optim.lr: 0.1, optim.lr: 0.2}}\n")
    with pytest.raises(cells.CellError, match=r"g.yaml: key 'cells\[0\].set.optim.lr' is given twice, line 2"):
        cells.load_grid(grid)
    grid.write_text("cells: [cd:flm]\nset: !!python/object/apply:os.system [true]\n")
    with pytest.raises(cells.CellError, match=r"g.yaml, line 2: not valid YAML: the tag !!python/object/apply"):
        cells.load_grid(grid)


# Where PyYAML may still be called directly: none of them reads a file a person wrote.
OTHER_PARSES = {
    "train/config/overrides.py",  # one command-line value as a YAML scalar (a mapping goes through parse_yaml)
    "train/trainer/branch.py",  # the config text this process just wrote with config_to_yaml
    "train/trainer/callbacks.py",  # the same, for the checkpoint's trainer state
}


def test_every_other_yaml_read_goes_through_the_one_reader():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    call = re.compile(r"\byaml\.(safe_load|load|unsafe_load|full_load|safe_load_all|load_all)\s*\(")
    hits = {str(p.relative_to(root)) for d in ("train", "slurm", "bench", "model_zoo", "scripts")
            for p in (root / d).rglob("*.py") if call.search(p.read_text(encoding="utf-8"))}
    extra = hits - OTHER_PARSES - {"train/yamlfile.py"}
    assert not extra, f"read {sorted(extra)} through train.yamlfile.load_yaml"
    assert call.search("cfg = yaml.safe_load(open(p))")  # the grep would find a new one
