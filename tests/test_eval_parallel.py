"""Data-parallel evaluation (train/eval/parallel.py): `archscale eval` under `torchrun` and the
lm-eval adapter under `accelerate launch` give, on 2 CPU processes (gloo), exactly the numbers
of one process, in the same order, and only one process writes. Real launches of real processes:
slow (each launch imports torch and friends in every process on a shared 2-core machine)."""
import contextlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # one thread in every process, as torchrun gives each of several: the same kernels in both runs
    env.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


@contextlib.contextmanager
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(cmd, cwd) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _write_data(w: Path) -> None:
    r = random.Random(0)
    words = ["".join(r.choice("abcdefghij") for _ in range(r.randint(2, 6))) for _ in range(60)]
    (w / "corpus").mkdir(parents=True)
    for i in range(12):
        (w / "corpus" / f"doc{i:02d}.txt").write_text(" ".join(r.choice(words) for _ in range(r.randint(60, 120))))
    recs = [{"input": f"{x} is a", "answer_choices": ["word", "number", "thing"], "label": int(x.isdigit()),
             "task": f"kind/{p}"} for p in ("a", "b") for x in ("cat", "12", "dog", "7", "tree")]
    (w / "kind.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))


def _timings_removed(res: dict) -> dict:
    res = json.loads(json.dumps(res))
    res.pop("seconds"), res.pop("processes")
    res.get("yardstick", {}).pop("seconds", None)
    return res


@pytest.mark.slow
def test_archscale_eval_on_two_processes_equals_one(tmp_path):
    """Held-out loss, the yardstick (per-window scores in order) and rank classification; and
    the same in one process with the model partly offloaded to disk (--max-memory)."""
    from train.cli import main

    _write_data(tmp_path)
    run = tmp_path / "run"
    _run([PY, "-m", "train", "train", f"run_dir={run}", "model.arch=cd", "model.size=debug", "objective.name=flm",
          "objective.seq_length=64", "data.source=files", f'data.train_files=["{tmp_path}/corpus/*.txt"]',
          "data.tokenizer=builtin-bytes", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=0.25",
          "parallel.micro_batch_size=2", "schedule.name=constant", "schedule.max_steps=2",
          "logging.progress_bar=false", "logging.tensorboard=false", "eval.every_n_steps=0",
          "checkpoint.every_n_steps=2", "eval.num_batches=2"], ROOT)
    args = ["eval", str(run), "--steps", "last", "--tasks", str(tmp_path / "kind.jsonl"), "--batch-size", "3",
            "--loss-batches", "4"]
    out = run / "eval" / "step-00000002.json"
    with one_thread():  # in this process: the kernels of torchrun's one-thread processes
        assert main(args) == 0
    expected = json.loads(out.read_text())
    out.unlink()
    with one_thread():  # the same, with 85% of the weights' bytes on the CPU and the rest offloaded to disk
        assert main(args + ["--max-memory", "cpu:360000", "--offload-folder", str(tmp_path / "offload")]) == 0
    offloaded = json.loads(out.read_text())
    assert set(offloaded.pop("placement")) == {"cpu", "disk"}, "the cap no longer splits the debug model"
    assert _timings_removed(offloaded) == _timings_removed(dict(expected))
    two = _run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train", *args],
               ROOT)
    got = json.loads(out.read_text())
    assert (expected["processes"], got["processes"]) == (1, 2)
    assert got["yardstick"]["per_window"]["nll"] and got["heldout"]["batches"] == 4 and got["zero_shot"]["pooled"]["n"] == 10
    assert _timings_removed(got) == _timings_removed(expected)  # every number, every list in its order
    assert two.stdout.count(str(out)) == 1  # the main process prints, the other does not


LL_TASK = """task: arch_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
TASKS = {
    "choice": 'output_type: multiple_choice\ntarget_delimiter: ""\ndoc_to_text: "{{input}}"\n'
              'doc_to_choice: "{{answer_choices}}"\ndoc_to_target: label\n'
              'metric_list:\n  - metric: acc\n  - metric: acc_norm\n',
    "rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{input}}"\n'
               'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n',
    "gen": 'output_type: generate_until\ndoc_to_text: "{{input}}"\ndoc_to_target: "{{answer_choices[label]}}"\n'
           'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n'
           'metric_list:\n  - metric: exact_match\n',
}


@pytest.mark.slow
def test_lm_eval_adapter_on_two_processes_equals_one(tmp_path):
    """The three request types (multiple choice, rolling log-likelihood, generation) of an exported
    ED model under `accelerate launch --multi_gpu --num_processes 2` (its torchrun launcher; no
    CUDA: gloo): the same metrics and per-sample responses as one process; one process writes."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e .[eval])")
    import torch

    import model_zoo
    from model_zoo.export import save_for_transformers
    from train.data import DataConfig, load_tokenizer

    _write_data(tmp_path)
    tok, _ = load_tokenizer(DataConfig(tokenizer="builtin-bytes", cache_dir=str(tmp_path / "cache")))
    torch.manual_seed(0)
    save_for_transformers(model_zoo.build("ed", "debug", vocab_size=len(tok)).eval(), tmp_path / "model", tok)
    (tmp_path / "tasks").mkdir()
    for name, body in TASKS.items():
        (tmp_path / "tasks" / f"arch_{name}.yaml").write_text(
            LL_TASK.format(name=name, data=tmp_path / "kind.jsonl") + body)
    worker = str(ROOT / "tests" / "workers" / "lm_eval_worker.py")
    args = [str(tmp_path / "model"), str(tmp_path / "tasks")]
    with one_thread(), pytest.MonkeyPatch.context() as mp:  # one process: this one
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        from workers.lm_eval_worker import main

        main(*args, str(tmp_path / "one.json"))
    launcher = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    _run(launcher + [worker, *args, str(tmp_path / "two.json")], tmp_path)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    ranks = {r: json.loads((tmp_path / f"two.json.rank-{r}").read_text()) for r in ("0", "1")}
    assert ranks == {"0": {"results": True, "shard": [0, 2]}, "1": {"results": False, "shard": [1, 2]}}  # one wrote
    assert json.loads((tmp_path / "one.json.rank-0").read_text()) == {"results": True, "shard": None}
    assert sorted(one["results"]) == ["arch_choice", "arch_gen", "arch_rolling"]
    assert [len(one["samples"][t]) for t in sorted(one["samples"])] == [10, 10, 10]
    assert two == one
