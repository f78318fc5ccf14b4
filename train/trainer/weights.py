"""A checkpoint's weights, read back: the step directory to read (checkpoint_dir), the fp32
weights of a DeepSpeed checkpoint (engine_weights), loading them into a model (load_weights)
and the model a checkpoint describes (load_model). Shared by the trainer (init.from_checkpoint),
evaluation, the lm-eval adapter and `archscale export` / `analyze`, so it sits below all of them.
"""
from __future__ import annotations

from pathlib import Path

from . import checkpointing as ckpt
from .integrity import safe_torch_load, verify_checkpoint


def checkpoint_dir(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint to export: checkpointing.resolve_checkpoint (a run's newest or its `step`)."""
    return ckpt.resolve_checkpoint(run_dir, step)


def engine_weights(step_dir: Path, tag: str = "engine", model_config=None) -> dict:
    """The fp32 model weights of a DeepSpeed checkpoint, keys as the model names them.

    Pipeline checkpoints (layer_XX-model_states.pt, needs `model_config`) map back to model_zoo
    keys through train.engine.pipeline; ZeRO >= 1 partitions are gathered by DeepSpeed's zero_to_fp32
    (BF16_Optimizer's, which it refuses, by _flat_master); a ZeRO-0 checkpoint holds the whole
    module in mp_rank_00_model_states.pt.

    bf16 runs: the weights returned are the fp32 master, not the bf16 working copy the model
    computed with (that copy is the master rounded to bf16; tests/test_bf16.py): at ZeRO-0 from
    the optimizer's `fp32_groups` (read only with `model_config`, which names them; without it,
    the working copy), on pipeline stages from their flat fp32 partitions (_put_pipeline_master).
    """
    engine_dir = Path(step_dir) / tag
    if not engine_dir.is_dir():
        raise ckpt.CheckpointError(f"{step_dir} has no {tag}/ directory: not a checkpoint of this trainer")
    verify_checkpoint(step_dir)  # zero_to_fp32 and the layer files load with weights_only=False: checked first
    if any(engine_dir.glob("layer_*-model_states.pt")):
        if model_config is None:
            raise ValueError("a pipeline checkpoint needs the model config to name its layers")
        from ..engine.pipeline import layer_states_from_files, pipeline_to_model_state_dict

        layers = layer_states_from_files(str(engine_dir))
        _put_pipeline_master(model_config, engine_dir, layers)
        return {k: v.float() for k, v in pipeline_to_model_state_dict(model_config, layers).items()}
    optim_files = sorted(engine_dir.glob("*zero_pp_rank_*optim_states.pt"))
    if optim_files:
        if "zero_stage" not in safe_torch_load(optim_files[0])["optimizer_state_dict"]:
            return _flat_master(engine_dir, "00")  # BF16_Optimizer; zero_to_fp32: "not a zero checkpoint"
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=tag)
    states = safe_torch_load(engine_dir / "mp_rank_00_model_states.pt")
    weights = {k: v.float() for k, v in states["module"].items()}
    master = (states.get("optimizer") or {}).get("fp32_groups")
    if master is not None and model_config is not None:  # bf16 at ZeRO-0 (FP16_UnfusedOptimizer)
        weights.update(_unfused_master(model_config, master))
    return weights


def _flat_master(engine_dir: Path, mp: str) -> dict:
    """The fp32 master in the flat partitions of pipeline stage `mp` ("00", "01", ...), names as
    the engine's module has them. DeepSpeed's BF16_Optimizer (bf16 at ZeRO-1 with fp32
    accumulation: the `bf16` preset; bf16 pipelines) and ZeRO-1/2 write, per rank, a flat fp32
    partition of each parameter group and where each parameter's fragment sits in it
    (param_slice_mappings: name -> start, numel); a parameter cut between ranks is its fragments
    in rank order, shaped by the stage's model-states file (param_shapes). zero_to_fp32 reads
    only ZeRO's files ("not a zero checkpoint" for BF16_Optimizer's) and no pipeline."""
    import re

    import torch

    files = engine_dir.glob(f"*zero_pp_rank_*_mp_rank_{mp}_optim_states.pt")
    pieces: dict = {}
    for f in sorted(files, key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1))):
        o = safe_torch_load(f)["optimizer_state_dict"]
        for flat, mapping in zip(o["single_partition_of_fp32_groups"], o.get("param_slice_mappings") or []):
            for name, a in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, a.start, a.numel))
    shapes = safe_torch_load(engine_dir / f"mp_rank_{mp}_model_states.pt").get("param_shapes") or []
    return {name: torch.cat(pieces[name]).view(shape).clone() for group in shapes for name, shape in group.items()
            if name in pieces}


