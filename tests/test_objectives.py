"""Objectives: T5 span corruption (golden + statistics), PLM splits, UL2, batch layout, errors."""
import numpy as np
import pytest
import torch

from train.objectives import (IGNORE, DenoiserConfig, Example, ObjectiveConfig, TokenInfo, build_objective,
                              collate, make_prompted, merge_by_sentinels, noise_span_to_unique_sentinel,
                              nonnoise_span_to_unique_sentinel, pop_counts, random_spans_helper,
                              random_spans_noise_mask, span_corruption_lengths)
from train.objectives import rng as orng
from train.registry import get

VOCAB = 5000
SENTINELS = tuple(range(VOCAB - 1, VOCAB - 101, -1))  # <extra_id_0> = highest id, as in T5
MODES = (("[NLU]", 4800), ("[NLG]", 4801), ("[S2S]", 4802))
TI = TokenInfo(VOCAB, pad_id=0, eos_id=1, sentinel_ids=SENTINELS, mode_ids=MODES)
S0, S1, S2 = SENTINELS[:3]


# ------------------------------------------------------------------------------------- golden cases
def test_random_spans_helper_reference_lengths():
    assert random_spans_helper(512, 0.15, 3.0) == (568, 114)  # the reference (T5 default) numbers
    assert random_spans_helper(626, 0.15, 3.0) == (694, 140)
    # T5's "minor hack" at density 0.5: targets length brought down to the inputs length
    assert random_spans_helper(64, 0.5, 3.0) == (94, 64)
    inp, tgt = span_corruption_lengths(568, 0.15, 3.0)
    assert (int(inp), int(tgt)) == (512, 114)


def test_sentinel_golden_by_hand():
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1], dtype=bool)
    # each noise run -> its own sentinel in the inputs
    assert noise_span_to_unique_sentinel(tokens, mask, SENTINELS).tolist() == [10, 11, S0, 14, 15, 16, S1]
    # targets: each kept run -> a sentinel, noise tokens kept
    assert nonnoise_span_to_unique_sentinel(tokens, mask, SENTINELS).tolist() == [S0, 12, 13, S1, 17]
    inputs = [10, 11, S0, 14, 15, 16, S1, 1]
    targets = [S0, 12, 13, S1, 17, 1]
    assert merge_by_sentinels(inputs, targets, SENTINELS, eos_id=1).tolist() == tokens.tolist()


def test_noise_mask_golden_small():
    # 6 tokens, density 0.5, mean span 3: round(3) = 3 noise tokens in round(1) = 1 span; the mask
    # starts with kept tokens and ends with noise, so it can only be F F F T T T.
    mask = random_spans_noise_mask(6, 0.5, 3.0, np.random.default_rng(0))
    assert mask.tolist() == [False, False, False, True, True, True]
    # 8 tokens, density 0.25, span 1: 2 noise tokens in 2 spans of 1; kept first, noise last
    for seed in range(20):
        m = random_spans_noise_mask(8, 0.25, 1.0, np.random.default_rng(seed))
        assert m.sum() == 2 and not m[0] and m[-1] and not (m[:-1] & m[1:]).any()


def test_objective_golden_mlm_example():
    obj = build_objective(ObjectiveConfig(name="mlm"), get("ed"), TI)
    tokens = np.arange(100, 120)  # 20 tokens: round(3) = 3 noise tokens, round(1) = 1 span
    ex = obj.make(tokens, 0, 7)
    assert len(ex.inputs) == 20 - 3 + 1 + 1 and len(ex.targets) == 3 + 1 + 1
    assert ex.inputs[-2:].tolist() == [S0, 1]  # the one span is at the end: ..., <extra_id_0>, </s>
    assert ex.inputs[:17].tolist() == list(range(100, 117))
    assert ex.targets.tolist() == [S0, 117, 118, 119, 1]


# ------------------------------------------------------------------------------------- statistics
def _runs(mask):
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.flatnonzero(d == -1) - np.flatnonzero(d == 1)


def test_span_statistics_over_many_examples():
    rs = np.random.default_rng(1234)
    noise = total = 0
    spans = []
    for n in rs.integers(100, 569, size=1500):
        m = random_spans_noise_mask(int(n), 0.15, 3.0, rs)
        noise += int(m.sum())
        total += int(n)
        spans.extend(_runs(m).tolist())
    assert abs(noise / total - 0.15) < 0.01
    assert abs(np.mean(spans) - 3.0) < 0.2
    # span lengths really vary (a geometric-like spread, not all 3s)
    assert np.std(spans) > 1.0


