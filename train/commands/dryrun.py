"""`archscale train CONFIG --dry-run`: everything a run would do, decided and printed, nothing done.

Prints the resolved config with each value's origin (default, file or command line), the
derived batch arithmetic for the world size, the generated DeepSpeed JSON, parameter counts,
FLOPs per token, the run directory and whether the run would resume (and from where). It runs no
training step, builds no model, initialises no process group and writes nothing (a built-in BPE
tokenizer that is not cached yet is not trained: the vocabulary is then the model size's).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..trainer import checkpointing as ckpt
from .. import registry
from ..config import RunConfig, format_config


def _vocab(cfg: RunConfig) -> tuple[int | None, str]:
    """(tokenizer vocabulary, how it was found) without writing anything."""
    tok = cfg.data.tokenizer
    try:
        if tok == "builtin-bpe":
            from ..data.tokenizer import builtin_bpe_path

            if not Path(builtin_bpe_path(cfg.data)).exists():
                return None, "built-in BPE not trained yet (the first run trains and caches it)"
        from ..data.tokenizer import load_tokenizer

        _, tokens = load_tokenizer(cfg.data)
        return tokens.vocab_size, f"tokenizer {tok}"
    except (OSError, ValueError) as e:
        return None, f"tokenizer {tok} not readable here ({e})"


def describe(cfg: RunConfig, origins: dict, world_size: int | None = None) -> str:
    from ..engine.ds_config import build_ds_config
    from ..trainer.loop import check

    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    derived = check(cfg, world)
    arch = registry.get(cfg.model.arch)
    vocab, vocab_note = _vocab(cfg)
    config = arch.make_config(cfg.model, registry.padded_vocab(vocab) if vocab else None)
    params = arch.num_params(config)
    row_flops = arch.row_flops(config, cfg.objective)  # the one analytic figure plan uses too
    embed = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    resume = ckpt.find_resume_point(cfg.run_dir, cfg.checkpoint.resume, checkpoints_dir=cfg.checkpoint.dir)
    out = ["# resolved config (value  # origin)", format_config(cfg, origins), "",
           "# derived",
           f"world size {world} = {derived.pipeline_stages} pipeline stage(s) x {derived.data_parallel_size} "
           f"data-parallel rank(s)",
           f"global batch {derived.global_batch_size} = micro-batch {derived.micro_batch_size} x accumulation "
           f"{derived.gradient_accumulation_steps} x data-parallel {derived.data_parallel_size}",
           f"tokens per step {derived.tokens_per_step:,} = {derived.global_batch_size} rows x "
           f"{derived.tokens_per_sequence} tokens; {derived.max_steps:,} steps = {derived.train_tokens:,} tokens seen",
           f"ZeRO {derived.zero_stage}, precision {derived.precision}, offload optimizer {derived.offload_optimizer} "
           f"/ params {derived.offload_param}, DeepSpeed preset {derived.ds_preset}",
           "", "# model",
           f"{cfg.model.arch.upper()} size {cfg.model.size}: {params:,} parameters ({params - embed:,} without "
           f"embeddings), vocab {config.vocab_size} ({vocab_note})",
           f"training FLOPs per token: {row_flops / derived.tokens_per_sequence:.4g} "
           f"({row_flops:.4g} per row of {derived.tokens_per_sequence} tokens, padding computed; x "
           f"{derived.global_batch_size} rows = "
           f"{arch.step_flops(config, cfg.objective, derived.global_batch_size):.4g} per step)",
           "", "# run directory",
           f"{Path(cfg.run_dir).resolve()}: "
           + (f"would RESUME from {resume}" if resume else "would start fresh (no complete checkpoint)"),
           "", "# DeepSpeed JSON (ds_config.json)", json.dumps(build_ds_config(cfg, derived), indent=2)]
    return "\n".join(out)
