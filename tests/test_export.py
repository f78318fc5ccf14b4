"""archscale export: a trained run's checkpoint becomes a Hugging Face model directory that plain
transformers opens with archscale not installed (a venv that sees .venv's packages but not ours)."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import model_zoo
from model_zoo.export import native_form, save_for_transformers
from rehearse import clean_env
from train.data import DataConfig, load_tokenizer
from train.trainer.weights import checkpoint_dir, load_model
from train.commands.export import main as export_main

ROOT = Path(__file__).resolve().parents[1]

# (name, arch, options, the form it exports as)
CASES = [
    ("cd-llama", "cd", dict(position="rope", mlp="swiglu"), "llama"),  # tied + scaled logits: lm_head untied
    ("cd-llama-unscaled", "cd", dict(position="rope", mlp="swiglu", tie_embeddings=False, scale_attn=False), "llama"),
    ("ed-t5", "ed", {}, "t5"),  # the reference defaults: scale_attn folded into q
    ("ed-t5-v1.1", "ed", dict(scale_tied_logits=False, scale_attn=False), "t5"),
    ("nd", "nd", {}, "remote-code"),
    ("ed-untied", "ed", dict(tie_embeddings=False), "remote-code"),
]

# runs in the clean venv: the archscale packages must not import; every directory loads through the
# Auto classes and writes its logits on the same inputs
CLEAN_LOADER = r"""
import importlib.util, json, sys
import torch
assert all(importlib.util.find_spec(m) is None for m in ("model_zoo", "train", "archscale")), sys.path
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
spec = json.load(open(sys.argv[1]))
x, y = torch.tensor(spec["x"]), torch.tensor(spec["y"])
out = {}
for name, d, seq2seq in spec["dirs"]:
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    m = cls.from_pretrained(d, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(d)
    with torch.no_grad():
        logits = m(input_ids=x, decoder_input_ids=y).logits if seq2seq else m(input_ids=x).logits
    out[name] = {"class": type(m).__name__, "logits": logits.tolist(), "tok": tok("a cat")["input_ids"]}
json.dump(out, open(sys.argv[2], "w"))
"""


def clean_venv(tmp_path) -> Path:
    """A venv whose site-packages point at .venv's (a .pth line), whose own .pth files (archscale's
    editable finder among them) therefore never run: transformers and torch, not archscale."""
    venv = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "reuse_archscale_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin" / "python"


@pytest.mark.slow  # ~15 s: six exports and a second interpreter that loads transformers
def test_exports_load_with_plain_transformers_and_give_the_same_logits(tmp_path):
    tok, _ = load_tokenizer(DataConfig(tokenizer="builtin-bytes", cache_dir=str(tmp_path / "cache")))
    torch.manual_seed(0)
    x, y = torch.randint(3, 500, (2, 24)), torch.randint(3, 500, (2, 9))
    want, dirs = {}, []
    for name, arch, opts, form in CASES:
        model = model_zoo.build(arch, "debug", **opts).eval()
        assert native_form(model.config)[0] == (None if form == "remote-code" else form)
        d = tmp_path / name
        assert save_for_transformers(model, d, tok) == form
        assert json.loads((d / "archscale_export.json").read_text())["form"] == form
        with torch.no_grad():
            want[name] = model(input_ids=x, decoder_input_ids=y).logits if arch == "ed" else model(input_ids=x).logits
            # and model_zoo.load opens every form back
            back = model_zoo.load(d).eval()
            got = back(input_ids=x, decoder_input_ids=y).logits if arch == "ed" else back(input_ids=x).logits
        torch.testing.assert_close(got, want[name], atol=1e-5, rtol=1e-5)
        dirs.append((name, str(d), arch == "ed"))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"x": x.tolist(), "y": y.tolist(), "dirs": dirs}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([str(clean_venv(tmp_path)), "-I", "-c", CLEAN_LOADER, str(spec), str(tmp_path / "got.json")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "got.json").read_text())
    classes = {"llama": "LlamaForCausalLM", "t5": "T5ForConditionalGeneration"}
    for name, arch, _, form in CASES:
        assert got[name]["class"] == classes.get(form, "EncoderDecoderLM" if arch == "ed" else "DecoderLM")
        torch.testing.assert_close(torch.tensor(got[name]["logits"]), want[name], atol=1e-5, rtol=1e-5)
        assert got[name]["tok"] == tok("a cat")["input_ids"]


def test_remote_code_says_why_it_is_not_native():
    form, why = native_form(model_zoo.make_config("nd", "debug", position="rope", mlp="swiglu"))
    assert form is None and why.startswith("prefix attention (ND")
    form, why = native_form(model_zoo.make_config("cd", "debug"))
    assert why == "position='t5_bias' (Llama: 'rope'); mlp='geglu' (Llama: 'swiglu')"


def tiny_run(tmp_path, arch, objective, zero):
    run = tmp_path / f"{arch}-{zero}"
    env = clean_env(DS_ACCELERATOR="cpu", TMPDIR=str(tmp_path))
    args = [sys.executable, "-m", "train", "train", f"run_dir={run}", f"model.arch={arch}",
            f"objective.name={objective}", "objective.seq_length=64", "objective.inputs_length=48",
            "objective.targets_length=12", "data.tokenizer=builtin-bytes", "data.max_documents=30",
            f"data.cache_dir={tmp_path / 'cache'}", "parallel.micro_batch_size=2", f"parallel.zero_stage={zero}",
            "schedule.max_steps=3", "checkpoint.every_n_steps=2", "eval.every_n_steps=0", "eval.num_batches=1",
            "logging.tensorboard=false"]
    subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("arch,objective,zero", [("nd", "plm", 0), ("ed", "mlm", 1)])
def test_export_loads_with_from_pretrained(tmp_path, arch, objective, zero):
    run = tiny_run(tmp_path, arch, objective, zero)
    step_dir = checkpoint_dir(run)
    assert step_dir.name == "step-00000003"
    assert export_main([str(run), "--out", str(tmp_path / "hf")]) == 0
    # nd: our code with auto_map; ed (the reference defaults): a native T5
    form = json.loads((tmp_path / "hf" / "archscale_export.json").read_text())["form"]
    assert form == {"nd": "remote-code", "ed": "t5"}[arch]
    model = model_zoo.load(tmp_path / "hf").eval()
    assert model.config.arch == arch
    trained = load_model(step_dir)[0].eval()
    ids = torch.randint(3, 200, (2, 16))
    with torch.no_grad():
        kw = dict(decoder_input_ids=ids[:, :5]) if arch == "ed" else {}
        torch.testing.assert_close(model(input_ids=ids, **kw).logits, trained(input_ids=ids, **kw).logits,
                                   atol=1e-5, rtol=1e-5)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert "<extra_id_0>" in tok.get_vocab()
    assert model.config.vocab_size >= len(tok)
    # an exported checkpoint at an older step, and a step that does not exist
    assert export_main([str(run), "--step", "2", "--out", str(tmp_path / "hf2")]) == 0
    assert export_main([str(run), "--step", "7"]) == 2