def test_merge_reconstructs_original_for_all_span_denoisers():
    cfg = ObjectiveConfig(name="ul2")
    obj = build_objective(cfg, get("nd"), TI)
    rs = np.random.default_rng(5)
    for v, var in enumerate(obj.variants):
        for i in range(60):
            n = int(rs.integers(2, obj.max_piece[v] + 1))
            tokens = rs.integers(100, 4000, size=n)
            word = orng.mix(9, v, i)
            ex = obj.make(tokens, v, word)
            prefix = 1 if cfg.denoisers[v].mode else 0
            assert ex.inputs[0] == TI.mode_id(cfg.denoisers[v].mode)
            inp, tgt = obj.lengths(n, v, word)
            assert (len(ex.inputs), len(ex.targets)) == (int(inp), int(tgt))
            if cfg.denoisers[v].kind == "span":
                back = merge_by_sentinels(ex.inputs, ex.targets, SENTINELS, eos_id=1, prefix_length=prefix)
            else:
                back = np.concatenate([ex.inputs[prefix:], ex.targets[:-1]])
                assert ex.targets[-1] == 1
            assert back.tolist() == tokens.tolist()


def test_merge_detects_inconsistent_pairs():
    with pytest.raises(ValueError, match="missing from the targets"):
        merge_by_sentinels([10, S0, S1], [S0, 5], SENTINELS)
    with pytest.raises(ValueError, match="no sentinel in the inputs"):
        merge_by_sentinels([10, S0], [S0, 5, S1, 6], SENTINELS)


def test_plm_split_points_uniform_chi_square():
    obj = build_objective(ObjectiveConfig(name="plm"), get("nd"), TI)
    n, draws = 11, 22000  # s in [1, 10]: 10 equally likely cells
    words = orng.mix(42, 0, np.arange(draws), 0)
    s, tgt = obj.lengths(np.full(draws, n), np.zeros(draws, int), words)
    assert s.min() == 1 and s.max() == n - 1 and (s + tgt == n).all()
    counts = np.bincount(s, minlength=n)[1:]
    expected = draws / (n - 1)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.88, counts  # chi-square, 9 dof, p = 0.001
    # and a real split of a real example matches the length computation
    ex = obj.make(np.arange(100, 100 + n), 0, words[3])
    assert len(ex.inputs) == s[3] and ex.inputs.tolist() + ex.targets.tolist() == list(range(100, 100 + n))


def test_ul2_denoiser_rates():
    cfg = ObjectiveConfig(name="ul2", denoisers=[
        DenoiserConfig("span", "[NLU]", 0.15, 3.0, 0.5),
        DenoiserConfig("prefix", "[S2S]", rate=0.25),
        {"kind": "span", "mode": "[NLG]", "noise_density": 0.5, "mean_span_length": 8.0, "rate": 0.25}])
    obj = build_objective(cfg, get("ed"), TI)
    v = obj.choose_variant(orng.mix(3, np.arange(40000)))
    freq = np.bincount(v, minlength=3) / len(v)
    assert np.allclose(freq, [0.5, 0.25, 0.25], atol=0.01), freq


# ------------------------------------------------------------------------------------- batch layout
def _pieces(obj, rs, count):
    out = []
    for i in range(count):
        n = int(rs.integers(2, min(obj.max_piece[0], 60) + 1))
        out.append(obj.make(rs.choice(np.arange(100, 4000), size=n, replace=False), 0, orng.mix(i)))
    return out


def _pack(examples, shape):
    """Greedy rows for tests (the real packer is in train.data)."""
    rows, cur, used = [], [], np.zeros(2, int)
    for ex in examples:
        need = np.array(shape.footprint(len(ex.inputs), len(ex.targets)))
        if (used + need > np.array(shape.capacity)).any():
            rows.append(cur)
            cur, used = [], np.zeros(2, int)
        cur.append(ex)
        used += need
    return rows + [cur]


