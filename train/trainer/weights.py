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
    keys through train.engine.pipeline; ZeRO >= 1 partitions are gathered by DeepSpeed's zero_to_fp32; a
    ZeRO-0 checkpoint holds the whole module in mp_rank_00_model_states.pt.
    """
    engine_dir = Path(step_dir) / tag
    if not engine_dir.is_dir():
        raise ckpt.CheckpointError(f"{step_dir} has no {tag}/ directory: not a checkpoint of this trainer")
    verify_checkpoint(step_dir)  # zero_to_fp32 and the layer files load with weights_only=False: checked first
    if any(engine_dir.glob("layer_*-model_states.pt")):
        if model_config is None:
            raise ValueError("a pipeline checkpoint needs the model config to name its layers")
        from ..engine.pipeline import model_state_dict_from_layer_files

        return {k: v.float() for k, v in model_state_dict_from_layer_files(model_config, str(engine_dir)).items()}
    if any(engine_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=tag)
    states = safe_torch_load(engine_dir / "mp_rank_00_model_states.pt")
    return {k: v.float() for k, v in states["module"].items()}


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
