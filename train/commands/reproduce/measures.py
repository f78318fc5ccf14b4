"""What `archscale reproduce` measures beyond compare's table (each from the runs' newest
checkpoints or their curves), and the readings a page adds about the test itself."""
from __future__ import annotations

from pathlib import Path

from .rules import LENGTHS, RANK, RANK_INIT, SPEEDUP, length_metric

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

    from ... import registry

    ids = None
    for cell in doc["cells"]:
        for r in cell["runs"]:
            trained, tok, cfg = load_model(ckpt.newest_checkpoint(Path(r["run_dir"]) / "checkpoints"))
            if ids is None:
                ys = build_yardstick(prepare(cfg.data, None), cfg.eval, cfg.data, tok)
                ids = torch.tensor(ys.tokens[:windows])
            torch.manual_seed(cfg.seed)  # a fresh initialisation of the same model: "at init"
            init = registry.get(cfg.model.arch).build(cfg.model, trained.config.vocab_size)
            batch = {"input_ids": ids, "prefix_lengths": torch.full((ids.shape[0],), prefix)}
            for key, model in ((RANK, trained), (RANK_INIT, init)):
                with torch.no_grad():
                    rows = attention_spectra(model.eval(), batch, block="bidirectional")
                r[key] = mean_std([x["effective_rank"] for x in rows])[0]
                if model is trained:
                    r["prefix_numerical_rank"] = mean_std([x["numerical_rank"] for x in rows])[0]
    plot_ranks(doc, Path(doc["cells"][0]["runs"][0]["run_dir"]).parent.parent / "prefix_rank.png")
    return pairs(doc["cells"], (RANK, RANK_INIT))


def reading_low_rank(doc: dict, names: dict) -> str:
    """How much of the trained difference is there at init already (the masks' own effect)."""
    mean = lambda name, key: sum(r[key] for c in doc["cells"] if c["name"] == name  # noqa: E731
                                 for r in c["runs"]) / len(next(c for c in doc["cells"] if c["name"] == name)["runs"])
    nd, cd = names["nd"], names["cd"]
    return (f"The bidirectional block is low-rank before any training too: at init ND's prefix block has "
            f"effective rank {mean(nd, RANK_INIT):.2f} against CD's {mean(cd, RANK_INIT):.2f}; after training "
            f"{mean(nd, RANK):.2f} against {mean(cd, RANK):.2f}. Near-uniform attention over a full block is "
            f"close to rank one, while a causal block's rows differ by construction, so at this scale the mask "
            f"itself, not what training learnt, makes most of the difference.")


def reading_ed_params(doc: dict, names: dict) -> str:
    """What the two ED cells' searched shapes make of the claim's premise (ED at equal FLOPs per
    token has ~2x the parameters): their shapes and non-embedding parameters against CD's."""
    cells = {c["name"]: c for c in doc["cells"]}
    mean = lambda name, key: sum(r[key] for r in cells[name]["runs"]) / len(cells[name]["runs"])  # noqa: E731
    cd, ed, edp = names["cd"], names["ed"], names["ed-params"]
    shape = lambda name: "x".join(str((cells[name].get("match") or {}).get("shape", {}).get(k, "?"))  # noqa: E731
                                  for k in ("d_model", "n_layers", "d_ff"))
    ratio = mean(ed, "non_embedding_params") / mean(cd, "non_embedding_params")
    return (f"The FLOPs-matched ED (d_model x layers per stack x d_ff = {shape(ed)}) has {ratio:.2f}x CD's "
            f"non-embedding parameters, not the ~2x of the reference shape, and the parameter-matched ED is "
            f"{shape(edp)} ({mean(edp, 'non_embedding_params') / mean(cd, 'non_embedding_params'):.2f}x): at this "
            f"size the two ED cells are almost the same model, so the test cannot separate FLOPs from parameters. "
            f"Two facts of the debug size make it so: the LM head is most of a token's FLOPs, and ED:PLM's rows "
            f"compute both sides' padding, so at CD's shape ED costs more FLOPs per token than CD and matching "
            f"FLOPs takes it to one layer per stack. The premise holds at larger sizes (docs/evaluation.md: a "
            f"FLOPs-matched ED lands near the decoder's depth per stack); "
            f"the ladder (docs/ladder.md) is the test at scale.")


