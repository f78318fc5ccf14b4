"""The unified engine's contract (train/engine/engines.py), plain vs 2-stage pipeline, one launch.

Run under `torchrun --standalone --nproc_per_node=2 tests/workers/engine_worker.py OUT.json DIR`
(CPU, gloo; DS_ACCELERATOR=cpu). For each kind (plain: 2 data-parallel ranks; pipeline: 2 stages
of one pipeline) the same seed builds the same debug CD model and `build_engine` wraps it as the
trainer does; every rank then answers every call of the contract on the same global batches
(each data-parallel rank its rows): train_batch twice, held_out_loss, grad_norm, lr, save, load
into an engine built from other weights (the held-out loss must come back). Rank 0 writes, per
kind and rank, the type names of the answers and their values to OUT.json; tests/test_pipeline.py
asserts on it. DIR holds the checkpoints (shared by the ranks).
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from train import registry  # noqa: E402
from train.config import load_config  # noqa: E402
from train.engine import runtime as eng  # noqa: E402
from train.engine.ds_config import build_ds_config  # noqa: E402
from train.engine.engines import build_engine  # noqa: E402
from train.trainer.loop import check  # noqa: E402

ROWS, T = 4, 32  # the global batch: 4 rows of 32 tokens; micro-batches of 2 rows (2 per data-parallel rank)
KINDS = {"plain": ["parallel.zero_stage=1", "parallel.gradient_accumulation_steps=1"],
         "pipeline": ["parallel.zero_stage=1", "parallel.pipeline_stages=2", "parallel.gradient_accumulation_steps=2"]}


def batches(vocab: int, seed: int) -> list[dict]:
    """Global batches of ROWS full CD rows (every micro-batch with as many target tokens, so that
    the plain per-token and the pipeline per-micro-batch held-out means agree), counts removed."""
    arch = registry.get("cd")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        b = arch.random_batch(ROWS, registry.Lengths(decoder=T), vocab, g)
        out.append({k: v for k, v in b.items() if not k.startswith("num_")})
    return out


def answers(engine, world, step_batches, eval_batch, ckpt: str, rebuild) -> dict:
    """Every call of the contract, on this rank: its type names and values."""
    def mine(batch):  # this data-parallel rank's rows, as micro-batches of 2
        rows = ROWS // engine.dp_size
        part = {k: v[engine.dp_rank * rows:(engine.dp_rank + 1) * rows] for k, v in batch.items()}
        return eng.split_micro(part, 2)

    steps = [engine.train_batch(mine(b)) for b in step_batches]
    held = engine.held_out_loss(mine(eval_batch))
    engine.save(ckpt)
    eng.barrier()
    other = rebuild()
    other.load(ckpt)
    again = other.held_out_loss(mine(eval_batch))
    first = steps[0]
    mean_losses = [v / world.size for v in eng.all_sum([s.loss for s in steps], world.device)]  # over ranks
    return {
        "types": {"train_batch": type(first).__name__, "loss": type(first.loss).__name__,
                  "ce_loss": type(first.ce_loss).__name__, "z_loss": type(first.z_loss).__name__,
                  "held_out_loss": type(held).__name__, "grad_norm": type(engine.grad_norm()).__name__,
                  "lr": type(engine.lr()).__name__, "module": isinstance(engine.module, torch.nn.Module),
                  "whole_model": type(engine.whole_model).__name__},
        "losses": [s.loss for s in steps], "ce_loss": first.ce_loss, "mean_losses": mean_losses,
        "held_out_loss": held, "reloaded_held_out_loss": again, "dp": [engine.dp_rank, engine.dp_size],
        "counts_rows": engine.counts_rows,
    }


class World:
    def __init__(self, dist):
        self.device, self.size = dist.device, dist.world_size


def main(out_path: str, ckpt_root: str) -> None:
    dist = eng.setup_distributed()
    torch.set_num_threads(1)
    result = {}
    for kind, extra in KINDS.items():
        cfg = load_config(None, ["model.arch=cd", "objective.name=flm", "model.size=debug", f"objective.seq_length={T}",
                                 "parallel.micro_batch_size=2", "optim.lr=3e-3", "schedule.name=constant",
                                 "schedule.max_steps=4", f"run_dir={ckpt_root}/{kind}", *extra])
        derived = check(cfg, dist.world_size)
        ds_config = build_ds_config(cfg, derived)
        arch = registry.get("cd")

        def build(seed: int):
            torch.manual_seed(seed)
            model = arch.build(cfg.model, 512)
            return model, build_engine(cfg, model, derived, ds_config, dist)

        model, engine = build(1234)
        data = batches(model.config.vocab_size, 7)
        got = answers(engine, World(dist), data[:2], data[2], os.path.join(ckpt_root, kind),
                      lambda: build(999)[1])
        got["whole_model_is_the_model"] = engine.whole_model is model
        result[kind] = eng.all_gather_object(got)
        del engine
    if dist.is_rank0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    eng.barrier()
    eng.teardown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
