"""The lm-eval adapter: a local task (YAML + JSON Lines in this test's directory, no download) run
end to end through `lm_eval.simple_evaluate` on an archscale model, and the three request types
checked against train.eval.evaluate's scoring. Skipped only when lm-eval is not installed."""
import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e .[eval])")

from test_eval import bytes_tok, synthetic_records, trained_model  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# target_delimiter "": the prompted objective trains `input ++ target` with no separator added
TASK_YAML = """task: archscale_kind
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{input}}}}"
doc_to_choice: "{{{{answer_choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def exported(bytes_tok, tmp_path_factory):
    """An ND model trained on the synthetic task, saved as `archscale export` writes it."""
    model, _ = trained_model("nd", bytes_tok)
    d = tmp_path_factory.mktemp("export")
    model.save_pretrained(d)
    bytes_tok.save_pretrained(d)
    return d


def test_local_task_end_to_end(exported, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    import train.eval.lm_eval_adapter  # noqa: F401  (registers "archscale")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "kind.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records()))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "archscale_kind.yaml").write_text(TASK_YAML.format(data=data))
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)  # no built-in task index
    out = lm_eval.simple_evaluate(model="archscale", model_args=f"pretrained={exported},batch_size=4",
                                  tasks=["archscale_kind"], task_manager=manager,
                                  bootstrap_iters=0, log_samples=False)
    res = out["results"]["archscale_kind"]
    assert res["acc,none"] == 1.0 and res["acc_norm,none"] == 1.0


def test_request_types(exported):
    from lm_eval.api.instance import Instance

    from train.eval.evaluate import Scorer
    from train.eval.lm_eval_adapter import ArchscaleLM

    lm = ArchscaleLM(pretrained=str(exported), batch_size=3)
    tok = lm.tokenizer
    req = lambda kind, args: Instance(request_type=kind, doc={}, arguments=args, idx=0)  # noqa: E731

    # loglikelihood: the context's trailing space moves to the continuation
    (ll, greedy), = lm.loglikelihood([req("loglikelihood", ("is cat ", "yes"))])
    direct = Scorer(lm.model, lm.scorer.arch).loglikelihoods([(tok.encode("is cat"), tok.encode(" yes"))])[0]
    assert ll == pytest.approx(direct.sum, abs=1e-5) and greedy == direct.greedy

    # rolling: every token once, the first given EOS; windows of max_length cover the same tokens
    text = "is dog yes is red no"
    ids = tok.encode(text)
    (rolled,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])
    assert rolled == pytest.approx(Scorer(lm.model, lm.scorer.arch).loglikelihoods([([tok.eos_token_id], ids)])[0].sum, abs=1e-4)
    lm.max_length = lm.scorer.max_length = 8
    windowed = lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,))])[0]
    assert windowed < 0 and windowed != pytest.approx(rolled, abs=1e-6)  # shorter contexts, same tokens

    # generate_until: greedy, ND keeps the prompt as its bidirectional prefix, cut at the stop string
    outs = lm.generate_until([req("generate_until", ("is cat", {"until": ["\n"], "max_gen_toks": 5})),
                              req("generate_until", ("pink", {"until": ["o"], "max_gen_toks": 5}))])
    assert outs == ["yes", "n"]


def test_adapter_loads_a_run_checkpoint(tmp_path, monkeypatch):
    """`pretrained` may be a run directory: its newest complete checkpoint, and the run's length."""
    from train import registry
    from train.eval.lm_eval_adapter import load_for_eval

    calls = {}

    def fake_load_model(step_dir):
        calls["step_dir"] = step_dir
        from train.config import load_config

        return torch.nn.Linear(1, 1), None, load_config(None, ["model.arch=ed", "objective.name=mlm"])

    monkeypatch.setattr("train.trainer.weights.load_model", fake_load_model)
    monkeypatch.setattr("train.trainer.weights.checkpoint_dir", lambda path, step: tmp_path / "checkpoints" / f"step-{step}")
    _, _, max_length, arch = load_for_eval(tmp_path, step=3)
    assert calls["step_dir"].name == "step-3" and max_length == 512  # ED: the encoder's input length
    assert arch is registry.get("ed")  # the run's entry, handed to the Scorer
