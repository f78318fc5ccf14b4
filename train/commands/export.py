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

from ..trainer import checkpointing as ckpt
from ..trainer.weights import checkpoint_dir, load_model


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
