"""What `archscale reproduce` measures beyond compare's table (each from the runs' newest
checkpoints or their curves), and the readings a page adds about the test itself."""
from __future__ import annotations

from pathlib import Path

from .rules import LENGTHS, RANK, SPEEDUP, length_metric

def measure_low_rank(doc: dict, names: dict, windows: int = 16, prefix: int = 64) -> list[dict]:
    """Adds RANK (and prefix_numerical_rank) to every run of `doc` from its newest checkpoint;
    returns the paired differences on RANK (comparison.pairs' format)."""
    import torch
    from model_zoo.analysis import attention_spectra

    from ...data import prepare
    from ...eval.stats import mean_std
    from ...eval.yardstick import build_yardstick
    from ...trainer import checkpointing as ckpt
    from ...trainer.weights import load_model
    from ..comparison import pairs

    ids = None
    for cell in doc["cells"]:
        for r in cell["runs"]:
            model, tok, cfg = load_model(ckpt.newest_checkpoint(Path(r["run_dir"]) / "checkpoints"))
            if ids is None:
                ys = build_yardstick(prepare(cfg.data, None), cfg.eval, cfg.data, tok)
                ids = torch.tensor(ys.tokens[:windows])
            batch = {"input_ids": ids, "prefix_lengths": torch.full((ids.shape[0],), prefix)}
            with torch.no_grad():
                rows = attention_spectra(model, batch, block="bidirectional")
            r[RANK] = mean_std([x["effective_rank"] for x in rows])[0]
            r["prefix_numerical_rank"] = mean_std([x["numerical_rank"] for x in rows])[0]
    return pairs(doc["cells"], (RANK,))



def reading_lengths(doc: dict, names: dict) -> str:
    """Whether plain RoPE fails to extrapolate at all here (the claim's premise)."""
    runs = next(c for c in doc["cells"] if c["name"] == names["rope"])["runs"]
    first, last = (sum(r[length_metric(m)] for r in runs) / len(runs) for m in (LENGTHS[0], LENGTHS[-1]))
    if last > first:
        return ""
    return (f"Plain RoPE shows no extrapolation failure at this scale: its loss on the same last n/2 tokens is "
            f"{last:.3f} at {LENGTHS[-1]}n against {first:.3f} at n (more context still helps), so there is no "
            f"failure for either control to repair, and this run cannot test the claim.")


def measure_lengths(doc: dict, names: dict, windows: int = 32) -> list[dict]:
    """Adds length_metric(m) for m in LENGTHS to every run of `doc` (newest checkpoint; the same
    held-out windows for every run, cut from documents of at least 4n tokens); returns their
    paired differences (comparison.pairs' format, seeds' spread only)."""
    import dataclasses

    from ...data import prepare
    from ...eval.scoring import Scorer
    from ...eval.yardstick import build_yardstick
    from ...trainer import checkpointing as ckpt
    from ...trainer.weights import load_model
    from ..comparison import pairs

    sets = {}
    for cell in doc["cells"]:
        for r in cell["runs"]:
            model, tok, cfg = load_model(ckpt.newest_checkpoint(Path(r["run_dir"]) / "checkpoints"))
            n = int(cfg.objective.seq_length)
            if not sets:
                prepared = prepare(cfg.data, None)
                for m in LENGTHS:
                    ev = dataclasses.replace(cfg.eval, window_tokens=m * n, windows=windows)
                    sets[m] = build_yardstick(prepared, ev, cfg.data, tok).tokens.tolist()
            scorer = Scorer(model, batch_size=cfg.eval.score_batch_size)
            for m in LENGTHS:
                lls = scorer.loglikelihoods([(w[:1], w[1:]) for w in sets[m]])
                tail = [-lp for ll in lls for lp in ll.token_logprobs[-(n // 2):]]
                r[length_metric(m)] = sum(tail) / len(tail)
            r["trained_length"] = n
    return pairs(doc["cells"], tuple(length_metric(m) for m in LENGTHS))


def reading_nca(doc: dict, names: dict) -> str:
    """Where the adapted run starts and ends next to the from-scratch run (mean over seeds)."""
    cells = {c["name"]: c["runs"] for c in doc["cells"]}
    mean = lambda runs, j: sum(r["eval_losses"][j][3] for r in runs) / len(runs)  # noqa: E731
    nca, scratch = cells[names["nca"]], cells[names["scratch"]]
    first = nca[0]["eval_losses"][0][0]
    return (f"At its first evaluation (step {first}) the NC-A run's held-out loss is {mean(nca, 0):.3f} against "
            f"{mean(scratch, 0):.3f} from scratch; at the end it is {mean(nca, -1):.3f} against "
            f"{mean(scratch, -1):.3f} (means over seeds; each run has its own warm-up and cosine schedule).")


def measure_catch_up(doc: dict, names: dict) -> list[dict]:
    """Adds the catch-up (target loss, steps) to every NC-A run; returns the speed-up as one entry
    of the pairs list (metric SPEEDUP, per_seed: None where the target was not reached)."""
    cells = {c["name"]: c for c in doc["cells"]}
    scratch = {r["seed"]: r for r in cells[names["scratch"]]["runs"]}
    per_seed = []
    for r in cells[names["nca"]]["runs"]:
        ref = scratch[r["seed"]]["eval_losses"][-1]  # (step, tokens, flops, loss)
        step = next((st for st, _, _, loss in r["eval_losses"] if loss <= ref[3]), None)
        r["target_loss"], r["catch_up_step"], r["scratch_steps"] = ref[3], step, ref[0]
        r["final_loss"] = r["eval_losses"][-1][3]
        r[SPEEDUP] = None if step is None else ref[0] / step
        per_seed.append(r[SPEEDUP])
    mean = None if None in per_seed else sum(per_seed) / len(per_seed)
    return [{"a": names["nca"], "b": names["scratch"], "metric": SPEEDUP, "per_seed": per_seed, "mean": mean,
             "low": None, "high": None, "resolved": False, "seeds": [r["seed"] for r in cells[names["nca"]]["runs"]]}]
