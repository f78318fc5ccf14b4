"""Sharded tokenization (issue 18 item 5): parallel == serial, a killed run resumes from the shards
written, the `archscale tokenize` command (local shard range, rendered job array), bad input.

A synthetic JSONL corpus of 700 documents (a few null rows, skipped), byte tokenizer, shards of
100 documents: 7 shards. Seconds in all."""
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from train.data import DataConfig, prepare  # noqa: E402
from train.data import shards  # noqa: E402
from test_slurm import final_state, wait_for  # noqa: E402  (the cluster itself: conftest's slurm_cluster)

WORDS = "the quick brown fox jumps over a lazy dog def return import class 0 1 2 ( ) [ ] \n".split(" ")
N_DOCS, SHARD = 700, 100


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rs = np.random.default_rng(3)
    with open(d / "docs.jsonl", "w") as f:
        for i in range(N_DOCS):
            text = None if i % 97 == 11 else " ".join(rs.choice(WORDS, size=int(rs.integers(0, 80))))
            f.write(json.dumps({"text": text}) + "\n")
    return d


def _cfg(corpus, cache, **kw):
    kw = {"shard_documents": SHARD, "bad_rows": "skip", **kw}
    return DataConfig(source="files", train_files=[str(corpus / "docs.jsonl")], tokenizer="builtin-bytes",
                      eval_fraction=0.1, cache_dir=str(cache), **kw)


def _tokens(prep):
    s = prep.train.store
    return s.lengths.copy(), [s.tokens(i).copy() for i in range(s.num_docs)], s.fingerprint


def _shard_files(cache):
    return sorted(p.name for p in (cache / "tokenized").glob("*/shard-*.arrow"))


def _same(a, b):
    assert np.array_equal(a[0], b[0]) and a[2] == b[2]
    assert len(a[1]) == len(b[1]) and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))


@pytest.fixture(scope="module")
def serial(corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("serial")
    return _tokens(prepare(_cfg(corpus, cache, num_proc=1))), cache


def test_parallel_equals_serial_and_one_big_shard(corpus, serial, tmp_path):
    ref, cache = serial
    assert _shard_files(cache) == [f"shard-{i:05d}-of-00007.arrow" for i in range(7)]
    assert (ref[0] == -1).sum() == len(range(11, N_DOCS, 97))  # null rows kept as -1, skipped later
    _same(_tokens(prepare(_cfg(corpus, tmp_path / "par", num_proc=2))), ref)
    _same(_tokens(prepare(_cfg(corpus, tmp_path / "one", num_proc=0, shard_documents=10000))), ref)
    assert _shard_files(tmp_path / "one") == ["shard-00000-of-00001.arrow"]


def test_default_is_one_process_per_available_core():
    assert DataConfig().num_proc == 0
    assert shards.processes(0) == len(os.sched_getaffinity(0)) and shards.processes(3) == 3


def test_killed_tokenization_resumes_from_the_shards_written(corpus, serial, tmp_path, monkeypatch, caplog):
    ref, _ = serial
    cfg = _cfg(corpus, tmp_path, num_proc=1)
    written = []

    def crash(i):
        written.append(i)
        if len(written) == 3:
            raise KeyboardInterrupt("killed")  # as a kill between shards

    monkeypatch.setattr(shards, "after_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert _shard_files(tmp_path) == [f"shard-{i:05d}-of-00007.arrow" for i in written]
    assert not list((tmp_path / "tokenized").glob("*/.*tmp"))  # no half-written shard left behind
    again = []
    monkeypatch.setattr(shards, "after_shard", again.append)
    with caplog.at_level("INFO", logger="archscale.data"):
        _same(_tokens(prepare(cfg)), ref)
    assert sorted(again) == [i for i in range(7) if i not in written]  # only the missing shards
    assert "3 already done, tokenizing 4" in caplog.text
    again.clear()
    _same(_tokens(prepare(cfg)), ref)  # a second run (another rank): everything cached
    assert again == []


def test_a_crashed_worker_keeps_the_shards_written(tmp_path):
    """A shard that fails in a pool worker (a null row in shard 4 under data.bad_rows='error', raised
    inside the worker, which starts from the fork server and shares nothing with this process): the
    error reaches the caller, shard 4 and its temporary file are not left behind, the shards finished
    stay, and a second run keeps them (it tokenizes only what is missing, then fails on shard 4 again)."""
    rs = np.random.default_rng(5)
    d = tmp_path / "data"
    d.mkdir()
    with open(d / "docs.jsonl", "w") as f:
        for i in range(N_DOCS):
            f.write(json.dumps({"text": None if i == 450 else " ".join(rs.choice(WORDS, size=20))}) + "\n")
    cfg = _cfg(d, tmp_path / "cache", num_proc=2, bad_rows="error")
    with pytest.raises(ValueError, match="row 450 has no 'text' text"):
        prepare(cfg)
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "tokenized").glob("*/shard-*.arrow")}
    assert "shard-00004-of-00007.arrow" not in kept
    assert not list((tmp_path / "cache" / "tokenized").glob("*/.*tmp"))  # its temporary file removed
    seen = []
    shards.after_shard = seen.append
    try:
        with pytest.raises(ValueError, match="row 450"):
            prepare(cfg)
    finally:
        shards.after_shard = None
    assert not set(seen) & {int(n[6:11]) for n in kept}  # no finished shard tokenized again
    assert all(p.stat().st_mtime_ns == kept[p.name] for p in (tmp_path / "cache" / "tokenized").glob("*/shard-*.arrow")
               if p.name in kept)