def plot_ranks(doc: dict, path: Path) -> Path:
    """Bars: each cell's prefix-block effective rank at init and after training (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c["name"] for c in doc["cells"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for j, (key, label) in enumerate(((RANK_INIT, "at init"), (RANK, "after training"))):
        vals = [sum(r[key] for r in c["runs"]) / len(c["runs"]) for c in doc["cells"]]
        ax.bar([i + 0.4 * j for i in range(len(names))], vals, width=0.4, label=label)
    ax.set_xticks([i + 0.2 for i in range(len(names))], names, fontsize=8)
    ax.set_ylabel("effective rank of the prefix block")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path



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

    from ... import registry
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
            scorer = Scorer(model, registry.get(cfg.model.arch), batch_size=cfg.eval.score_batch_size)
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


def write_toy_tasks(directory: Path) -> tuple[Path, Path]:
    """The toy prompted tasks of docs/evaluation.md (fixed seed): a training mixture of two parity
    prompts and one ordering prompt, and a held-out ordering prompt never trained on. They
    exercise the mechanics of multitask finetuning, not a small model's reasoning."""
    import json
    import random

    from ...data.mixture import build_mixture

    directory.mkdir(parents=True, exist_ok=True)
    r = random.Random(0)

    def even():
        n = r.randrange(1000)
        return {"input": f"Is {n} an even number?", "answer_choices": ["yes", "no"], "label": n % 2,
                "task": "parity/is_even"}

    def odd_or_even():
        n = r.randrange(1000)
        return {"input": f"{n}: odd or even?", "answer_choices": ["even", "odd"], "label": n % 2,
                "task": "parity/odd_or_even"}

    def pair(word, task, bigger):
        a, b = r.sample(range(1000), 2)
        return {"input": f"Which is {word}, {a} or {b}?", "answer_choices": [str(a), str(b)],
                "label": int((b > a) == bigger), "task": task}

    files = {"parity_even.jsonl": (even, 2000), "parity_odd.jsonl": (odd_or_even, 300),
             "order.jsonl": (lambda: pair("larger", "order/larger", True), 2000),
             "heldout.jsonl": (lambda: pair("smaller", "order_heldout/smaller", False), 200)}
    for name, (make, n) in files.items():
        (directory / name).write_text("".join(json.dumps(make()) + "\n" for _ in range(n)))
    mixture = directory / "mixture.jsonl"
    build_mixture([directory / n for n in ("parity_even.jsonl", "parity_odd.jsonl", "order.jsonl")], mixture, cap=1000)
    return mixture, directory / "heldout.jsonl"


MTF_STEPS = 50  # wang-zero-shot: multitask finetuning steps of each pretrained run (configs/mtf.yaml's settings)


def measure_zero_shot(doc: dict, names: dict) -> list[dict]:
    """For every pretrained run: the yardstick and the held-out toy task (rank classification)
    before MT-F, then MT-F (configs/mtf.yaml from the run's checkpoint, MTF_STEPS steps on the toy
    mixture, run directory OUT/LABEL-mtf/seed-I) and both again on the same windows, the finetuned
    model asked the prompted way. Adds pre_*/mtf_* keys to each run; returns their differences."""
    from ... import registry
    from ...config import load_config
    from ...data import prepare
    from ...eval.tasks import read_task_file
    from ...eval.yardstick import build_yardstick, evaluate_model, flat_metrics
    from ...trainer import checkpointing as ckpt
    from ...trainer.weights import load_model
    from ..compare import train_or_read
    from ..comparison import pairs
    from ..plan.hardware import REPO

    out = Path(doc["cells"][0]["runs"][0]["run_dir"]).parent.parent
    mixture, heldout = write_toy_tasks(out / "tasks")
    records, ys = read_task_file(heldout), None
    for cell in doc["cells"]:
        for r in cell["runs"]:
            run = Path(r["run_dir"])
            model, tok, cfg = load_model(ckpt.newest_checkpoint(run / "checkpoints"))
            prepared = prepare(cfg.data, None)
            ys = ys or build_yardstick(prepared, cfg.eval, cfg.data, tok)
            arch = registry.get(cfg.model.arch)  # the MT-F run continues the same architecture
            score = lambda m, objective: flat_metrics(evaluate_model(  # noqa: E731
                m, arch, ys, objective, tok, prepared.tokens, batch_size=cfg.eval.score_batch_size, task_records=records))
            pre = score(model, cfg.objective)
            mtf = load_config(REPO / "configs" / "mtf.yaml", [
                f"model.arch={cfg.model.arch}", f"model.size={cfg.model.size}", f"seed={cfg.seed}",
                "parallel.zero_stage=0", f"parallel.micro_batch_size={cfg.parallel.micro_batch_size}",
                "schedule.train_tokens=null", f"schedule.max_steps={MTF_STEPS}", "data.format=multitask",
                f"data.train_files=[{mixture}]", "objective.seq_length=128", "objective.inputs_length=104",
                "objective.targets_length=24", f"init.from_checkpoint={run}", f"checkpoint.every_n_steps={MTF_STEPS}",
                f"run_dir={run.parent.parent / (run.parent.name + '-mtf') / run.name}"])
            if train_or_read(mtf, f"{cell['name']} seed {r['seed']} MT-F") is None:
                raise RuntimeError("stopped by a signal during MT-F; run the same command again to resume")
            tuned, _, mcfg = load_model(ckpt.newest_checkpoint(Path(mtf.run_dir) / "checkpoints"))
            post = score(tuned, mcfg.objective)
            for when, m in (("pre", pre), ("mtf", post)):
                r[f"{when}_nats"], r[f"{when}_tasks_acc"] = m["yardstick_nats"], m.get("tasks_acc")
    return pairs(doc["cells"], ("mtf_nats", "pre_tasks_acc", "mtf_tasks_acc"))
