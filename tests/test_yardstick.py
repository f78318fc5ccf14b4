"""The common yardstick (issue 16): one measure for every cell, equal to the references.

* CD and ND given the same weights and a zero-length prefix score the same continuation loss; with
  a prefix, ND (its bidirectional prefix) differs.
* ED's scoring equals transformers' T5 and CD's equals transformers' Llama given the same weights,
  through the whole yardstick (the MLM cell the T5 way: prefix + sentinel in, sentinel + continuation out).
* The held-out documents never reach a training batch over a whole epoch, and the run directory
  records the split.
* The interval code: identical runs give 0 ± 0, constructed samples give the textbook interval.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import model_zoo
from train import registry
from train.config import load_config
from train.eval.scoring import Scorer
from train.eval.stats import binomial_se, mean_std, paired_difference, t975, window_difference_se
from train.eval.yardstick import Yardstick, _choices, score_yardstick
from train.objectives import ObjectiveConfig, TokenInfo
from train.objectives.scoring import continuation_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # noqa: E402  (conftest's one-thread fixture)

TOKENS = TokenInfo(vocab_size=300, pad_id=0, eos_id=1, sentinel_ids=(299, 298), mode_ids=(("[S2S]", 297),))


def make_ys(n=6, w=24, fractions=(0.5,), k=3, seed=0) -> Yardstick:
    g = np.random.default_rng(seed)
    tokens = g.integers(3, 290, (n, w)).astype(np.int64)
    cuts = [min(int(round(f * w)), w - 1) for f in fractions]
    return Yardstick(list(range(n)), [0] * n, tokens, list(fractions), cuts, [[4 * (w - c)] * n for c in cuts],
                     _choices(list(range(n)), k), "test")


CD, ND = registry.get("cd"), registry.get("nd")


def objective(name):
    return ObjectiveConfig(name=name)


# ------------------------------------------------------------------ CD vs ND: only the prefix's mask differs
def test_cd_and_nd_agree_without_prefix_and_differ_with_one():
    torch.manual_seed(0)
    nd = model_zoo.build("nd", "debug", vocab_size=300).eval()
    cd = model_zoo.build("cd", "debug", vocab_size=300).eval()
    cd.load_state_dict(nd.state_dict())
    zero = make_ys(fractions=(0.0,))
    a = score_yardstick(Scorer(cd, CD), zero, objective("plm"), TOKENS)
    b = score_yardstick(Scorer(nd, ND), zero, objective("plm"), TOKENS)
    assert a["continuation"]["nats_per_token"] == pytest.approx(b["continuation"]["nats_per_token"], abs=1e-6)
    assert a["per_window"]["nll"] == pytest.approx(b["per_window"]["nll"], abs=1e-4)
    half = make_ys(fractions=(0.5,))
    a = score_yardstick(Scorer(cd, CD), half, objective("plm"), TOKENS)
    b = score_yardstick(Scorer(nd, ND), half, objective("plm"), TOKENS)
    assert abs(a["continuation"]["nats_per_token"] - b["continuation"]["nats_per_token"]) > 1e-4
    assert all(abs(x - y) > 1e-5 for x, y in zip(a["per_window"]["nll"], b["per_window"]["nll"]))


def test_cd_shares_one_pass_over_a_window_for_every_cut():
    """CD reads causally: scoring all cuts from one pass equals scoring each cut on its own."""
    torch.manual_seed(1)
    cd = model_zoo.build("cd", "debug", vocab_size=300).eval()
    ys = make_ys(fractions=(0.25, 0.5, 0.75))
    together = score_yardstick(Scorer(cd, CD), ys, objective("flm"), TOKENS)["continuation"]["by_fraction"]
    for f in ys.fractions:
        alone = score_yardstick(Scorer(cd, CD), make_ys(fractions=(f,)), objective("flm"), TOKENS)
        assert together[str(f)]["nats_per_token"] == pytest.approx(alone["continuation"]["nats_per_token"], rel=1e-5)


# ------------------------------------------------------------------ equal to the references
def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def hf_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def test_cd_scoring_equals_transformers_llama():
    from model_zoo.convert import from_llama

    ref = hf_llama()
    ours = from_llama(ref).eval()
    ys = make_ys()
    got = score_yardstick(Scorer(ours, CD, batch_size=4), ys, objective("flm"), TOKENS)
    c = ys.cuts[0]
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor(ys.tokens)).logits.double(), -1)  # (N, W, V)
    want = [-float(logp[i, c - 1:-1].gather(-1, torch.tensor(ys.tokens[i, c:])[:, None]).sum()) for i in range(len(ys.docs))]
    assert got["per_window"]["nll"] == pytest.approx(want, abs=1e-3)
    assert got["continuation"]["nats_per_token"] == pytest.approx(sum(want) / (len(want) * (24 - c)), abs=1e-5)


@pytest.mark.parametrize("name", ["mlm", "plm"])
def test_ed_scoring_equals_transformers_t5(name):
    """ED:MLM is asked the T5 way (prefix + <extra_id_0> + EOS in, <extra_id_0> + continuation out,
    the sentinel given, not scored); ED:PLM plainly. Both equal T5 on the same weights."""
    from model_zoo.convert import from_t5

    ref = hf_t5()
    ours = from_t5(ref).eval()
    ys = make_ys(k=3)
    got = score_yardstick(Scorer(ours, registry.get("ed"), batch_size=4), ys, objective(name), TOKENS)
    c = ys.cuts[0]
    want, rows = [], ys.tokens.tolist()
    with torch.no_grad():
        for r in rows:
            q = continuation_request(objective(name), r[:c], r[c:], TOKENS)
            out = ref(input_ids=torch.tensor([q.context]), labels=torch.tensor([q.target])).logits[0]
            lp = torch.log_softmax(out.double(), -1).gather(-1, torch.tensor(q.target)[:, None])[:, 0]
            want.append(-float(lp[q.lead:].sum()))
    assert got["per_window"]["nll"] == pytest.approx(want, abs=1e-3)
    if name == "mlm":
        q = continuation_request(objective("mlm"), rows[0][:c], rows[0][c:], TOKENS)
        assert q.context[-2:] == [299, 1] and q.target[0] == 299 and q.lead == 1
    # the choice: each prefix's candidates scored with one encoder pass, the same as T5's choice
    chosen = []
    with torch.no_grad():
        for i, (cands, pos) in enumerate(ys.choices):
            scores = []
            for j in cands:
                q = continuation_request(objective(name), rows[i][:c], rows[j][c:], TOKENS)
                out = ref(input_ids=torch.tensor([q.context]), labels=torch.tensor([q.target])).logits[0]
                lp = torch.log_softmax(out.double(), -1).gather(-1, torch.tensor(q.target)[:, None])[:, 0]
                scores.append(float(lp[q.lead:].sum()))
            chosen.append(int(int(np.argmax(scores)) == pos))
    assert got["per_window"]["correct"] == chosen


def test_requests_per_objective():
    r = continuation_request(objective("ul2"), [5, 6], [7, 8], TOKENS)
    assert (r.context, r.target, r.lead) == ([297, 5, 6], [7, 8], 0)  # UL2's S denoiser: [S2S] + prefix
    r = continuation_request(objective("flm"), [], [7], TOKENS)
    assert (r.context, r.target, r.lead) == ([], [7], 0)
    with pytest.raises(ValueError, match="num_sentinels"):
        continuation_request(objective("mlm"), [5], [7], TokenInfo(300, 0, 1))


# ------------------------------------------------------------------ the held-out split
def test_heldout_documents_never_reach_a_training_batch(tmp_path):
    """Every training piece of a whole epoch (the packer's plan, which is what collate builds)
    comes from a training document; the held-out ones never appear, and the yardstick's windows
    come from held-out documents only."""
    from test_trainer import _write_corpus
    from train.data import build_stream, prepare
    from train.eval.yardstick import build_yardstick

    _write_corpus(tmp_path / "corpus")
    cfg = load_config(None, ["data.source=files", f"data.train_files={json.dumps([str(tmp_path / 'corpus' / '*.txt')])}",
                             "data.tokenizer=builtin-bytes", f"data.cache_dir={tmp_path / 'cache'}",
                             "data.eval_fraction=0.2", "objective.name=flm", "objective.seq_length=64",
                             "eval.window_tokens=32", "schedule.max_steps=1"])
    prepared = prepare(cfg.data, cfg.objective)
    held = set(prepared.eval.doc_ids.tolist())
    train_docs = set(prepared.train.doc_ids.tolist())
    assert held and train_docs and not held & train_docs
    stream = build_stream(prepared, cfg.objective, "cd", global_batch_size=4, seed=cfg.data.seed, data=cfg.data)
    seen = set()
    while stream.epoch == 0:
        rows = stream._plan_next()
        seen |= {p.doc for row in rows for p in row}
    assert seen == train_docs  # the whole epoch: every training document, no held-out one
    ys = build_yardstick(prepared, cfg.eval, cfg.data)
    assert set(ys.docs) <= held


def test_run_directory_records_the_split(tmp_path):
    from rehearse import inprocess
    from test_trainer import _write_corpus
    from train.trainer.loop import train

    _write_corpus(tmp_path / "corpus")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.source=files",
                             f"data.train_files={json.dumps([str(tmp_path / 'corpus' / '*.txt')])}",
                             "data.tokenizer=builtin-bytes", f"data.cache_dir={tmp_path / 'cache'}",
                             "data.eval_fraction=0.2", "objective.seq_length=64", "schedule.max_steps=2",
                             "parallel.micro_batch_size=2", "eval.window_tokens=32", "eval.windows=8",
                             "logging.progress_bar=false", "checkpoint.keep_last=0"])
    with inprocess():  # the process group and the environment (MASTER_PORT, ...) are put back after
        r = train(cfg)
    rec = json.loads((tmp_path / "run" / "heldout.json").read_text())
    assert "eval_fraction=0.2" in rec["split"] and rec["eval_documents"] == len(rec["eval_doc_ids"]) > 0
    assert set(rec["yardstick"]["documents"]) <= set(rec["eval_doc_ids"])
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in line]
    assert evals[-1]["yardstick_nats"] == pytest.approx(r.yardstick["continuation"]["nats_per_token"])
    assert 0 <= evals[-1]["zero_shot_acc"] <= 1 and evals[-1]["zero_shot_se"] > 0
    full = json.loads((tmp_path / "run" / "yardstick.json").read_text())
    assert full["step"] == 2 and len(full["per_window"]["nll"]) == full["windows"] == 8


# ------------------------------------------------------------------ intervals
def test_identical_runs_differ_by_zero_plus_minus_zero():
    runs = [2.5, 2.7, 2.6]
    d = paired_difference(runs, runs, [window_difference_se([1.0, 2.0], [1.0, 2.0], groups=[0, 1])] * 3)
    assert (d.mean, d.half_width, d.resolved) == (0.0, 0.0, False)


def test_textbook_intervals():
    # paired differences 1..5: mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776 -> 3 ± 1.963
    d = paired_difference([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert d.mean == pytest.approx(3.0) and d.half_width == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))
    assert d.resolved and d.low == pytest.approx(1.0371, abs=1e-4)
    assert not paired_difference([1.0, 3.0], [2.0, 1.0]).resolved  # d = -1, 2: 0.5 ± 19.06
    assert paired_difference([1.0], [0.0]).half_width is None  # one seed: no interval
    assert t975(1) == 12.706 and t975(40) == pytest.approx(2.0211, abs=1e-4) and t975(120) == pytest.approx(1.9799, abs=1e-4)
    assert mean_std([1, 2, 3, 4]) == (2.5, pytest.approx(1.2910, abs=1e-4))
    assert binomial_se(32, 64) == pytest.approx(0.0625) and binomial_se(0, 0) is None
    # two seeds that agree by chance: the windows' sampling error keeps the interval open, with
    # its own degrees of freedom (all of the variance is the windows': df = df_w = 8, t = 2.306)
    d = paired_difference([0.5, 0.5], [0.25, 0.25], [(0.08, 8), (0.08, 8)])
    assert d.half_width == pytest.approx(2.306 * 0.08 / math.sqrt(2), rel=1e-6)
    # Welch-Satterthwaite: v_s = 1/4 (sd 1, n 4), v_w = 0.25^2/4; df = (v_s+v_w)^2/(v_s^2/3 + v_w^2/5) = 3.88 -> 3
    d = paired_difference([1, 2, 3, 4], [1.0 - 0.5, 2.5, 2.0, 4.0], [(0.25, 5)] * 4)
    v_s, v_w = mean_std([0.5, -0.5, 1.0, 0.0])[1] ** 2 / 4, 0.25 ** 2 / 4
    df = (v_s + v_w) ** 2 / (v_s ** 2 / 3 + v_w ** 2 / 5)
    assert d.half_width == pytest.approx(t975(int(df)) * math.sqrt(v_s + v_w))
    # clustered windows: 2 documents of 2 windows; residuals summed per document are -2 and +2,
    # var = G/(G-1) * (4 + 4) / n^2 = 2 * 8 / 16 = 1
    se, dfw = window_difference_se([1, 1, 3, 3], [0, 0, 0, 0], groups=["x", "x", "y", "y"])
    assert dfw == 1 and se == pytest.approx(1.0)
    se, dfw = window_difference_se([1, 2, 3, 4], [0, 0, 0, 0])  # independent: sd / sqrt(n), n - 1
    assert dfw == 3 and se == pytest.approx(mean_std([1, 2, 3, 4])[1] / 2)
    with pytest.raises(ValueError, match="same, non-zero number of seeds"):
        paired_difference([1.0, 2.0], [1.0])