def _cli(*argv):
    from train.cli import main

    return main(["tokenize", *argv])


def _overrides(corpus, cache):
    return ["data.source=files", f"data.train_files=[{corpus / 'docs.jsonl'}]", "data.tokenizer=builtin-bytes",
            "data.bad_rows=skip", "data.eval_fraction=0.1", f"data.cache_dir={cache}", f"data.shard_documents={SHARD}"]


def test_cli_shard_ranges_then_the_rest(corpus, serial, tmp_path, capsys):
    ref, _ = serial
    ov = _overrides(corpus, tmp_path)
    assert _cli(*ov, "--shard-range", "0:2") == 0
    assert _cli(*ov, "--shard-range", "5:99") == 0  # B capped at the shard count (the last array task)
    assert _shard_files(tmp_path) == [f"shard-{i:05d}-of-00007.arrow" for i in (0, 1, 5, 6)]
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["shards"] == "5:7"
    assert _cli(*ov) == 0
    assert len(_shard_files(tmp_path)) == 7
    _same(_tokens(prepare(_cfg(corpus, tmp_path))), ref)


def test_submit_dry_run_renders_the_array(corpus, tmp_path, capsys):
    ov = _overrides(corpus, tmp_path)
    assert _cli(*ov, "--submit", "--shards-per-task", "3", "--dry-run", "--cpus-per-task", "16", "--time", "60") == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-2\n" in out and "#SBATCH --cpus-per-task=16" in out and "#SBATCH --time=60" in out
    assert "K=3\n" in out and 'A=$((SLURM_ARRAY_TASK_ID * K))' in out
    assert "-m train tokenize" in out and '--shard-range "$A:$((A + K))"' in out and "data.shard_documents=100" in out
    assert "7 shard(s) of 100, 3 task(s)" in out
    assert not (tmp_path / "tokenized").exists()  # a dry run tokenizes and writes nothing
    assert len([line for line in out.splitlines() if not line.startswith("#") and line.strip()]) <= 6  # thin


@pytest.mark.parametrize("argv, words", [
    (["--shard-range", "9:12"], "shard range '9:12' is not valid"),
    (["--shard-range", "3:2"], "0 <= A < B"),
    (["--shard-range", "x"], "expected A:B"),
    (["--shard-range", "0:1", "--submit"], "do not go together"),
    (["--submit", "--shards-per-task", "0"], "--shards-per-task=0 must be at least 1"),
    (["data.num_proc=-1"], "data.num_proc=-1 must be an integer >= 0 (0 = one process per available core)"),
    (["data.shard_documents=0"], "data.shard_documents=0 must be an integer >= 1"),
])
def test_bad_input_is_one_line(corpus, tmp_path, capsys, argv, words):
    assert _cli(*_overrides(corpus, tmp_path), *argv) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error" in line]  # not datasets' progress
    assert len(lines) == 1 and words in lines[0] and lines[0] == err.splitlines()[-1], err
    assert not list((tmp_path / "tokenized").glob("*/*.arrow"))


def test_num_proc_below_zero_is_refused():
    with pytest.raises(ValueError, match=r"data.num_proc=-2 must be an integer >= 0"):
        DataConfig(num_proc=-2)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_sigkilled_tokenization_resumes(corpus, serial, tmp_path, num_proc):
    """A real SIGKILL of `archscale tokenize` after its 2nd shard: the shards written survive (with a
    pool, its orphaned workers may finish more; a half-written .tmp file is never counted), and the
    rerun tokenizes the rest."""
    import signal
    import subprocess
    import sys

    ref, _ = serial
    code = ("import os, signal, sys\nfrom train.data import shards\nseen = []\n"
            "def hook(i):\n    seen.append(i)\n    if len(seen) == 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            "shards.after_shard = hook\nfrom train.cli import main\nsys.exit(main(['tokenize', *sys.argv[1:]]))\n")
    p = subprocess.run([sys.executable, "-c", code, *_overrides(corpus, tmp_path), f"data.num_proc={num_proc}"],
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    done = _shard_files(tmp_path)
    assert len(done) == 2 if num_proc == 1 else 2 <= len(done) <= 7, done
    _same(_tokens(prepare(_cfg(corpus, tmp_path, num_proc=2))), ref)
    assert len(_shard_files(tmp_path)) == 7


@pytest.mark.slow
def test_submit_runs_the_array_on_the_local_cluster(slurm_cluster, corpus, serial, tmp_path, capsys):
    """`archscale tokenize --submit` on the real local Slurm cluster (tests/test_slurm.py's fixture):
    3 array tasks of 3 shards write the 7 shards; the training-side prepare then tokenizes nothing."""
    ref, _ = serial
    ov = _overrides(corpus, tmp_path)
    assert _cli(*ov, "--submit", "--shards-per-task", "3", "--time", "10") == 0
    job = capsys.readouterr().out.split()[-1]
    tasks = [f"{job}_{t}" for t in range(3)]
    logs = tmp_path / "tokenized" / "slurm"
    states = wait_for(lambda: (lambda s: s if all(s) else None)([final_state(t) for t in tasks]), 180,
                      "the tokenize array", logs)
    assert states == ["COMPLETED"] * 3, states
    assert len(_shard_files(tmp_path)) == 7
    seen = []
    shards.after_shard = seen.append
    try:
        _same(_tokens(prepare(_cfg(corpus, tmp_path))), ref)
    finally:
        shards.after_shard = None
    assert seen == []
