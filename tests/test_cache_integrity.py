"""Caches that verify themselves (issue 32 item 2): every tokenized shard and the cached built-in
tokenizer carry a size and checksum record (train/data/checksums.py). A shard cut to a third, one
with 4 KiB flipped in the middle, or a tokenizer.json cut short is named in one warning line and
rebuilt, and the data that follows is the same as a fresh build's. A cache written before records
existed is trusted if it reads (and recorded), rebuilt if it does not.

Shards: a synthetic JSONL corpus of 700 documents, byte tokenizer, shards of 100 documents (7
shards, ~20 KB each): seconds. The tokenizer: builtin-bpe trained on the embedded corpus (~4 s
per training on the 2-core CI machine; trained three times here)."""
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from train.data import DataConfig, prepare, shards  # noqa: E402
from train.data import checksums  # noqa: E402
from train.data.api import build_stream  # noqa: E402
from train.objectives import ObjectiveConfig  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog def return import class 0 1 2 ( ) [ ] \n".split(" ")
N_DOCS, SHARD, BAD = 700, 100, 3  # shard 3 of 7 is the one corrupted


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity")
    rs = np.random.default_rng(5)
    with open(d / "docs.jsonl", "w") as f:
        for _ in range(N_DOCS):
            f.write(json.dumps({"text": " ".join(rs.choice(WORDS, size=int(rs.integers(20, 80))))}) + "\n")
    return d


def _cfg(corpus, cache, **kw):
    kw = {"num_proc": 1, **kw}
    return DataConfig(source="files", train_files=[str(corpus / "docs.jsonl")], tokenizer="builtin-bytes",
                      eval_fraction=0.1, cache_dir=str(cache), shard_documents=SHARD, **kw)


def _tokens(prep):
    s = prep.train.store
    return [s.tokens(i).tolist() for i in range(s.num_docs)]


def _first_batch(prep):
    stream = build_stream(prep, ObjectiveConfig(name="plm", seq_length=64), "nd", global_batch_size=4)
    return {k: v.tolist() for k, v in next(iter(stream)).items()}


def _shards(cache):
    return sorted((cache / "tokenized").glob("*/shard-*.arrow"))


@pytest.fixture(scope="module")
def fresh(corpus, tmp_path_factory):
    """A clean build: its tokens, first batch and shard bytes are what every repaired cache must give."""
    cache = tmp_path_factory.mktemp("fresh")
    prep = prepare(_cfg(corpus, cache))
    return _tokens(prep), _first_batch(prep), [p.read_bytes() for p in _shards(cache)]


