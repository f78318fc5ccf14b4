"""Data: reading, tokenizers, packing, sharding, resumption, multitask format, bad data."""
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from train.data import DataConfig, build_stream, prepare, rank_classification_examples  # noqa: E402
from train.data.corpus import EMBEDDED_EXCLUDE, embedded_files, held_out_mask  # noqa: E402
from train.data.tokenizer import _bytes_tokenizer, _train_bpe, _wrap, load_tokenizer  # noqa: E402
from train.objectives import IGNORE, ObjectiveConfig, merge_by_sentinels  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum old tunes".split()


def _docs(n=40, seed=0):
    rs = np.random.default_rng(seed)
    return [" ".join(rs.choice(WORDS, size=int(rs.integers(1, 40)))) for _ in range(n)]


def _jsonl(path, docs, field="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({field: d}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    path = _jsonl(d / "docs.jsonl", _docs())
    cfg = DataConfig(source="files", train_files=[path], tokenizer="builtin-bytes", eval_fraction=0.1,
                     cache_dir=str(d / "cache"), pack_lookahead=4)
    return cfg, prepare(cfg)


def _stream(corpus, name="flm", arch="cd", G=4, rank=0, world=1, seed=0, split="train", **kw):
    cfg, prepared = corpus
    ocfg = ObjectiveConfig(name=name, **({"seq_length": 160} | kw))
    return build_stream(prepared, ocfg, arch, global_batch_size=G, rank=rank, world_size=world, seed=seed,
                        split=split, data=cfg)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------- the stream
@pytest.mark.parametrize("name,arch,kw", [("flm", "cd", {}), ("plm", "nd", {}), ("plm", "ed", {}),
                                          ("mlm", "ed", dict(seq_length=120, inputs_length=98, targets_length=22)),
                                          ("ul2", "nd", {})])
def test_resume_after_n_batches_equals_uninterrupted(corpus, name, arch, kw):
    full = _take(_stream(corpus, name, arch, **kw), 14)  # crosses epoch boundaries on this small corpus
    s = _stream(corpus, name, arch, **kw)
    head = _take(s, 5)
    state = json.loads(json.dumps(s.state_dict()))  # what a checkpoint stores
    resumed = _stream(corpus, name, arch, **kw)
    resumed.load_state_dict(state)
    tail = _take(resumed, 9)
    assert all(_same(a, b) for a, b in zip(full, head + tail))
    assert resumed.state_dict()["epoch"] >= 1


def test_resume_restores_waiting_pieces_and_epoch(corpus):
    s = _stream(corpus, "plm", "ed", G=2)
    states = []
    for _ in range(30):
        next(s)
        states.append(s.state_dict())
    with_waiting = [st for st in states if st["waiting"]]
    assert with_waiting, "the test must exercise a packer state with waiting pieces"
    st = with_waiting[len(with_waiting) // 2]
    i = states.index(st)
    ref = _stream(corpus, "plm", "ed", G=2)
    want = _take(ref, i + 4)[i + 1:]
    r = _stream(corpus, "plm", "ed", G=2)
    r.load_state_dict(st)
    assert all(_same(a, b) for a, b in zip(want, _take(r, 3)))
    assert len(json.dumps(st)) < 2000  # the position is small


def test_same_seed_same_stream_other_seed_other_stream(corpus):
    a, b, c = (_take(_stream(corpus, "mlm", "nd", seed=s, seq_length=120, inputs_length=98, targets_length=22), 3)
               for s in (7, 7, 8))
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not all(_same(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("name,arch", [("flm", "cd"), ("mlm", "ed")])
def test_sharding_disjoint_and_complete(corpus, name, arch):
    kw = dict(seq_length=120, inputs_length=98, targets_length=22) if name == "mlm" else {}
    single = _take(_stream(corpus, name, arch, G=8, **kw), 6)
    ranks = [_take(_stream(corpus, name, arch, G=8, rank=r, world=4, **kw), 6) for r in range(4)]
    for step, whole in enumerate(single):
        parts = [ranks[r][step] for r in range(4)]
        assert all(p["input_ids"].shape[0] == 2 for p in parts)
        for k in whole:  # rank r holds rows [2r, 2r+2) of the global batch: disjoint, union = all
            if whole[k].dim() > 0:
                assert torch.equal(torch.cat([p[k] for p in parts]), whole[k]), k
            else:
                assert int(sum(p[k] for p in parts)) == int(whole[k]), k


def test_resume_on_another_world_size(corpus):
    s = _stream(corpus, "flm", "cd", G=4, rank=0, world=2)
    _take(s, 3)
    state = s.state_dict()
    ref = _take(_stream(corpus, "flm", "cd", G=4), 6)[3:]  # one rank, same global batch
    r = _stream(corpus, "flm", "cd", G=4, rank=0, world=1)
    r.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(ref, _take(r, 3)))


def test_one_epoch_covers_every_piece_exactly_once(corpus):
    cfg, prepared = corpus
    s = _stream(corpus, "flm", "cd", G=3, seq_length=40)
    got = Counter()
    while s.state_dict()["epoch"] == 0:
        b = next(s)
        for r in range(b["input_ids"].shape[0]):
            for seg in set(b["segment_ids"][r].tolist()) - {0}:
                got[tuple(b["input_ids"][r][b["segment_ids"][r] == seg].tolist())] += 1
    want = Counter()
    tr = prepared.train
    for d in tr.doc_ids:
        toks = tr.store.tokens(int(d)).tolist() + [prepared.tokens.eos_id]
        for i in range(0, len(toks), 40):
            if len(toks[i:i + 40]) >= 2:
                want[tuple(toks[i:i + 40])] += 1
    assert got == want
    st = s.state_dict()["stats"]
    assert st["documents"] == len(tr.doc_ids)


def test_eval_split_is_one_pass_in_file_order_and_disjoint_from_train(corpus):
    cfg, prepared = corpus
    assert set(prepared.eval.doc_ids.tolist()).isdisjoint(prepared.train.doc_ids.tolist())
    assert len(prepared.eval.doc_ids) + len(prepared.train.doc_ids) == prepared.train.store.num_docs
    a = list(_stream(corpus, "flm", "cd", split="eval"))
    b = list(_stream(corpus, "flm", "cd", split="eval", seed=99))
    assert 0 < len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def test_nd_targets_never_bidirectional_and_counts(corpus):
    for name, kw in (("plm", {}), ("mlm", dict(seq_length=120, inputs_length=98, targets_length=22)), ("ul2", {})):
        for b in _take(_stream(corpus, name, "nd", **kw), 4):
            assert not (b["bidirectional"] & (b["labels"] != IGNORE)).any()
            assert b["bidirectional"].any()
            assert int(b["num_target_tokens"]) == int((b["labels"] != IGNORE).sum())
            assert int(b["num_tokens"]) == int((b["segment_ids"] != 0).sum())


def test_mlm_stream_examples_reconstruct_the_documents(corpus):
    cfg, prepared = corpus
    s = _stream(corpus, "mlm", "ed", seq_length=120, inputs_length=98, targets_length=22)
    b = next(s)
    sent = prepared.tokens.sentinel_ids
    texts = set()
    for d in prepared.train.doc_ids:
        texts.add(prepared.tokenizer.decode(prepared.train.store.tokens(int(d)).tolist()))
    for r in range(b["input_ids"].shape[0]):
        for seg in set(b["segment_ids"][r].tolist()) - {0}:
            inp = b["input_ids"][r][b["segment_ids"][r] == seg]
            tgt = b["labels"][r][b["decoder_segment_ids"][r] == seg]
            piece = prepared.tokenizer.decode(merge_by_sentinels(inp, tgt, sent, prepared.tokens.eos_id).tolist())
            assert any(piece in t for t in texts)


def test_skipped_short_pieces_are_counted(corpus):
    # rows of 8 tokens: documents whose length + EOS is 1 more than a multiple of 8 leave a 1-token tail
    s = _stream(corpus, "flm", "cd", seq_length=8)
    while s.state_dict()["epoch"] == 0:
        next(s)
    _, prepared = corpus
    n = prepared.train.store.lengths[prepared.train.doc_ids] + 1
    st = s.state_dict()["stats"]
    assert st["skipped_short_pieces"] == int((n % 8 == 1).sum()) > 0
    assert st["tokens"] + st["skipped_short_tokens"] == int(n.sum())


def test_bad_stream_arguments(corpus):
    with pytest.raises(ValueError, match="not divisible by world_size=3"):
        _stream(corpus, G=4, world=3)
    with pytest.raises(ValueError, match="rank=2 must be < world_size=2"):
        _stream(corpus, G=4, rank=2, world=2)
    with pytest.raises(ValueError, match="too short"):
        _stream(corpus, "ul2", "nd", seq_length=3)
    s = _stream(corpus, seed=1)
    with pytest.raises(ValueError, match="different data / objective / seed"):
        s.load_state_dict(_stream(corpus, seed=2).state_dict())
    with pytest.raises(ValueError, match="objective 'prompted' does not match"):
        _stream(corpus, "prompted", "nd")


# --------------------------------------------------------------------------------------- bad data
def _prepare_files(tmp_path, files, **kw):
    cfg = DataConfig(source="files", train_files=[str(f) for f in files], tokenizer="builtin-bytes",
                     cache_dir=str(tmp_path / "cache"), eval_fraction=0.0, **kw)
    return cfg, prepare(cfg)


def test_empty_files_skipped_and_all_empty_is_an_error(tmp_path, caplog):
    good = tmp_path / "a.txt"
    good.write_text("one document\n\nanother paragraph\n")
    empty = tmp_path / "b.txt"
    empty.write_text("")
    with caplog.at_level(logging.WARNING, logger="archscale.data"):
        _, prepared = _prepare_files(tmp_path, [good, empty], text_sample_by="paragraph")
    assert "skipping 1 empty file" in caplog.text
    assert prepared.train.store.num_docs == 2
    with pytest.raises(ValueError, match="all 1 file\\(s\\) are empty"):
        _prepare_files(tmp_path, [empty])


def test_empty_documents_are_counted(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", ["", "some text here", "", "more text"])
    cfg, prepared = _prepare_files(tmp_path, [f])
    s = build_stream(prepared, ObjectiveConfig(name="flm", seq_length=64), "cd", global_batch_size=2, data=cfg)
    while s.state_dict()["epoch"] == 0:
        next(s)
    assert s.state_dict()["stats"]["empty_documents"] == 2


def test_invalid_utf8_named_or_replaced(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"bad.txt' is not valid UTF-8 \(byte 0xff at offset 10\).*encoding_errors"):
        _prepare_files(tmp_path, [bad])
    _, prepared = _prepare_files(tmp_path, [bad], encoding_errors="replace")
    assert prepared.train.store.lengths.sum() > 0


def test_jsonl_rows_missing_the_field(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text field"}\n{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"row 1 has no 'text' text .*bad_rows='skip'"):
        _prepare_files(tmp_path, [f])
    cfg, prepared = _prepare_files(tmp_path, [f], bad_rows="skip")
    s = build_stream(prepared, ObjectiveConfig(name="flm", seq_length=32), "cd", global_batch_size=1, data=cfg)
    while s.state_dict()["epoch"] == 0:
        next(s)
    assert s.state_dict()["stats"]["bad_rows"] == 1
    with pytest.raises(ValueError, match=r"no column 'content' .*set data.text_field"):
        _prepare_files(tmp_path, [f], text_field="content")


def test_missing_files_and_unknown_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        _prepare_files(tmp_path, [tmp_path / "nope-*.jsonl"])
    odd = tmp_path / "x.weird"
    odd.write_text("hello")
    with pytest.raises(ValueError, match="cannot tell the format"):
        _prepare_files(tmp_path, [odd])


def test_data_config_errors():
    with pytest.raises(ValueError, match=r"data.source='s3' is not valid; choose one of"):
        DataConfig(source="s3")
    with pytest.raises(ValueError, match="needs data.train_files"):
        DataConfig(source="files")
    with pytest.raises(ValueError, match="neither one of"):
        DataConfig(tokenizer="/no/such/dir")
    with pytest.raises(ValueError, match="eval_fraction"):
        DataConfig(eval_fraction=1.5)


# --------------------------------------------------------------------------------------- tokenizers
def test_builtin_bytes_layout_and_sentinels():
    tok, ti = load_tokenizer(DataConfig(tokenizer="builtin-bytes"))
    assert (ti.pad_id, ti.eos_id) == (0, 1)
    assert ti.sentinel_ids[0] == ti.vocab_size - 1 == len(tok) - 1  # <extra_id_0> is the highest id (T5)
    assert len(set(ti.sentinel_ids)) == 100 and dict(ti.mode_ids).keys() == {"[NLU]", "[NLG]", "[S2S]"}
    text = "naïve café — <extra_id_0> stays text"
    ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(ids) == len(text.encode()) and ti.sentinel_ids[0] not in ids
    assert tok.decode(ids) == text


def test_local_tokenizer_gets_sentinels_or_clear_error(tmp_path):
    plain = _wrap(_bytes_tokenizer())
    plain.save_pretrained(tmp_path / "tok")
    tok, ti = load_tokenizer(DataConfig(tokenizer=str(tmp_path / "tok"), num_sentinels=10))
    assert tok.convert_ids_to_tokens(ti.sentinel_ids[3]) == "<extra_id_3>"
    with pytest.raises(ValueError, match=r"259 tokens and needs 13 more .* max_vocab_size=262"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "tok"), num_sentinels=10, max_vocab_size=262))


def test_bpe_training_is_deterministic():
    texts = [open(f, encoding="utf-8").read() for f in embedded_files()[:12]]
    a, b = _train_bpe(texts, 600), _train_bpe(texts, 600)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 600


def test_embedded_corpus_file_list():
    files = embedded_files()
    assert files == embedded_files() and len(files) > 100
    assert all(f.endswith(".py") for f in files)
    assert not any(set(f.split(os.sep)) & set(EMBEDDED_EXCLUDE) - {"site-packages"} for f in files[:0])
    assert any(f.endswith(os.path.join("pydoc_data", "topics.py")) for f in files)  # the language docs
    assert not any(os.sep + "test" + os.sep in f for f in files)
    held = held_out_mask(len(files), 0.02)
    assert 0 < held.sum() < 0.05 * len(files) and (held == held_out_mask(len(files), 0.02)).all()


# --------------------------------------------------------------------------------------- multitask
def _mt(tmp_path, recs, name="mt.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n")
    return p


@pytest.mark.parametrize("rec,match", [
    ({"target": "x"}, r"mt.jsonl:2: 'input' must be a non-empty string"),
    ({"input": "q"}, r"mt.jsonl:2: the record has no 'target'"),
    ({"input": "q", "label": 0}, r"'label' needs 'answer_choices'"),
    ({"input": "q", "answer_choices": ["a", "b"], "label": 2}, r"'label'=2 must be an integer index in \[0, 1\]"),
    ({"input": "q", "answer_choices": ["a", "b"], "label": 0, "target": "b"}, r"differs from answer_choices\[0\]"),
    ({"input": "q", "answer_choices": "ab", "target": "a"}, r"'answer_choices' must be a list"),
    ("{not json", r"mt.jsonl:2: not valid JSON"),
])
def test_multitask_validation(tmp_path, rec, match):
    p = _mt(tmp_path, [{"input": "fine", "target": "ok"}, rec])
    cfg = DataConfig(source="files", format="multitask", train_files=[str(p)], tokenizer="builtin-bytes",
                     cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=match):
        prepare(cfg, ObjectiveConfig(name="prompted"))


@pytest.mark.parametrize("arch", ["nd", "ed"])
def test_prompted_stream_trains_on_targets_only(tmp_path, arch):
    recs = [{"input": f"Question {i}: is {i} even? Answer:", "answer_choices": ["yes", "no"], "label": i % 2,
             "task": "parity"} for i in range(12)]
    recs.append({"input": "x" * 300, "target": "a very long target " * 3})
    p = _mt(tmp_path, recs)
    cfg = DataConfig(source="files", format="multitask", train_files=[str(p)], tokenizer="builtin-bytes",
                     cache_dir=str(tmp_path / "c"))
    ocfg = ObjectiveConfig(name="prompted", seq_length=64, inputs_length=48, targets_length=16)
    prepared = prepare(cfg, ocfg)
    s = build_stream(prepared, ocfg, arch, global_batch_size=4, data=cfg)
    batches = _take(s, 4)
    tok = prepared.tokenizer
    for b in batches:
        lab = b["labels"]
        if arch == "nd":
            assert not (b["bidirectional"] & (lab != IGNORE)).any()
        for row in lab:
            text = tok.decode([t for t in row.tolist() if t not in (IGNORE, prepared.tokens.eos_id)])
            assert set(text.replace("yes", "").replace("no", "").replace("a very long targ", "")) <= {""}
    assert s.state_dict()["stats"]["truncated_examples"] == 1
    rc = rank_classification_examples(recs[3], tok)
    assert rc["label"] == 1 and tok.decode(rc["choices"][1][:-1]) == "no"
    with pytest.raises(ValueError, match="do not go together"):
        prepare(cfg, ObjectiveConfig(name="flm"))
