"""`archscale export RUN_DIR`: a checkpoint as a Hugging Face model directory.

    archscale export runs/cd-flm                      # newest complete checkpoint -> RUN_DIR/export/step-N
    archscale export runs/cd-flm --step 1200 --out /models/cd-flm-1200

The directory holds config.json, the weights (safetensors) and the run's tokenizer, and loads with
`model_zoo.load(DIR)`, `AutoModelForCausalLM.from_pretrained(DIR)` (CD / ND) or
`AutoModelForSeq2SeqLM.from_pretrained(DIR)` (ED) after `import model_zoo`. State-dict keys carry
no wrapper prefixes, so the export is a key-for-key copy of the fp32 weights (ZeRO partitions
gathered by DeepSpeed's zero_to_fp32).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import checkpointing as ckpt


def checkpoint_dir(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint to export: checkpointing.resolve_checkpoint (a run's newest or its `step`)."""
    return ckpt.resolve_checkpoint(run_dir, step)


def engine_weights(step_dir: Path, tag: str = "engine", model_config=None) -> dict:
    """The fp32 model weights of a DeepSpeed checkpoint, keys as the model names them.

    Pipeline checkpoints (layer_XX-model_states.pt, needs `model_config`) map back to model_zoo
    keys through train.pipeline; ZeRO >= 1 partitions are gathered by DeepSpeed's zero_to_fp32; a
    ZeRO-0 checkpoint holds the whole module in mp_rank_00_model_states.pt.
    """
    import torch

    engine_dir = Path(step_dir) / tag
    if not engine_dir.is_dir():
        raise ckpt.CheckpointError(f"{step_dir} has no {tag}/ directory: not a checkpoint of this trainer")
    if any(engine_dir.glob("layer_*-model_states.pt")):
        if model_config is None:
            raise ValueError("a pipeline checkpoint needs the model config to name its layers")
        from .pipeline import model_state_dict_from_layer_files

        return {k: v.float() for k, v in model_state_dict_from_layer_files(model_config, str(engine_dir)).items()}
    if any(engine_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=tag)
    states = torch.load(engine_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def load_weights(model, step_dir: Path, tag: str = "engine") -> tuple[list[str], list[str]]:
    """Load a checkpoint's fp32 weights (engine_weights) into `model`, key for key; returns the
    keys that did not fit, (missing, unexpected), for the caller's error (a tied lm_head.weight,
    not stored, is not missing). The one weight loader of `load_model` and init.from_checkpoint
    (train.loop.load_init_weights)."""
    weights = engine_weights(Path(step_dir), tag, model_config=model.config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    return missing, list(unexpected)


def load_model(step_dir: Path):
    """(model with the checkpoint's fp32 weights, tokenizer, run config) of a checkpoint."""
    from . import registry
    from .config import from_dict, RunConfig
    from .data.tokenizer import load_tokenizer

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


def export(run_dir: str | Path, out: str | Path | None = None, step: int | None = None) -> Path:
    step_dir = checkpoint_dir(run_dir, step)
    model, tok, _ = load_model(step_dir)
    out = Path(out) if out else Path(run_dir) / "export" / step_dir.name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory (holding checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export/step-N)")
    a = p.parse_args(argv)
    try:
        out = export(a.run_dir, a.out, a.step)
    except (ckpt.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
