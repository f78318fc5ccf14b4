"""2-stage DeepSpeed pipeline vs the unpipelined model_zoo model, many cases in one launch.

Run under `torchrun --standalone --nproc_per_node=2 tests/workers/pipeline_worker.py OUT.json`
(CPU, gloo; DS_ACCELERATOR=cpu). For every case: the same seed builds the same model_zoo model
on both ranks; a 2-stage ArchscalePipeline copies its weights; DeepSpeed (client torch AdamW)
trains it for a few optimizer steps on fixed synthetic packed batches (several examples per
row, padding, prefixes) with gradient accumulation, then evaluates and saves a checkpoint.
Rank 0 trains a copy of the model in plain torch with the same optimizer, global batch and
accumulation, and writes both loss curves, the largest weight difference after training
(pipeline weights gathered from both stages and mapped back to model_zoo keys), the largest
difference of the weights converted from the checkpoint's layer files, whether an engine
resumed from that checkpoint evaluates and steps like the original, and the per-stage
mask-context build counts to OUT.json. tests/test_pipeline.py asserts on that file.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import deepspeed  # noqa: E402
import model_zoo  # noqa: E402
from train.objectives.batch import collate_decoder, collate_encoder_decoder  # noqa: E402
from train.objectives.core import Example  # noqa: E402
from train.engine.pipeline import (PipelineConfigError, initialize_pipeline_engine,  # noqa: E402
                            model_state_dict_from_layer_files, pipeline_batches)

STEPS = 4  # optimizer steps per case
GAS = 2  # micro-batches per step (gradient accumulation)
MICRO = 2  # rows per micro-batch
T, TI, TO = 24, 20, 12  # decoder row length; ED encoder / decoder lengths
OPT = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)

# name, arch, zero stage, model options, gradient clipping, activation checkpoint interval, partition
CASES = [
    ("cd_zero0", "cd", 0, {}, 0.0, 0, "parameters"),
    # stage 0 holds the embedding alone; the tied head is on stage 1
    ("cd_zero1_clip_embed_alone", "cd", 1, {}, 0.1, 0, [0, 1, 6]),
    ("cd_learned_untied_zloss_ckpt", "cd", 0, dict(position="learned", tie_embeddings=False, z_loss=1e-3), 0.0, 1,
     "parameters"),
    # stage 1 holds the tied LM head alone
    ("cd_zero1_rope_head_alone", "cd", 1, dict(position="rope"), 0.0, 0, [0, 5, 6]),
    ("nd_zero0", "nd", 0, {}, 0.0, 0, "parameters"),
    ("nd_zero1_rope_mixed_layers", "nd", 1, dict(position="rope", bidirectional_mode="mixed_layers"), 0.0, 0,
     "parameters"),
    ("nd_zero1_mixed_heads_ckpt_clip", "nd", 1, dict(bidirectional_mode="mixed_heads"), 0.1, 1, "parameters"),
    ("ed_zero0", "ed", 0, {}, 0.0, 0, "parameters"),
    # split inside the decoder stack: encoder output, decoder T5 table and ids cross the boundary
    ("ed_zero1_clip_split_in_decoder", "ed", 1, {}, 0.1, 0, [0, 8, 11]),
    # split inside the encoder stack: the tied embedding lives on both stages (encoder input on
    # stage 0, decoder input and head on stage 1)
    ("ed_zero1_split_in_encoder_zloss", "ed", 1, dict(vocab_size=64, z_loss=1e-3), 0.0, 0, [0, 3, 11]),
    ("ed_zero0_rope_untied_ckpt_uniform", "ed", 0, dict(position="rope", tie_embeddings=False,
                                                        bidirectional_mode="mixed_layers"), 0.0, 1, "uniform"),
]


def _row(rng, vocab: int, length: int, prefix: bool, fill: float) -> list[Example]:
    """Random examples packed into one row, using about `fill` of it (the rest is padding)."""
    row, used = [], 0
    while True:
        n_in, n_tgt = int(rng.integers(2, 6)), int(rng.integers(2, 7))
        if used + n_in + n_tgt > int(length * fill):
            return row
        row.append(Example(rng.integers(2, vocab, n_in), rng.integers(2, vocab, n_tgt)))
        used += n_in + n_tgt


def make_batch(arch: str, vocab: int, rng) -> dict:
    fills = [1.0, 0.75][:MICRO] + [0.9] * max(0, MICRO - 2)  # a full row and one with padding
    if arch == "ed":
        rows = []
        for f in fills:
            row, ei, di = [], 0, 0
            while True:
                n_in, n_tgt = int(rng.integers(3, 7)), int(rng.integers(2, 5))
                if ei + n_in > int(TI * f) or di + n_tgt > int(TO * f):
                    break
                row.append(Example(rng.integers(2, vocab, n_in), rng.integers(2, vocab, n_tgt)))
                ei, di = ei + n_in, di + n_tgt
            rows.append(row)
        return collate_encoder_decoder(rows, TI, TO, pad_id=0)
    return collate_decoder([_row(rng, vocab, T, arch == "nd", f) for f in fills], T, arch == "nd", pad_id=0)


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("num_")}


def reference(model, steps_batches: list[list[dict]], eval_batches: list[dict], clip: float):
    """Plain torch: loss / GAS per micro-batch, summed gradients, one AdamW step per list."""
    opt = torch.optim.AdamW(model.parameters(), **OPT)
    losses, norms = [], []
    for micro in steps_batches:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for b in micro:
            loss = model(**model_inputs(b)).loss
            (loss / len(micro)).backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))))
        opt.step()
        losses.append(total / len(micro))
    with torch.no_grad():
        ev = float(np.mean([model(**model_inputs(b)).loss.item() for b in eval_batches]))
    return losses, ev, norms


def run_case(case, ckpt_root: str) -> dict:
    name, arch, zero, opts, clip, ckpt_interval, partition = case
    rank = dist.get_rank()
    torch.manual_seed(1234)
    model = model_zoo.build(arch, "debug", **opts)
    config = model.config
    rng = np.random.default_rng(7)
    steps_batches = [[make_batch(arch, config.vocab_size, rng) for _ in range(GAS)] for _ in range(STEPS)]
    eval_batches = [make_batch(arch, config.vocab_size, rng) for _ in range(GAS)]
    ref_model = copy.deepcopy(model) if rank == 0 else None
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()} if rank == 0 else None

    ds_config = {
        "train_batch_size": MICRO * GAS,  # data-parallel size 1: the 2 processes are the 2 stages
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GAS,
        "zero_optimization": {"stage": zero},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": clip,
        "steps_per_print": 10 ** 9,
        "pipeline": {"activation_checkpoint_interval": ckpt_interval},
    }
    t0 = time.time()
    engine = initialize_pipeline_engine(model, ds_config, num_stages=2, partition_method=partition,
                                        optimizer=lambda m: torch.optim.AdamW(m.parameters(), **OPT))
    module = engine.module
    cache = module.plan.cache
    pipe_losses = []
    for micro in steps_batches:
        loss = engine.train_batch(data_iter=pipeline_batches(micro, config))
        pipe_losses.append(float(loss))
    builds_after_train = cache.builds
    eval_loss = float(engine.eval_batch(data_iter=pipeline_batches(eval_batches, config)))
    seconds = time.time() - t0

    # weights: each stage's layers mapped to model_zoo keys, gathered on rank 0
    local = {k: v.detach().clone() for k, v in module.model_state_dict().items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    ckpt_dir = os.path.join(ckpt_root, name)
    engine.save_checkpoint(ckpt_dir, tag="final")
    dist.barrier()

    # resume: a pipeline engine built from other weights loads the checkpoint (layer files into
    # these layer classes, optimizer state) and takes the next step exactly as the original does
    torch.manual_seed(999)
    other = model_zoo.build(arch, "debug", **opts)
    resumed = initialize_pipeline_engine(other, ds_config, num_stages=2, partition_method=partition,
                                         optimizer=lambda m: torch.optim.AdamW(m.parameters(), **OPT))
    resumed.load_checkpoint(ckpt_dir, tag="final")
    next_batches = [make_batch(arch, config.vocab_size, rng) for _ in range(GAS)]
    resumed_eval = float(resumed.eval_batch(data_iter=pipeline_batches(eval_batches, config)))
    next_loss = float(engine.train_batch(data_iter=pipeline_batches(next_batches, config)))
    resumed_next_loss = float(resumed.train_batch(data_iter=pipeline_batches(next_batches, config)))
    stack_names = sorted({getattr(m, "kind").name for m in module.forward_funcs if hasattr(m, "kind")
                          and type(m).__name__ == "BlockLayer"})
    info = dict(parts=[int(p) for p in module.parts], builds=builds_after_train)
    infos = [None] * dist.get_world_size()
    dist.all_gather_object(infos, dict(info, stacks=stack_names))
    result = None
    if rank == 0:
        ref_losses, ref_eval, ref_norms = reference(ref_model, steps_batches, eval_batches, clip)
        ref_state = ref_model.state_dict()
        merged = {}
        for part in gathered:
            merged.update(part)
        weight_diff = max((merged[k] - v).abs().max().item() for k, v in ref_state.items())
        converted = model_state_dict_from_layer_files(config, os.path.join(ckpt_dir, "final"))
        reloaded = model_zoo.build(arch, "debug", **opts)
        reloaded.load_state_dict(converted, strict=True)  # every key, nothing extra
        ckpt_diff = max((converted[k] - v).abs().max().item() for k, v in ref_state.items())
        result = dict(
            arch=arch, zero=zero, options=opts, clip=clip, activation_checkpoint_interval=ckpt_interval,
            partition=partition, pipeline_losses=pipe_losses, reference_losses=ref_losses,
            loss_diffs=[abs(a - b) for a, b in zip(pipe_losses, ref_losses)],
            pipeline_eval=eval_loss, reference_eval=ref_eval, eval_diff=abs(eval_loss - ref_eval),
            weight_diff=weight_diff, checkpoint_weight_diff=ckpt_diff,
            reference_grad_norms=ref_norms,
            weight_change=max((initial[k] - v).abs().max().item() for k, v in ref_state.items()),
            missing_keys=sorted(set(ref_state) - set(merged)), extra_keys=sorted(set(merged) - set(ref_state)),
            resumed_eval_diff=abs(resumed_eval - eval_loss), resumed_step_diff=abs(next_loss - resumed_next_loss),
            ranks=infos, micro_batches=STEPS * GAS, seconds=round(seconds, 2))
    # let go of the engine's groups and buffers before the next case
    del engine, module, resumed
    return result


def main() -> None:
    out_path = sys.argv[1]
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    # gloo alone moves the tensors; DeepSpeed would first compile its shared-memory allreduce op
    # (a C++ build of 45-120 s on CPU) unless it is marked unavailable
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    results = {}
    t_start = time.time()
    ckpt_root = os.path.join(os.path.dirname(os.path.abspath(out_path)), "checkpoints")  # shared by the ranks
    for case in CASES:
        if only and case[0] not in only:
            continue
        r = run_case(case, ckpt_root)  # an exception ends the launch: the other rank would wait forever
        if rank == 0:
            results[case[0]] = r
    # ZeRO-2 with a pipeline is refused by our check before DeepSpeed sees it
    try:
        initialize_pipeline_engine(model_zoo.build("cd", "debug"), {"zero_optimization": {"stage": 2}},
                                   num_stages=2, optimizer=lambda m: None)
        zero2 = "no error"
    except PipelineConfigError as e:
        zero2 = str(e)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(cases=results, zero2_error=zero2,
                           seconds=round(time.time() - t_start, 2)), f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
