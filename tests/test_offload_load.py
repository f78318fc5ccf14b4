"""Big-model loading (train/eval/placement.py): an exported model (Llama-like CD, T5-like ED, ND in
our own classes) read by transformers' from_pretrained with device_map="auto" and a CPU cap small
enough that accelerate puts part of it on the disk, and a run's in-memory model dispatched the same
way, give exactly the plain load's logits, scores and greedy output; bad placement input is one line."""
import pytest
import torch

import model_zoo
from model_zoo.export import save_for_transformers
from train import registry
from train.eval.placement import dispatch, load_export, parse_max_memory, placement
from train.eval.scoring import Scorer

# (name, arch, options, the export form)
CASES = [("cd-llama", "cd", dict(position="rope", mlp="swiglu"), "llama"), ("ed-t5", "ed", {}, "t5"),
         ("nd-remote", "nd", {}, "remote-code")]
REQUESTS = [([5, 9, 13, 40], [7, 8]), ([3], [11, 12, 13]), ([20, 21, 22, 23, 24, 25], [30])]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cap(model) -> str:
    """A CPU cap of 85% of the weights (accelerate keeps room for the largest layer): part on the CPU, the rest on the disk."""
    return f"cpu:{int(0.85 * sum(p.numel() * p.element_size() for p in model.parameters()))}"


def _outputs(model, arch):
    x, y = torch.tensor([[5, 9, 13, 40, 41, 3]]), torch.tensor([[0, 7, 8]])
    with torch.no_grad():
        logits = model(input_ids=x, decoder_input_ids=y).logits if arch == "ed" else model(input_ids=x).logits
        greedy = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)
    scores = Scorer(model, registry.get(arch), batch_size=2).loglikelihoods(REQUESTS)
    return logits, greedy, [(s.sum, s.tokens, s.greedy) for s in scores]


def _offloaded(model) -> bool:
    placed = set(model.hf_device_map.values())
    return "disk" in placed and any(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name,arch,options,form", CASES, ids=[c[0] for c in CASES])
def test_export_loaded_with_disk_offload_gives_the_plain_outputs(name, arch, options, form, tmp_path):
    torch.manual_seed(0)
    model = model_zoo.build(arch, "debug", **options).eval()
    assert save_for_transformers(model, tmp_path / "export") == form
    plain = load_export(tmp_path / "export", placement())
    big = load_export(tmp_path / "export", placement("auto", _cap(plain), tmp_path / "offload"))
    assert _offloaded(big) and "cpu" in big.hf_device_map.values(), big.hf_device_map
    (la, ga, sa), (lb, gb, sb) = _outputs(plain, arch), _outputs(big, arch)
    assert torch.equal(la, lb) and torch.equal(ga, gb) and sa == sb
    assert ga.shape[-1] > 1  # something was generated


@pytest.mark.parametrize("arch", ["cd", "ed"])
def test_in_memory_model_dispatched_with_disk_offload_gives_the_same_outputs(arch, tmp_path):
    """archscale eval's path: a checkpoint's model in host memory, placed by dispatch_model."""
    torch.manual_seed(0)
    model = model_zoo.build(arch, "debug").eval()
    expected = _outputs(model, arch)
    assert dispatch(model, placement()) is model  # no device map: unchanged
    big = dispatch(model, placement(None, _cap(model), str(tmp_path / "offload")))  # max_memory implies "auto"
    assert _offloaded(big) and any((tmp_path / "offload").iterdir())  # weights written to the folder
    got = _outputs(big, arch)
    assert all(torch.equal(a, b) for a, b in zip(expected[:2], got[:2])) and expected[2] == got[2]


def test_export_through_the_lm_eval_adapter_with_offload(tmp_path):
    """model_args device_map / max_memory / offload_folder reach the loader: the adapter's scores
    and generation equal the plain load's."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e .[eval])")
    from train.data import DataConfig, load_tokenizer
    from train.eval.lm_eval_adapter import ArchscaleLM

    class Req:
        def __init__(self, *args):
            self.args = args

    tok, _ = load_tokenizer(DataConfig(tokenizer="builtin-bytes", cache_dir=str(tmp_path / "cache")))
    torch.manual_seed(0)
    model = model_zoo.build("ed", "debug", vocab_size=len(tok)).eval()
    save_for_transformers(model, tmp_path / "export", tok)
    plain = ArchscaleLM(pretrained=str(tmp_path / "export"), device="cpu", batch_size=2)
    big = ArchscaleLM(pretrained=str(tmp_path / "export"), device="cpu", batch_size=2, device_map="auto",
                      max_memory=_cap(model), offload_folder=str(tmp_path / "off"))
    assert _offloaded(big.model)
    ll = [Req("a cat is", " an animal"), Req("two", " three")]
    gen = [Req("a cat", {"until": ["\n"], "max_gen_toks": 5})]
    assert plain.loglikelihood(ll) == big.loglikelihood(ll)
    assert plain.generate_until(gen) == big.generate_until(gen)


def test_bad_placement_input_is_one_line():
    assert parse_max_memory("gpu:1GiB,cpu:300KB", gpu=3) == {3: 2 ** 30, "cpu": 300_000}
    assert parse_max_memory("0:2GB;cpu:1024") == {0: 2 * 10 ** 9, "cpu": 1024}
    for bad in ("cpu=3GB", "cpu:lots", "tpu:3GB"):
        with pytest.raises(ValueError, match="is not DEVICE:SIZE") as e:
            parse_max_memory(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="device_map 'everywhere' is not one of auto"):
        placement("everywhere")
    with pytest.raises(ValueError, match="names 2 GPUs; .* one GPU per process"):
        placement("auto", "0:1GB,1:1GB,cpu:1GB")


def test_eval_command_reports_bad_max_memory(tmp_path, capsys):
    from train.cli import main

    assert main(["eval", str(tmp_path), "--max-memory", "cpu=3GB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: max_memory item 'cpu=3GB' is not DEVICE:SIZE") and "\n" not in err