@pytest.mark.parametrize("name", ["flm", "plm", "mlm", "ul2"])
@pytest.mark.parametrize("arch", ["cd", "nd"])
def test_decoder_layout_loss_mask_and_no_leak(name, arch):
    cfg = ObjectiveConfig(name=name, seq_length=120, inputs_length=98, targets_length=22)
    obj = build_objective(cfg, get(arch), TI)
    rs = np.random.default_rng(0)
    examples = _pieces(obj, rs, 20)
    rows = _pack(examples, obj.shape)
    b = collate(rows, obj.shape, TI)
    T = 120
    assert b["input_ids"].shape == (len(rows), T) and b["input_ids"].dtype == torch.long
    assert b["segment_ids"].dtype == torch.int64 and b["bidirectional"].dtype == torch.bool
    labels, bidir, seg, pos = b["labels"], b["bidirectional"], b["segment_ids"], b["position_ids"]
    # no target ever where the token is visible bidirectionally; cd has no bidirectional tokens
    assert not (bidir & (labels != IGNORE)).any()
    assert bidir.any() == (arch == "nd" and name != "flm")
    r = 0
    for row in rows:
        off = 0
        for j, ex in enumerate(row):
            n_in, n = len(ex.inputs), len(ex.inputs) + len(ex.targets)
            sl = slice(off, off + n)
            assert (seg[r, sl] == j + 1).all() and pos[r, sl].tolist() == list(range(n))
            want = [IGNORE] * n_in + ex.targets.tolist()
            want[0] = IGNORE  # first token of every packed example: no loss
            assert labels[r, sl].tolist() == want  # loss mask covers exactly the targets
            assert bidir[r, sl].tolist() == [arch == "nd"] * n_in + [False] * (n - n_in)
            off += n
        assert (seg[r, off:] == 0).all() and (labels[r, off:] == IGNORE).all() and (b["input_ids"][r, off:] == 0).all()
        assert pos[r, off:].tolist() == list(range(T - off))
        r += 1
    counts = pop_counts(b)
    assert counts["num_documents"] == len(examples)
    assert counts["num_tokens"] == sum(len(e.inputs) + len(e.targets) for e in examples)
    assert counts["num_target_tokens"] == sum(len(e.targets) - (len(e.inputs) == 0) for e in examples)
    assert "num_tokens" not in b


@pytest.mark.parametrize("name", ["plm", "mlm", "ul2"])
def test_cd_and_nd_differ_only_in_bidirectional(name):
    cfg = ObjectiveConfig(name=name, seq_length=120, inputs_length=98, targets_length=22)
    batches = []
    for arch in ("cd", "nd"):
        obj = build_objective(cfg, get(arch), TI)
        batches.append(collate(_pack(_pieces(obj, np.random.default_rng(3), 12), obj.shape), obj.shape, TI))
    cd, nd = batches
    for k in cd:
        if k != "bidirectional":
            assert torch.equal(cd[k], nd[k]), k
    assert not cd["bidirectional"].any() and nd["bidirectional"].any()


@pytest.mark.parametrize("name", ["plm", "mlm", "ul2"])
def test_encoder_decoder_layout_and_no_leak(name):
    cfg = ObjectiveConfig(name=name, seq_length=120, inputs_length=98, targets_length=22)
    obj = build_objective(cfg, get("ed"), TI)
    rs = np.random.default_rng(1)
    examples = _pieces(obj, rs, 16)
    rows = _pack(examples, obj.shape)
    b = collate(rows, obj.shape, TI)
    Ti, To = obj.shape.encoder_length, obj.shape.decoder_length
    assert b["input_ids"].shape == (len(rows), Ti) and b["labels"].shape == (len(rows), To)
    special = set(SENTINELS) | {1} | {m for _, m in MODES}
    for r, row in enumerate(rows):
        ei = di = 0
        for j, ex in enumerate(row):
            n_in, n_tgt = len(ex.inputs), len(ex.targets)
            enc = b["input_ids"][r, ei:ei + n_in].tolist()
            assert enc == ex.inputs.tolist() and (b["segment_ids"][r, ei:ei + n_in] == j + 1).all()
            assert b["labels"][r, di:di + n_tgt].tolist() == ex.targets.tolist()
            # T5 shift right per example, decoder start = pad id
            assert b["decoder_input_ids"][r, di:di + n_tgt].tolist() == [0] + ex.targets[:-1].tolist()
            assert b["decoder_position_ids"][r, di:di + n_tgt].tolist() == list(range(n_tgt))
            assert (b["decoder_segment_ids"][r, di:di + n_tgt] == j + 1).all()
            # target content tokens (distinct ids by construction) never appear in the encoder input
            assert not (set(ex.targets.tolist()) - special) & set(enc)
            ei, di = ei + n_in, di + n_tgt
        assert (b["segment_ids"][r, ei:] == 0).all() and (b["decoder_segment_ids"][r, di:] == 0).all()
        assert (b["labels"][r, di:] == IGNORE).all()
    assert int(b["num_target_tokens"]) == sum(len(e.targets) for e in examples)
    assert int(b["num_tokens"]) == sum(len(e.inputs) + len(e.targets) for e in examples)


def test_ed_plm_packs_two_examples_per_row():
    obj = build_objective(ObjectiveConfig(name="plm", seq_length=626), get("ed"), TI)
    assert obj.max_piece[0] == 313 and obj.shape.encoder_length == obj.shape.decoder_length == 626
    words = orng.mix(1, np.arange(5000))
    inp, tgt = obj.lengths(np.full(5000, 313), np.zeros(5000, int), words)
    # any two full pieces fit one row, whatever their split points
    assert (inp[::2] + inp[1::2] <= 626).all() and (tgt[::2] + tgt[1::2] <= 626).all()