def _truncate(p):
    os.truncate(p, p.stat().st_size // 3)


def _flip_middle(p):
    n = p.stat().st_size
    with open(p, "r+b") as f:
        f.seek(n // 2 - 2048)
        block = f.read(4096)
        f.seek(n // 2 - 2048)
        f.write(bytes(b ^ 0xFF for b in block))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "archscale.data"]


def test_each_shard_is_written_with_its_record(corpus, fresh, tmp_path):
    prepare(_cfg(corpus, tmp_path))
    paths = _shards(tmp_path)
    assert len(paths) == 7
    for p in paths:
        rec = json.loads(checksums.record_path(p).read_text())
        assert rec["size"] == p.stat().st_size and rec["xxh3_128"] == checksums.digest(p)
        assert checksums.problem(p) is None
    # deterministic bytes: a second cache built with two processes has the same shards and records
    prepare(_cfg(corpus, tmp_path / "par", num_proc=2))
    assert [p.read_bytes() for p in _shards(tmp_path / "par")] == fresh[2]
    assert [checksums.record_path(p).read_text() for p in _shards(tmp_path / "par")] == \
        [checksums.record_path(p).read_text() for p in paths]


@pytest.mark.parametrize("corrupt, why", [(_truncate, "cut short"), (_flip_middle, "checksum differs")])
def test_a_corrupt_shard_is_named_and_rebuilt(corpus, fresh, tmp_path, monkeypatch, caplog, corrupt, why):
    cfg = _cfg(corpus, tmp_path)
    prepare(cfg)
    bad = _shards(tmp_path)[BAD]
    corrupt(bad)
    assert checksums.problem(bad) is not None
    rebuilt = []
    monkeypatch.setattr(shards, "after_shard", rebuilt.append)
    with caplog.at_level("INFO", logger="archscale.data"):
        prep = prepare(cfg)
    lines = _warnings(caplog)
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert f"cached shard {bad} is corrupt ({'it is ' if why == 'cut short' else 'its '}" in lines[0]
    assert why in lines[0] and lines[0].endswith("re-tokenizing it from the source")
    assert rebuilt == [BAD]  # only that shard
    assert _tokens(prep) == fresh[0] and _first_batch(prep) == fresh[1]
    assert bad.read_bytes() == fresh[2][BAD] and checksums.problem(bad) is None
    caplog.clear()
    rebuilt.clear()
    prepare(cfg)  # the next open (another rank after the barrier) finds it whole
    assert rebuilt == [] and _warnings(caplog) == []


def test_a_large_cache_checks_sizes_at_open_and_checksums_on_verify(corpus, fresh, tmp_path, monkeypatch, caplog,
                                                                     capsys):
    """Above VERIFY_BYTES an open checks sizes and that each shard reads as Arrow;
    `archscale tokenize --verify` checks every checksum."""
    monkeypatch.setattr(shards, "VERIFY_BYTES", 0)
    cfg = _cfg(corpus, tmp_path)
    prepare(cfg)
    paths = _shards(tmp_path)
    _truncate(paths[1])
    with open(paths[2], "r+b") as f:  # the Arrow header (same size): found when the shard is opened
        f.write(b"\xff" * 64)
    _flip_middle(paths[BAD])  # only in the tokens: not seen at open
    with caplog.at_level("INFO", logger="archscale.data"):
        prep = prepare(cfg)
    lines = _warnings(caplog)
    assert len(lines) == 2 and "cut short" in lines[0] and str(paths[1]) in lines[0], lines
    assert str(paths[2]) in lines[1] and "does not read as Arrow" in lines[1]
    assert "checksums by `archscale tokenize --verify`" in caplog.text
    assert _tokens(prep) != fresh[0]  # the flipped tokens went through: the documented limit
    caplog.clear()
    from train.cli import main

    ov = ["data.source=files", f"data.train_files=[{corpus / 'docs.jsonl'}]", "data.tokenizer=builtin-bytes",
          "data.eval_fraction=0.1", f"data.cache_dir={tmp_path}", f"data.shard_documents={SHARD}", "data.num_proc=1"]
    with caplog.at_level("INFO", logger="archscale.data"):
        assert main(["tokenize", *ov, "--verify"]) == 0
    lines = _warnings(caplog)
    assert len(lines) == 1 and str(paths[BAD]) in lines[0] and "checksum differs" in lines[0], lines
    assert shards.VERIFY_BYTES == 0  # --verify is for that command only
    assert _tokens(prepare(cfg)) == fresh[0]


def test_a_cache_written_before_records_is_trusted_if_it_reads(corpus, fresh, tmp_path, monkeypatch, caplog):
    cfg = _cfg(corpus, tmp_path)
    prepare(cfg)
    paths = _shards(tmp_path)
    for p in paths:
        checksums.record_path(p).unlink()
    _truncate(paths[BAD])  # an old cache with a shard cut short: it does not read, so it is rebuilt
    rebuilt = []
    monkeypatch.setattr(shards, "after_shard", rebuilt.append)
    monkeypatch.setattr(shards, "VERIFY_BYTES", 0)  # a large cache: trusted, not hashed at open
    with caplog.at_level("INFO", logger="archscale.data"):
        prep = prepare(cfg)
    assert rebuilt == [BAD] and _tokens(prep) == fresh[0]
    lines = _warnings(caplog)
    assert len(lines) == 1 and str(paths[BAD]) in lines[0] and "does not read as Arrow" in lines[0], lines
    assert caplog.text.count("have no checksum record") == 1
    assert "6 cached shard(s) have no checksum record (written before records existed, e.g. " in caplog.text
    assert "they read, so they are trusted; `archscale tokenize --verify` records them" in caplog.text
    assert [checksums.has_record(p) for p in paths] == [i == BAD for i in range(7)]
    monkeypatch.setattr(shards, "VERIFY_BYTES", 4 << 30)  # a small cache: recorded at the first open
    caplog.clear()
    with caplog.at_level("INFO", logger="archscale.data"):
        assert _tokens(prepare(cfg)) == fresh[0]
    assert "they read, so they are trusted; records written now" in caplog.text and rebuilt == [BAD]
    assert all(checksums.problem(p) is None for p in paths)  # the next open checks them


def test_a_corrupt_cached_tokenizer_is_named_and_trained_again(tmp_path, caplog):
    from train.data.tokenizer import builtin_bpe_path, load_tokenizer, tokenizer_fingerprint

    cfg = DataConfig(cache_dir=str(tmp_path))
    path = builtin_bpe_path(cfg)
    clean = open(path, "rb").read()
    text = "def f(x):\n    return x + 1  # a comment\n"
    tok, _ = load_tokenizer(cfg)
    want = (tok(text)["input_ids"], tokenizer_fingerprint(tok))
    os.truncate(path, len(clean) // 3)
    with caplog.at_level("INFO", logger="archscale.data"):
        tok, _ = load_tokenizer(cfg)
    lines = _warnings(caplog)
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert f"the cached tokenizer {path} is corrupt (it is {len(clean) // 3} bytes, written as {len(clean)}: cut " \
           f"short); training it again" in lines[0]
    assert (tok(text)["input_ids"], tokenizer_fingerprint(tok)) == want and open(path, "rb").read() == clean
    # written before records existed: a whole file is trusted and recorded; one cut short is trained again
    checksums.record_path(path).unlink()
    caplog.clear()
    assert builtin_bpe_path(cfg) == path and _warnings(caplog) == [] and checksums.problem(path) is None
    checksums.record_path(path).unlink()
    os.truncate(path, len(clean) // 3)
    with caplog.at_level("INFO", logger="archscale.data"):
        tok, _ = load_tokenizer(cfg)
    lines = _warnings(caplog)
    assert len(lines) == 1 and "it does not parse: EOF while parsing" in lines[0], lines
    assert tokenizer_fingerprint(tok) == want[1] and open(path, "rb").read() == clean


def test_a_corrupt_datasets_cache_of_the_source_files_is_built_again(corpus, fresh, tmp_path, caplog):
    """datasets' own Arrow cache of the source files (CACHE/datasets/...) cut short: was a one-line
    'datasets could not read N json file(s)' that blamed the files; now rebuilt from them."""
    cfg = _cfg(corpus, tmp_path)
    prepare(cfg)
    (source,) = (tmp_path / "datasets").rglob("*.arrow")
    _truncate(source)
    for p in _shards(tmp_path):  # tokenized again from the rebuilt source: the same tokens
        p.unlink()
    with caplog.at_level("INFO", logger="archscale.data"):
        prep = prepare(cfg)
    lines = _warnings(caplog)
    assert len(lines) == 1 and "datasets' cache of these files under" in lines[0], lines
    assert "did not read (OSError: Expected to be able to read" in lines[0] and "built it again" in lines[0]
    assert _tokens(prep) == fresh[0] and [p.read_bytes() for p in _shards(tmp_path)] == fresh[2]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_shard_to_rebuild_whose_source_is_gone_is_one_line(corpus, fresh, tmp_path, monkeypatch, caplog, damage):
    """A shard that must be re-tokenized (cut short, or deleted) when the source dataset's files are gone
    (here `datasets`' cache of the source, deleted after it was loaded: the window there is, since the
    tokenized cache is found by the source's fingerprint): one ValueError line naming the shard, the
    missing source and the fix; no warning that it is being rebuilt, nothing written."""
    from train.data import corpus as corpus_mod

    cfg = _cfg(corpus, tmp_path)
    prepare(cfg)
    bad = _shards(tmp_path)[BAD]
    _truncate(bad) if damage == "truncate" else bad.unlink()
    load = corpus_mod.load_files

    def load_then_lose_the_source(*a, **kw):
        ds = load(*a, **kw)
        for f in ds.cache_files:  # memory-mapped: ds still reads; a worker opening it by name would not
            os.unlink(f["filename"])
        return ds

    monkeypatch.setattr(corpus_mod, "load_files", load_then_lose_the_source)
    with caplog.at_level("INFO", logger="archscale.data"), pytest.raises(ValueError) as e:
        prepare(cfg)
    msg = str(e.value)
    assert "\n" not in msg and f"cached shard {bad} must be re-tokenized" in msg, msg
    assert ("cut short" if damage == "truncate" else "missing") in msg
    assert "but its source " in msg and "json-train.arrow is gone; restore the source" in msg
    assert f"or a whole copy of the cache (the shard and its {bad.name}.sum)" in msg
    assert _warnings(caplog) == [] and bad.exists() == (damage == "truncate")


@pytest.mark.slow
def test_after_a_killed_tokenization_its_shards_are_checksummed_above_the_cap(corpus, fresh, tmp_path, monkeypatch,
                                                                            caplog):
    """The crash rule (train/data/shards.py): a tokenization SIGKILLed after its first shard leaves its
    marker; above VERIFY_BYTES (here 0: only sizes at open) the next open checksums the shards that
    writer listed, so 4 KiB flipped in the shard it wrote is found and rebuilt; the marker is removed
    after; the open after that checks sizes only again."""
    import subprocess
    import sys

    cfg = _cfg(corpus, tmp_path)
    code = ("import os, signal, sys\nsys.path.insert(0, %r)\nfrom tests.test_cache_integrity import _cfg\n"
            "from pathlib import Path\nfrom train.data import prepare, shards\n"
            "shards.after_shard = lambda i: os.kill(os.getpid(), signal.SIGKILL)\n"
            "prepare(_cfg(Path(%r), Path(%r)))\n") % (os.getcwd(), str(corpus), str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    (mark,) = (tmp_path / "tokenized").glob(f"*/{shards.MARK}*.json")
    assert json.loads(mark.read_text())["shards"] == list(range(7))
    (first,) = _shards(tmp_path)  # the one shard it wrote before the kill
    _flip_middle(first)
    monkeypatch.setattr(shards, "VERIFY_BYTES", 0)
    rebuilt = []
    monkeypatch.setattr(shards, "after_shard", rebuilt.append)
    with caplog.at_level("INFO", logger="archscale.data"):
        prep = prepare(cfg)
    lines = _warnings(caplog)
    assert len(lines) == 2 and "did not end cleanly; checking the checksums of the shards it wrote" in lines[0], lines
    assert f"cached shard {first} is corrupt (its checksum differs" in lines[1]
    assert sorted(rebuilt) == list(range(7)) and _tokens(prep) == fresh[0] and not mark.exists()
    _flip_middle(first)  # no crash now: above the cap, the next open checks sizes only (the documented limit)
    caplog.clear()
    with caplog.at_level("INFO", logger="archscale.data"):
        prepare(cfg)
    assert _warnings(caplog) == []


def test_markers_of_running_writers_and_of_other_machines(tmp_path, monkeypatch):
    """A marker of a writer alive on this machine (this boot) is not a crash; one of this machine whose
    pid is gone (or of an earlier boot) is, and is removed after the check; one of another machine
    cannot be asked: its shards are checked while it stays, and only a full --verify removes it."""
    import socket
    import subprocess

    d, here, boot = tmp_path, socket.gethostname(), shards._boot_id()
    live = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        marks = {"live": (here, live.pid, boot, [0]), "dead": (here, dead.pid, boot, [1]),
                 "reboot": (here, live.pid, "an-earlier-boot", [2]), "other": ("node-b", live.pid, boot, [3, 9])}
        for name, (host, pid, b, ids) in marks.items():
            (d / f"{shards.MARK}{name}.json").write_text(json.dumps({"host": host, "pid": pid, "boot": b, "shards": ids}))
        suspect, stale = shards._crashed(d, 0, 5, everything=False)
        assert suspect == {1, 2, 3} and sorted(p.name for p in stale) == [f"{shards.MARK}{n}.json" for n in ("dead", "reboot")]
        suspect, stale = shards._crashed(d, 0, 5, everything=True)
        assert suspect == {1, 2, 3} and len(stale) == 3
        assert shards._crashed(d, 4, 5, everything=True) == (set(), [])  # lists none of the range: left
    finally:
        live.kill()
        live.wait()
