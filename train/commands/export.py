"""`archscale export RUN_DIR`: a checkpoint as a Hugging Face model directory.

    archscale export runs/cd-flm                      # newest complete checkpoint -> RUN_DIR/export/step-N
    archscale export runs/cd-flm --step 1200 --out /models/cd-flm-1200

The directory holds config.json, the weights (safetensors; ZeRO partitions gathered by
DeepSpeed's zero_to_fp32; a bf16 run's fp32 master, not its bf16 working copy) in fp32, or in
bf16 with `--dtype bf16` (cast from the fp32 weights; config.json's `dtype` says which), and the
run's tokenizer (`AutoTokenizer.from_pretrained(DIR)`), and opens
with plain transformers, archscale not installed (model_zoo/export.py):
* CD with RoPE + SwiGLU + RMSNorm: a native `LlamaForCausalLM` (`AutoModelForCausalLM`);
* ED with T5 buckets + GEGLU + RMSNorm, tied embeddings: a native `T5ForConditionalGeneration`;
* any other model: our modeling code in the directory with `auto_map`, so
  `AutoModelForCausalLM` / `AutoModelForSeq2SeqLM.from_pretrained(DIR, trust_remote_code=True)`.
It prints which form it wrote (and why not a native one); `model_zoo.load(DIR)` opens every form.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model_zoo.export import save_for_transformers

from ..atomic import atomic_write_text
from ..trainer import checkpointing as ckpt
from ..trainer.weights import checkpoint_dir, load_model


DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --dtype: the torch dtype of each choice


def export(run_dir: str | Path, out: str | Path | None = None, step: int | None = None,
           dtype: str = "fp32") -> tuple[Path, str]:
    """(the directory, the form written: "llama" | "t5" | "remote-code"). The record
    (archscale_export.json) names the run's registry entry as its `arch` (e.g. eds, where the
    model's own label says ed), for whoever evaluates the directory (the lm-eval adapter).
    `dtype`: "fp32" or "bf16", the weights' dtype on disk."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype} is not an export dtype: use one of {', '.join(DTYPES)}")
    step_dir = checkpoint_dir(run_dir, step)
    model, tok, cfg = load_model(step_dir)
    out = Path(out) if out else Path(run_dir) / "export" / step_dir.name
    form = save_for_transformers(model.eval(), out, tok, dtype=getattr(torch, DTYPES[dtype]))
    record = out / "archscale_export.json"
    atomic_write_text(record, json.dumps({**json.loads(record.read_text()), "arch": cfg.model.arch}, indent=1) + "\n")
    return out, form


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory (holding checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export/step-N)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="the weights' dtype on disk (default fp32: the master weights as trained; bf16 casts them)")
    a = p.parse_args(argv)
    try:
        out, form = export(a.run_dir, a.out, a.step, a.dtype)
    except (ckpt.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    how = {"llama": "LlamaForCausalLM (native transformers)", "t5": "T5ForConditionalGeneration (native transformers)",
           "remote-code": "archscale's modeling code in the directory: from_pretrained(DIR, trust_remote_code=True)"}
    why = json.loads((out / "archscale_export.json").read_text())["why_not_native"]
    print(f"{out}: {how[form]}" + (f" (not native: {why})" if why else ""), file=sys.stderr)
    print(out)
    return 0
