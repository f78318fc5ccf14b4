"""Zero-shot evaluation: log-likelihoods equal the model's logits, rank classification is right on
a task a model has learnt (CD, ND, ED), the reference's aggregation, checkpoint selection, bad input."""
import json
import random

import pytest
import torch

import model_zoo
from train import registry
from train.data import DataConfig, load_tokenizer
from train.eval.evaluate import Scorer, aggregate, rank_classify, read_task_file, select_checkpoints
from train.objectives.batch import collate_decoder, collate_encoder_decoder, pop_counts
from train.objectives.core import Example

ARCHS = ["cd", "nd", "ed"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- log-likelihoods
def direct_loglikelihood(model, arch, ctx, tgt):
    """One request alone, straight from the logits (no batching, no padding)."""
    if arch == "ed":
        start = model.config.decoder_start_token_id
        logits = model(input_ids=torch.tensor([ctx]), decoder_input_ids=torch.tensor([[start] + tgt[:-1]])).logits[0]
        rows = logits  # (n, V): row j predicts tgt[j]
    else:
        logits = model(input_ids=torch.tensor([ctx + tgt]), prefix_lengths=torch.tensor([len(ctx)])).logits[0]
        rows = logits[len(ctx) - 1:len(ctx) - 1 + len(tgt)]  # row t predicts token t+1
    lp = torch.log_softmax(rows.double(), -1)
    return float(sum(lp[j, t] for j, t in enumerate(tgt))), bool((rows.argmax(-1) == torch.tensor(tgt)).all())


def random_requests(n, vocab, seed=0):
    rnd = random.Random(seed)
    return [([rnd.randrange(3, vocab) for _ in range(rnd.randint(1, 9))],
             [rnd.randrange(3, vocab) for _ in range(rnd.randint(1, 5))]) for _ in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_loglikelihoods_equal_direct_computation(arch):
    torch.manual_seed(0)
    model = model_zoo.build(arch, "debug").eval()
    reqs = random_requests(7, model.config.vocab_size)
    got = Scorer(model, registry.get(arch), batch_size=3).loglikelihoods(reqs)  # padded batches of mixed lengths
    with torch.no_grad():
        for (ctx, tgt), s in zip(reqs, got):
            want, greedy = direct_loglikelihood(model, arch, ctx, tgt)
            assert s.sum == pytest.approx(want, abs=1e-4)
            assert s.tokens == len(tgt) and s.mean == pytest.approx(want / len(tgt), abs=1e-4)
            assert s.greedy == greedy


def test_nd_scores_the_context_as_a_bidirectional_prefix():
    """CD and ND share every parameter; only the mask over the context differs, and so must the
    scores (CD: the plain causal computation)."""
    torch.manual_seed(0)
    nd = model_zoo.build("nd", "debug").eval()
    cd = model_zoo.build("cd", "debug").eval()
    cd.load_state_dict(nd.state_dict())
    reqs = [(c + [5, 6, 7], t) for c, t in random_requests(4, nd.config.vocab_size, seed=1)]  # >= 4 context tokens
    s_nd, s_cd = Scorer(nd, registry.get("nd")).loglikelihoods(reqs), Scorer(cd, registry.get("cd")).loglikelihoods(reqs)
    assert all(abs(a.sum - b.sum) > 1e-4 for a, b in zip(s_nd, s_cd))
    with torch.no_grad():
        for (ctx, tgt), b in zip(reqs, s_cd):
            causal = cd(input_ids=torch.tensor([ctx + tgt])).logits[0, len(ctx) - 1:-1]
            want = torch.log_softmax(causal.double(), -1).gather(-1, torch.tensor(tgt)[:, None]).sum()
            assert b.sum == pytest.approx(float(want), abs=1e-4)


# ----------------------------------------------------------------------------- a learnt task
WORDS = {"cat": 0, "dog": 0, "cow": 0, "owl": 0, "red": 1, "tan": 1, "blue": 1, "pink": 1}
CHOICES = ["yes", "no"]  # "is it an animal?"; choices of different lengths, so acc_norm differs from acc


def synthetic_records():
    """Two prompts (tasks) of one dataset; the answer is a function of the prompt's last word
    (the word last keeps the debug models' training to ~100 steps)."""
    return [{"input": fmt.format(w), "answer_choices": CHOICES, "label": y, "task": f"kind/{name}"}
            for w, y in WORDS.items() for name, fmt in (("bare", "{}"), ("is", "is {}"))]


def train_on_records(arch, records, tok, max_steps=300, seed=0):
    """A debug model trained with plain torch on (input, correct choice + EOS) examples, laid out
    by the real collate functions (the prompted objective's batch contract), until the mean
    target loss is < 0.05 (~100 steps, 3-4 s on one CPU thread)."""
    torch.manual_seed(seed)
    model = model_zoo.build(arch, "debug", vocab_size=512)
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    exs = [Example(enc(r["input"]), enc(r["answer_choices"][r["label"]]) + [tok.eos_token_id]) for r in records]
    n = max(len(e.inputs) + len(e.targets) for e in exs)
    if arch == "ed":
        batch = collate_encoder_decoder([[e] for e in exs], n, n, tok.pad_token_id)
    else:
        batch = collate_decoder([[e] for e in exs], n, arch == "nd", tok.pad_token_id)
    pop_counts(batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(max_steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    return model.eval(), loss.item()


_TRAINED: dict = {}


def trained_model(arch, tok):
    """train_on_records on the synthetic task, once per architecture per test session (the
    lm-eval adapter's tests reuse the ND model)."""
    if arch not in _TRAINED:
        _TRAINED[arch] = train_on_records(arch, synthetic_records(), tok)
    return _TRAINED[arch]


@pytest.fixture(scope="module")
def bytes_tok(tmp_path_factory):
    tok, _ = load_tokenizer(DataConfig(tokenizer="builtin-bytes", cache_dir=str(tmp_path_factory.mktemp("cache"))))
    return tok


@pytest.mark.parametrize("arch", ARCHS)
def test_rank_classification_is_right_on_a_learnt_task(arch, bytes_tok, tmp_path):
    records = synthetic_records()
    path = tmp_path / "kind.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    recs = read_task_file(path)
    assert {r["dataset"] for r in recs} == {"kind"}
    model, _ = trained_model(arch, bytes_tok)
    # The behaviour, not the training loss: every record ranked right, by a margin. No loss
    # threshold: one CPU's numerics decide where the loss lands (a 0.05 bound failed on AMD EPYC,
    # CD 0.0546; issue 20). Measured there, seeds 0-3, 1 and 2 threads: the smallest margin of any
    # record was 4.1 nats (ED), so 1 nat leaves room for other CPUs and still fails a coin flip.
    preds = rank_classify(Scorer(model, registry.get(arch), batch_size=5), bytes_tok, recs)
    margins = [(s0 - s1) * (1 if p["label"] == 0 else -1) for p in preds for (s0, _), (s1, _) in [p["scores"]]]
    assert len(margins) == len(recs) and min(margins) > 1.0, margins
    res = aggregate(preds)
    assert res["mean"] == {"acc": 1.0, "acc_norm": 1.0}
    assert res["datasets"]["kind"]["prompts"] == ["kind/bare", "kind/is"]


def test_aggregate_median_over_prompts_mean_over_datasets():
    def preds(task, dataset, right, wrong):
        return [{"task": task, "dataset": dataset, "label": 0, "pred": 0, "pred_norm": 1}] * right + \
               [{"task": task, "dataset": dataset, "label": 0, "pred": 1, "pred_norm": 0}] * wrong
    p = preds("rte/a", "rte", 1, 3) + preds("rte/b", "rte", 3, 1) + preds("rte/c", "rte", 2, 2) \
        + preds("cb/a", "cb", 1, 0)
    res = aggregate(p)
    assert res["tasks"]["rte/a"] == {"dataset": "rte", "n": 4, "acc": 0.25, "acc_norm": 0.75,
                                     "se": pytest.approx((0.25 * 0.75 / 4) ** 0.5)}
    assert res["pooled"] == {"acc": 7 / 13, "se": pytest.approx((7 / 13 * 6 / 13 / 13) ** 0.5), "n": 13}
    assert res["datasets"]["rte"]["acc"] == 0.5  # median of 0.25, 0.75, 0.5
    assert res["datasets"]["cb"]["acc"] == 1.0
    assert res["mean"]["acc"] == 0.75  # mean over the two datasets, not over the 13 records
    assert res["mean"]["acc_norm"] == pytest.approx((0.5 + 0.0) / 2)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("rec,match", [
    ({"input": "q", "answer_choices": ["a", "b"], "label": 2},
     r"t.jsonl:2: 'label'=2 must be an integer index in \[0, 1\]"),
    ({"input": "q", "target": "a"}, r"t.jsonl:2: rank classification needs 'answer_choices'"),
    ({"input": "q", "answer_choices": ["a", "b"], "label": 0, "dataset": 3}, r"t.jsonl:2: 'dataset' must be"),
])
def test_bad_task_file(tmp_path, rec, match):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"input": "fine", "answer_choices": ["a", "b"], "label": 1}) + "\n"
                    + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=match):
        read_task_file(path)


def test_eval_command_reports_a_bad_task_file(tmp_path, capsys):
    from train.cli import main

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"input": "q", "answer_choices": ["a", "b"], "label": 5}) + "\n")
    assert main(["eval", str(tmp_path), "--tasks", str(path)]) == 2
    assert "t.jsonl:1: 'label'=5" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoint choice
