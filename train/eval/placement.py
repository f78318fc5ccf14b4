"""Big-model inference for evaluation and generation: a model larger than one GPU (or than the
host's memory) placed layer by layer with accelerate, offloading what does not fit.

    --device-map auto --max-memory gpu:20GiB,cpu:60GiB --offload-folder /scratch/offload   # archscale eval
    model_args="pretrained=DIR,device_map=auto,max_memory=gpu:20GiB;cpu:60GiB,offload_folder=/scratch/off"  # lm-eval

* An `archscale export` directory (Llama-like, T5-like or our own classes) is read by transformers'
  `from_pretrained(device_map=..., max_memory=..., offload_folder=...)` straight into our model
  class (the class the scorer and generate speak): no layer is ever materialised in full in host
  memory; the T5 form's keys are renamed on the way in (`T5_KEY_MAPPING`, transformers'
  `key_mapping`). Disk-offloaded weights of a safetensors file are read from the file itself.
* A run's checkpoint (DeepSpeed files: `archscale eval`) is loaded into host memory first, then
  placed with accelerate's `infer_auto_device_map` + `dispatch_model` (disk offload: the weights
  are written to `offload_folder` as memory maps).

accelerate fills the devices in order: GPU(s), then the CPU (layers whose weights stay in host
memory and move to the GPU for their forward), then the disk. Blocks (`Block`, the models'
`_no_split_modules`) are never split. On a machine without a GPU, the execution device is the CPU:
layers over the CPU cap live on the disk and are read back for their forward (what the tests use).

`max_memory`: comma- (or semicolon-, inside lm-eval's model_args) separated `DEVICE:SIZE`, DEVICE
one of `gpu` (this process's GPU: cuda:LOCAL_RANK under a data-parallel launch), a GPU index, `cpu`;
SIZE as accelerate reads it (`20GiB`, `500MB`, `300KB`, bytes). One execution GPU per process:
the model's layers share masks built once per forward, so a map over several GPUs is refused;
run one process per GPU instead (train/eval/parallel.py) and offload to the CPU and disk.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# transformers' T5ForConditionalGeneration keys -> ours (model_zoo.convert.t5_key, as chained
# substring renamings, applied in order; tests/test_offload_load.py loads through them)
T5_KEY_MAPPING = {
    r"\.block\.": ".layers.",
    r"layers\.0\.layer\.0\.SelfAttention\.relative_attention_bias": "rel_bias.relative_attention_bias",
    r"layer\.0\.SelfAttention\.([qkvo])\.": r"self_attn.\1_proj.",
    r"layer\.0\.layer_norm": "input_layernorm",
    r"layer\.1\.EncDecAttention\.([qkvo])\.": r"cross_attn.\1_proj.",
    r"^decoder\.layers\.(\d+)\.layer\.1\.layer_norm": r"decoder.layers.\1.cross_attn_layernorm",
    r"layer\.1\.layer_norm": "post_attention_layernorm",  # the encoder's (the MLP's norm)
    r"layer\.[12]\.DenseReluDense\.wi_0": "mlp.gate_proj",
    r"layer\.[12]\.DenseReluDense\.wi_1": "mlp.up_proj",
    r"layer\.[12]\.DenseReluDense\.wo": "mlp.down_proj",
    r"layer\.2\.layer_norm": "post_attention_layernorm",
    r"final_layer_norm": "norm",
}

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """How to place a model: device_map None = the whole model on one device (the default)."""

    device_map: Optional[str] = None
    max_memory: Optional[dict] = None  # accelerate's: {GPU index | "cpu": bytes}
    offload_folder: Optional[str] = None

    def kwargs(self) -> dict:
        """from_pretrained's keyword arguments."""
        if self.device_map is None:
            return {}
        return {"device_map": self.device_map, "max_memory": self.max_memory, "offload_folder": self.offload_folder}