def test_every_piece_up_to_max_fits_an_empty_row():
    for arch in ("cd", "ed"):
        for name in ("plm", "mlm", "ul2"):
            obj = build_objective(ObjectiveConfig(name=name), get(arch), TI)
            for v, p in enumerate(obj.max_piece):
                n = np.arange(2, p + 1)
                inp, tgt = obj.lengths(n, np.full(len(n), v), orng.mix(v, n))
                a, bb = obj.shape.footprint(inp, tgt)
                cap = obj.shape.capacity
                assert (a <= cap[0]).all() and (bb <= cap[1]).all(), (arch, name, v)
            if name == "mlm":  # same raw pieces for every architecture: the controlled comparison
                assert obj.max_piece.tolist() == [568]


def test_prompted_truncation():
    obj = build_objective(ObjectiveConfig(name="prompted", seq_length=10, targets_length=4), get("nd"), TI)
    ex = make_prompted(obj, np.arange(100, 112), np.arange(200, 206))
    assert ex.targets.tolist() == [200, 201, 202, 203]  # targets keep their start
    assert ex.inputs.tolist() == [106, 107, 108, 109, 110, 111]  # inputs keep their end
    obj = build_objective(ObjectiveConfig(name="prompted", inputs_length=3, targets_length=2), get("ed"), TI)
    ex = make_prompted(obj, np.arange(100, 105), np.arange(200, 201))
    assert ex.inputs.tolist() == [102, 103, 104] and ex.targets.tolist() == [200]


# ------------------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize("kwargs,arch,match", [
    (dict(name="mlm", targets_length=120), "ed", r"set objective.targets_length=114"),
    (dict(name="mlm", seq_length=1024), "nd", r"set objective.seq_length=626"),
    (dict(name="flm"), "ed", r"does not fit arch 'ed'"),
    (dict(name="flm"), "xd", r"unknown architecture 'xd'; choose one of cd, nd, ed"),  # the registry's lookup
    (dict(name="mlm", inputs_length=2, targets_length=1, seq_length=3), "ed", r"too short"),
    (dict(name="plm", seq_length=3, ed_plm_examples_per_row=2), "ed", r"too short"),
    (dict(name="ul2", seq_length=3), "nd", r"too short"),
])
def test_bad_objective_configs_fail_at_build(kwargs, arch, match):
    with pytest.raises(ValueError, match=match):
        build_objective(ObjectiveConfig(**kwargs), get(arch), TI)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="clm"), r"choose one of"),
    (dict(seq_length=0), r"positive integer"),
    (dict(seq_length=1), r"at least 2"),
    (dict(noise_density=0.0), r"noise_density"),
    (dict(mean_noise_span_length=0.5), r"mean_noise_span_length"),
    (dict(name="ul2", denoisers=[]), r"denoisers is empty"),
    (dict(name="ul2", denoisers=[{"kind": "spam"}]), r"kind='spam' is not valid"),
    (dict(name="ul2", denoisers=[{"rate": 0}]), r"rate=0 must be > 0"),
    (dict(name="ul2", denoisers=[{"sigma": 1}]), r"unknown keys \['sigma'\]"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig(**kwargs)


def test_too_few_sentinels_and_missing_mode_token():
    few = TokenInfo(VOCAB, 0, 1, SENTINELS[:10], MODES)
    with pytest.raises(ValueError, match=r"need up to 28 sentinels .* set data.num_sentinels >= 28"):
        build_objective(ObjectiveConfig(name="mlm"), get("ed"), few)
    none = TokenInfo(VOCAB, 0, 1, (), MODES)
    with pytest.raises(ValueError, match=r"needs sentinel tokens"):
        build_objective(ObjectiveConfig(name="mlm"), get("nd"), none)
    no_modes = TokenInfo(VOCAB, 0, 1, SENTINELS, ())
    with pytest.raises(ValueError, match=r"mode token '\[NLU\]' is not in the tokenizer"):
        build_objective(ObjectiveConfig(name="ul2"), get("nd"), no_modes)


def test_collate_rejects_overfull_rows_and_empty_encoder_inputs():
    obj = build_objective(ObjectiveConfig(name="flm", seq_length=4), get("cd"), TI)
    with pytest.raises(ValueError, match="exceed the row length 4"):
        collate([[Example(np.zeros(0, np.int64), np.arange(5))]], obj.shape, TI)
    obj = build_objective(ObjectiveConfig(name="plm", seq_length=8, ed_plm_examples_per_row=1), get("ed"), TI)
    with pytest.raises(ValueError, match="non-empty inputs"):
        collate([[Example(np.zeros(0, np.int64), np.arange(5))]], obj.shape, TI)