def fake_run(tmp_path, steps, max_steps=8):
    """A run directory with complete (empty-engine) checkpoints at `steps`."""
    from train.trainer import checkpointing as ckpt
    from train.config import config_to_yaml, load_config

    run = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run}", f"schedule.max_steps={max_steps}", "parallel.micro_batch_size=2"])
    ckpt.RunLayout.from_config(cfg).write_run_files(config_to_yaml(cfg))
    for s in steps:
        d = run / "checkpoints" / ckpt.step_dir_name(s)
        d.mkdir(parents=True)
        ckpt.TrainerState(step=s).save(d / ckpt.STATE_FILE)
        (d / ckpt.COMPLETE).write_text("")
    (run / "checkpoints" / "step-00000009.tmp").mkdir()  # a save in progress: never chosen
    return run


def test_select_checkpoints(tmp_path):
    run = fake_run(tmp_path, [2, 3, 6, 8])
    picked = select_checkpoints(run, "25%,50%,100%")
    assert [(a, s) for a, s, _ in picked] == [("25%", 2), ("50%", 3), ("100%", 8)]  # 4 is pruned: nearest
    assert [s for _, s, _ in select_checkpoints(run, "all")] == [2, 3, 6, 8]
    assert [s for _, s, _ in select_checkpoints(run, "6,last,75%")] == [6, 8]  # duplicates collapse
    with pytest.raises(Exception, match="no complete checkpoint at step 5"):
        select_checkpoints(run, "5")
    with pytest.raises(ValueError, match="not a percentage"):
        select_checkpoints(run, "x%")