def _put_pipeline_master(model_config, engine_dir: Path, layers: dict) -> None:
    """A bf16 pipeline's fp32 master put into its stage state dicts `layers` (layer index ->
    state dict, as read from the layer files), in place; nothing for fp32, whose layer files are
    the master. Stage names are `L.param` (layer L) and `tied_modules.K.param` (every layer of
    tied key K; the stages' copies are equal: the same all-reduced gradients)."""
    import torch
    from deepspeed.pipe import TiedLayerSpec

    from ..engine.pipeline.specs import make_plan

    if not any(t.dtype == torch.bfloat16 for sd in layers.values() for t in sd.values()):
        return
    specs = make_plan(model_config).specs
    for mp in sorted({f.name.split("_mp_rank_")[1][:2] for f in engine_dir.glob("*zero_pp_rank_*optim_states.pt")}):
        for name, t in _flat_master(engine_dir, mp).items():
            head, _, rest = name.partition(".")
            if head == "tied_modules":
                key, _, param = rest.partition(".")
                for i, spec in enumerate(specs):
                    if isinstance(spec, TiedLayerSpec) and spec.key == key and i in layers:
                        layers[i][param] = t
            else:
                layers[int(head)][rest] = t


def _unfused_master(model_config, fp32_groups: list) -> dict:
    """Names for FP16_UnfusedOptimizer's fp32 master, saved as a list of tensors per parameter
    group: the groups are the client optimizer's, train.engine.ds_config.param_groups over the
    model's named parameters (a model on the meta device gives the order)."""
    import torch

    import model_zoo
    from ..engine.ds_config import param_groups

    with torch.device("meta"):
        model = model_zoo.model_class(model_config)(model_config)
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [[name_of[id(p)] for p in g["params"]] for g in param_groups(model.named_parameters(), 0.0)]
    if [len(n) for n in names] != [len(g) for g in fp32_groups]:
        raise ValueError(f"the checkpoint's fp32 master has groups of {[len(g) for g in fp32_groups]} tensors, the "
                         f"model {[len(n) for n in names]}: not a checkpoint of this model")
    return {n: t.float() for ns, ts in zip(names, fp32_groups) for n, t in zip(ns, ts)}


def load_weights(model, step_dir: Path, tag: str = "engine") -> tuple[list[str], list[str]]:
    """Load a checkpoint's fp32 weights (engine_weights) into `model`, key for key; returns the
    keys that did not fit, (missing, unexpected), for the caller's error (a tied lm_head.weight,
    not stored, is not missing). The one weight loader of `load_model` and init.from_checkpoint
    (train.trainer.loop.load_init_weights)."""
    weights = engine_weights(Path(step_dir), tag, model_config=model.config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    return missing, list(unexpected)


def load_model(step_dir: Path):
    """(model with the checkpoint's fp32 weights, tokenizer, run config) of a checkpoint."""
    from .. import registry
    from ..config import from_dict, RunConfig
    from ..data.tokenizer import load_tokenizer

    state = ckpt.TrainerState.load(step_dir / ckpt.STATE_FILE)
    cfg = from_dict(RunConfig, state.config or {})
    tok, tokens = load_tokenizer(cfg.data)
    arch = registry.get(cfg.model.arch)
    model = arch.build(cfg.model, registry.padded_vocab(tokens.vocab_size))
    missing, unexpected = load_weights(model, step_dir)
    if missing or unexpected:
        raise ckpt.CheckpointError(f"{step_dir}: weights do not match the model its config describes (missing "
                                   f"{missing[:3]}, unexpected {unexpected[:3]})")
    return model, tok, cfg