def parse_max_memory(text: Optional[str], gpu: Optional[int] = None) -> Optional[dict]:
    """"gpu:20GiB,cpu:60GiB" -> {0: 21474836480, "cpu": 64424509440}; `gpu`: this process's GPU index."""
    if text is None or not str(text).strip():
        return None
    from accelerate.utils import convert_file_size_to_int

    out: dict = {}
    for item in (x.strip() for x in re.split(r"[,;]", str(text)) if x.strip()):
        dev, sep, size = item.partition(":")
        dev = dev.strip().lower()
        try:
            if not sep:
                raise ValueError
            key = (gpu or 0) if dev == "gpu" else "cpu" if dev == "cpu" else int(dev)
            size = size.strip()
            out[key] = int(size) if size.isdigit() else convert_file_size_to_int(size)
        except ValueError:
            raise ValueError(f"max_memory item {item!r} is not DEVICE:SIZE (DEVICE gpu, a GPU index or cpu; SIZE "
                             f"like 20GiB, 500MB or bytes), e.g. gpu:20GiB,cpu:60GiB") from None
    return out


def placement(device_map: Optional[str] = None, max_memory: Optional[str] = None,
              offload_folder: Optional[str] = None, gpu: Optional[int] = None) -> Placement:
    """A checked Placement from command-line / model_args strings. max_memory or offload_folder
    without a device map means device_map="auto"."""
    if device_map in (None, "") and (max_memory or offload_folder):
        device_map = "auto"
    if device_map in (None, ""):
        return Placement()
    if device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    memory = parse_max_memory(max_memory, gpu)
    if memory and sum(1 for k in memory if k != "cpu") > 1:
        raise ValueError(f"max_memory names {sum(1 for k in memory if k != 'cpu')} GPUs; archscale's models run on one "
                         f"GPU per process (plus CPU and disk offload): launch one process per GPU "
                         f"(torchrun, docs/evaluation.md) with max_memory=gpu:SIZE,cpu:SIZE")
    return Placement(device_map, memory, str(offload_folder) if offload_folder else None)


def _checked_load(cls, path, where: Placement, **kwargs):
    model, info = cls.from_pretrained(path, output_loading_info=True, **where.kwargs(), **kwargs)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{path}: the weights do not match {cls.__name__}: {bad}")
    _check_map(model)
    return model.eval()


def _check_map(model) -> None:
    placed = getattr(model, "hf_device_map", None) or {}
    gpus = sorted({str(d) for d in placed.values() if d not in ("cpu", "disk", "meta")})
    if len(gpus) > 1:
        raise ValueError(f"the device map spreads the model over GPUs {', '.join(gpus)}; archscale's models run on one "
                         f"GPU per process: give max_memory for one GPU (gpu:SIZE) plus cpu:SIZE and an offload folder")


def load_export(path: str | Path, where: Placement):
    """An `archscale export` directory (any form) as our model class, placed by `where`."""
    from transformers import AutoConfig

    import model_zoo
    from model_zoo.convert import config_from_llama, config_from_t5
    from model_zoo.models import DecoderLM, EncoderDecoderLM

    if where.device_map is None:
        return model_zoo.load(path).eval()
    config = AutoConfig.from_pretrained(path)
    if config.model_type == "llama":  # our decoder's parameter names are Llama's
        return _checked_load(DecoderLM, path, where, config=config_from_llama(config))
    if config.model_type == "t5":  # transformers' T5 ties its embeddings (model_zoo.export.to_t5)
        return _checked_load(EncoderDecoderLM, path, where, config=config_from_t5(config, tied=True),
                             key_mapping=T5_KEY_MAPPING)
    return _checked_load(model_zoo.model_class(config), path, where)


def dispatch(model, where: Placement):
    """A model in host memory placed by `where` (accelerate's infer_auto_device_map and
    dispatch_model); unchanged when `where` has no device map."""
    if where.device_map is None:
        return model
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = where.max_memory
    if where.device_map != "sequential":
        memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split,
                                     low_zero=where.device_map == "balanced_low_0")
    device_map = infer_auto_device_map(model.eval(), max_memory=memory, no_split_module_classes=no_split)
    if device_map.get("") == "disk":  # all on disk: dispatch_model offloads named submodules only
        device_map = {name: "disk" for name, _ in model.named_children()}
    if "disk" in device_map.values() and not where.offload_folder:
        raise ValueError("the model does not fit in max_memory and needs disk offload: pass an offload folder "
                         "(--offload-folder DIR)")
    model = dispatch_model(model, device_map=device_map, offload_dir=where.offload_folder)
    model.hf_device_map = device_map
    _check_map(model)
    return model
