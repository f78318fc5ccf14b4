"""Zero-shot evaluation of CD / ND / ED checkpoints: the common yardstick, rank classification
and held-out loss.

    archscale eval runs/cd-flm --tasks heldout/rte.jsonl heldout/cb.jsonl          # 25%, 50%, 100%
    archscale eval runs/cd-flm --tasks t.jsonl --steps all --corpus /data/c4-val.json.gz

writes one JSON per evaluated checkpoint to RUN_DIR/eval/step-N.json (what `archscale report` reads).

**The common yardstick** (train/eval/yardstick.py, docs/evaluation.md): continuation loss in nats
per token and bits per byte, and zero-shot continuation choice, on windows of the run's held-out
split (or of `--corpus`), the same measure for every cell; `--no-yardstick` skips it.

**Log-likelihood of a continuation given a context**, as each architecture saw examples in training
(the batch contract of `train/objectives/batch.py`):

* CD: one causal row `context ++ continuation`; log p(c_j) is read from the logits at the position
  before c_j (logits[t] predicts token t+1), the first continuation token from the last context
  token's logits.
* ND: the same row with `prefix_lengths = len(context)`: the context is the bidirectional prefix,
  the continuation causal (the prefix-LM / prompted layout).
* ED: the context goes to the encoder, the continuation to the decoder as labels, decoder inputs
  = [decoder_start] + continuation[:-1] (T5's shift right).

**Rank classification** (T0 / the reference experiment): for a record with answer choices, score
each choice `c` by `sum_j log p(c_j | prompt, c_<j)` (tokens of the choice plus EOS, as the prompted
objective trains targets) and by that sum divided by its token count (length-normalised), and
predict the argmax of each: `acc` and `acc_norm`. Accuracy per task (prompt), the median over the
prompts of a dataset, the mean over datasets: the numbers the reference experiment reports.
A record's dataset is its `dataset` key if it has one, else the part of its `task` before the
first '/', else the task itself (so name prompts `rte/can_we_infer`, `rte/gpt3_style`, ...).

**Held-out loss**: mean cross-entropy per target token over the eval split of the run's data
stream (its own objective, as the trainer reports it) or over any corpus (`--corpus`), and its
exponential (perplexity).

Pitfalls: the scores are exact only if the context is not truncated (contexts longer than
`max_length` lose their start, as the prompted objective truncates inputs); an empty context
(lm-eval's rolling log-likelihood) becomes [EOS] for every architecture, the separator of
documents in training.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ConfigError
from ..trainer import checkpointing as ckpt
from ..trainer.heldout import heldout_batches
from .placement import Placement, dispatch
from .scoring import Scorer, input_device
from .tasks import aggregate, rank_classify, read_task_file  # noqa: F401  (importable from here too)

log = logging.getLogger("archscale.eval")


# ============================================================================ held-out loss
def heldout_loss(model, cfg, *, max_batches: int = 10, global_batch_size: int = 8, micro_batch_size: int = 8,
                 corpus: Sequence[str] = (), shard=None) -> dict:
    """Mean cross-entropy per target token (and perplexity) on the run's eval split, with its own
    objective and architecture, or on the files `corpus` (text / JSON Lines / Parquet / Arrow,
    read with the run's tokenizer; all of their documents are the eval split).

    The batches are `heldout_batches` and the score is the trainer's (`engine.eval_loss`: the
    model's own cross-entropy, as in training): with the run's numbers this is the trainer's
    held-out loss (the packing plan does not depend on the number of processes).

    Returns {"loss", "perplexity", "tokens", "batches", "corpus"}; loss None when nothing was scored.
    `shard` (train/eval/parallel.py): this process scores every N-th micro-batch; the per-batch
    sums are gathered and added in batch order, as one process adds them.
    """
    from ..data import prepare
    from ..engine.runtime import eval_loss

    data = cfg.data
    if corpus:
        data = replace(data, source="files", train_files=list(corpus), eval_files=list(corpus), eval_fraction=0.0)
    prepared = prepare(data, cfg.objective)
    if prepared.eval is None:  # e.g. multitask finetuning on train files only
        return {"loss": None, "perplexity": None, "tokens": 0, "batches": 0,
                "corpus": "none: the run's data has no eval split (no eval files, eval_fraction 0); pass --corpus"}
    batches, n = heldout_batches(prepared, cfg, global_batch_size=global_batch_size,
                                 micro_batch_size=micro_batch_size, max_batches=max_batches, data=data)
    model.eval()
    dev = input_device(model)
    per = [eval_loss(model, [b], dev) for b in batches] if shard is None else \
        shard.in_order(len(batches), lambda k: eval_loss(model, [batches[k]], dev))
    total, count = 0.0, 0.0
    for t, c in per:  # eval_loss's own running sum, batch by batch
        total += t
        count += c
    loss = total / count if count else None
    return {"loss": loss, "perplexity": math.exp(loss) if loss is not None and loss < 700 else None,
            "tokens": int(count), "batches": n, "corpus": list(corpus) if corpus else "run eval split"}


# ============================================================================ checkpoints of a run
def run_config(run_dir: str | Path):
    """The resolved RunConfig of a run directory (its config.yaml)."""
    from ..config import load_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ckpt.CheckpointError(f"{run_dir} is not a run directory (no config.yaml); pass the directory "
                                   f"`archscale train` wrote")
    return load_config(path, [])


def derived(cfg, world_size: int):
    """The run's derived numbers (global batch, planned steps, ...) for the world size it ran on."""
    from .. import registry
    from ..config import derive

    return derive(cfg, world_size, tokens_per_sequence=registry.get(cfg.model.arch).tokens_per_row(cfg.objective))


def planned_steps(cfg, world_size: int) -> int:
    """The run's schedule length in optimizer steps (what 100% means)."""
    return derived(cfg, world_size).max_steps


def select_checkpoints(run_dir: str | Path, steps: str = "25%,50%,100%") -> list[tuple[str, int, Path]]:
    """(what was asked, step, checkpoint dir) of the complete checkpoints to evaluate.

    `steps`: comma-separated percentages of the planned training length (the nearest complete
    checkpoint is taken; ties go to the later one), step numbers (must exist), `last`, or `all`.
    Keep milestone checkpoints from pruning with `checkpoint.keep_every_n_steps` (docs/config.md),
    e.g. a quarter of the run's steps, so that 25/50/100% exist exactly.
    """
    cfg = run_config(run_dir)
    have = ckpt.list_checkpoints(ckpt.RunLayout.from_config(cfg).checkpoints)
    if not have:
        raise ckpt.CheckpointError(f"{run_dir} has no complete checkpoint to evaluate")
    if steps.strip() == "all":
        return [(str(s), s, d) for s, d in have]
    by_step = dict(have)
    total = None
    out: list[tuple[str, int, Path]] = []
    for item in (x.strip() for x in steps.split(",") if x.strip()):
        if item == "last":
            s = have[-1][0]
        elif item.endswith("%"):
            if total is None:
                state = ckpt.TrainerState.load(have[-1][1] / ckpt.STATE_FILE)
                total = planned_steps(cfg, state.world_size)
            try:
                target = float(item[:-1]) / 100 * total
            except ValueError:
                raise ValueError(f"--steps item {item!r} is not a percentage like 25%") from None
            s = min(by_step, key=lambda k: (abs(k - target), -k))
            if abs(s - target) > 0.05 * total:
                log.warning("%s: %s of %d steps is step %.0f; the nearest complete checkpoint is step %d (set "
                            "checkpoint.keep_every_n_steps to keep milestones)", run_dir, item, total, target, s)
        else:
            try:
                s = int(item)
            except ValueError:
                raise ValueError(f"--steps item {item!r} is not a percentage (25%), a step, 'last' or 'all'") from None
            if s not in by_step:
                raise ckpt.CheckpointError(f"{run_dir} has no complete checkpoint at step {s}; complete steps: "
                                           f"{sorted(by_step)}")
        if s not in [o[1] for o in out]:
            out.append((item, s, by_step[s]))
    return out


def checkpoint_yardstick(model, tok, cfg, corpus: Sequence[str] = (), eval_overrides: Optional[dict] = None,
                         batch_size: Optional[int] = None, shard=None) -> dict:
    """The common yardstick (train/eval/yardstick.py) of a loaded model on its run's held-out
    split, or on the files `corpus` (all of their documents held out); `eval_overrides`: eval
    section fields that replace the run's (windows, window_tokens, prefix_fractions, choices)."""
    from .. import registry
    from ..data import prepare
    from .yardstick import build_yardstick, evaluate_model

    ev = replace(cfg.eval, **(eval_overrides or {}))
    ev.check()
    data = cfg.data
    if corpus:
        data = replace(data, source="files", format="auto", train_files=list(corpus), eval_files=list(corpus),
                       eval_fraction=0.0)
    prepared = prepare(data, None)
    try:
        ys = build_yardstick(prepared, ev, data, tok)
    except ValueError as e:  # no window fits: say why, and score the rest
        log.warning("no yardstick for %s: %s", cfg.run_dir, e)
        return {"skipped": str(e)}
    if ys is None:
        return {"skipped": "no held-out split of documents in the run's data; pass --corpus FILES"}
    res = evaluate_model(model, registry.get(cfg.model.arch), ys, cfg.objective, tok, prepared.tokens,
                         batch_size=batch_size or ev.score_batch_size, shard=shard)
    res["split"] = ys.split
    return res


def evaluate_checkpoint(step_dir: str | Path, task_files: Sequence[str] = (), *, loss: bool = True,
                        loss_batches: Optional[int] = None, corpus: Sequence[str] = (), batch_size: int = 16,
                        limit: int = 0, device: Optional[str] = None, yardstick: bool = True,
                        eval_overrides: Optional[dict] = None, shard=None, where: Placement = Placement()) -> dict:
    """Held-out loss, the common yardstick and rank classification of one checkpoint; the JSON
    `archscale eval` writes. `shard`: this process's share under a data-parallel launch
    (train/eval/parallel.py); `where`: accelerate's placement with offload (train/eval/placement.py)."""
    import torch

    from .. import registry
    from ..trainer.weights import load_model

    step_dir = Path(step_dir)
    records = [r for f in task_files for r in read_task_file(f, limit)]  # bad task files fail before loading
    t0 = time.perf_counter()
    model, tok, cfg = load_model(step_dir)
    if where.device_map is None:
        model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    model = dispatch(model.eval(), where)
    state = ckpt.TrainerState.load(step_dir / ckpt.STATE_FILE)
    result = {"checkpoint": str(step_dir), "step": state.step, "arch": cfg.model.arch, "objective": cfg.objective.name,
              "size": cfg.model.size, "params": registry.get(cfg.model.arch).num_params(model.config),
              "tokens_seen": state.tokens_seen, "target_tokens": state.target_tokens, "flops": state.flops,
              "task_files": [str(f) for f in task_files]}
    if loss:
        d = derived(cfg, state.world_size)
        result["heldout"] = heldout_loss(model, cfg, max_batches=loss_batches or cfg.eval.num_batches,
                                         global_batch_size=d.global_batch_size,
                                         micro_batch_size=cfg.parallel.micro_batch_size, corpus=corpus,
                                         shard=shard)
    if yardstick:
        result["yardstick"] = checkpoint_yardstick(model, tok, cfg, corpus, eval_overrides, shard=shard)
    if records:
        scorer = Scorer(model, registry.get(cfg.model.arch), batch_size=batch_size, eos_id=tok.eos_token_id,
                        pad_id=tok.pad_token_id, shard=shard)
        preds = rank_classify(scorer, tok, records)
        result["zero_shot"] = aggregate(preds)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["processes"] = shard.count if shard else 1  # data-parallel processes that scored it
    if where.device_map is not None:  # accelerate's placement: how many modules on each device
        placed = [str(d) for d in model.hf_device_map.values()]
        result["placement"] = {d: placed.count(d) for d in sorted(set(placed))}
    return result


def evaluate_run(run_dir: str | Path, task_files: Sequence[str] = (), *, steps: str = "25%,50%,100%",
                 write: bool = True, **kwargs) -> list[Path]:
    """Evaluate the selected checkpoints of a run; write RUN_DIR/eval/step-N.json for each
    (`write=False`: a data-parallel launch's other processes, which score and write nothing)."""
    run_dir = Path(run_dir)
    for f in task_files:
        read_task_file(f)  # fail on a bad task file before any model is loaded
    selected = select_checkpoints(run_dir, steps)
    out_dir = ckpt.RunLayout.of(run_dir).eval
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for asked, step, step_dir in selected:
        res = evaluate_checkpoint(step_dir, task_files, **kwargs)
        res["requested"] = asked
        path = out_dir / f"{ckpt.step_dir_name(step)}.json"
        if write:
            ckpt.atomic_write_text(path, json.dumps(res, indent=1) + "\n")
            log.info("%s step %d: %s", run_dir, step, summary_line(res))
        written.append(path)
    return written


def summary_line(res: dict) -> str:
    parts = []
    ys = res.get("yardstick") or {}
    if "continuation" in ys:
        c = ys["continuation"]
        parts.append(f"yardstick {c['nats_per_token']:.4f} nats/token, {c['bits_per_byte']:.4f} bits/byte")
        if ys.get("choice"):
            ch = ys["choice"]
            parts.append(f"continuation choice acc {ch['acc']:.3f} ± {ch['se']:.3f} (k={ch['k']}, n={ch['n']})")
    if res.get("heldout", {}).get("loss") is not None:
        parts.append(f"held-out loss {res['heldout']['loss']:.4f}")
    if "zero_shot" in res:
        m = res["zero_shot"]["mean"]
        parts.append(f"zero-shot acc {m['acc']:.4f} (length-normalised {m['acc_norm']:.4f}) over "
                     f"{len(res['zero_shot']['datasets'])} dataset(s)")
    return "; ".join(parts) or "nothing evaluated"


def launch_kwargs(device: Optional[str], device_map: Optional[str] = None, max_memory: Optional[str] = None,
                  offload_folder: Optional[str] = None) -> dict:
    """evaluate_run's device, shard, placement and write flag for this process: one process, or
    one of several under torchrun / accelerate launch (train/eval/parallel.py: each scores its
    share of the batches, the main process writes)."""
    from .parallel import Shard, launched, process_state
    from .placement import placement

    if not launched():
        gpu = int(device.split(":")[1]) if device and device.startswith("cuda:") else None
        return {"device": device, "shard": None, "write": True,
                "where": placement(device_map, max_memory, offload_folder, gpu)}
    state = process_state(device)
    dev = device if device == "cpu" else str(state.device)
    gpu = state.local_process_index if dev.startswith("cuda") else None
    return {"device": dev, "shard": Shard.of(state), "write": state.is_main_process,
            "where": placement(device_map, max_memory, offload_folder, gpu)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="archscale eval", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory (holding config.yaml and checkpoints/)")
    p.add_argument("--tasks", nargs="*", default=[], metavar="FILE.jsonl",
                   help="prompted task files with answer_choices and label (docs/data.md)")
    p.add_argument("--steps", default="25%,50%,100%",
                   help="percentages of the planned steps (nearest complete checkpoint), steps, 'last' or 'all'")
    p.add_argument("--no-loss", action="store_true", help="skip the held-out loss on the run's own objective")
    p.add_argument("--no-yardstick", action="store_true",
                   help="skip the common yardstick (continuation loss and continuation choice, docs/evaluation.md)")
    p.add_argument("--windows", type=int, default=None, help="yardstick windows (default: the run's eval.windows)")
    p.add_argument("--window-tokens", type=int, default=None,
                   help="tokens per yardstick window (default: the run's eval.window_tokens)")
    p.add_argument("--prefix-fractions", type=float, nargs="+", default=None,
                   help="where windows are cut (default: the run's eval.prefix_fractions)")
    p.add_argument("--choices", type=int, default=None,
                   help="continuations per zero-shot choice, 0 = off (default: the run's eval.choices)")
    p.add_argument("--loss-batches", type=int, default=None,
                   help="eval batches for the loss (default: the run's eval.num_batches)")
    p.add_argument("--corpus", nargs="*", default=[],
                   help="held-out loss and yardstick on these files (all held out) instead of the run's eval split")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass when scoring choices")
    p.add_argument("--limit", type=int, default=0, help="first N records of each task file (smoke tests); 0 = all")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu; under "
                   "torchrun / accelerate launch: this process's GPU, or cpu)")
    p.add_argument("--device-map", default=None, choices=("auto", "balanced", "balanced_low_0", "sequential"),
                   help="place the model with accelerate, offloading what does not fit (implied by --max-memory)")
    p.add_argument("--max-memory", default=None, metavar="gpu:20GiB,cpu:60GiB",
                   help="memory cap per device for --device-map: gpu (this process's GPU) or an index, cpu")
    p.add_argument("--offload-folder", default=None, help="where layers over the caps are offloaded (disk)")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("windows", a.windows), ("window_tokens", a.window_tokens),
                                   ("prefix_fractions", a.prefix_fractions), ("choices", a.choices)) if v is not None}
    try:
        launch = launch_kwargs(a.device, a.device_map, a.max_memory, a.offload_folder)
        written = evaluate_run(a.run_dir, a.tasks, steps=a.steps, loss=not a.no_loss, loss_batches=a.loss_batches,
                               corpus=a.corpus, batch_size=a.batch_size, limit=a.limit, yardstick=not a.no_yardstick,
                               eval_overrides=overrides, **launch)
    except (ckpt.CheckpointError, ValueError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not launch["write"]:
        return 0  # a data-parallel launch's other processes: the main process prints
    for path in written:
        print(f"{path}: {summary_line(json.loads(path.read_text()))}")
    return 0
