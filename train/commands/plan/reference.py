"""The reference experiment (shared/SCIENCE.md) planned run by run: `archscale plan --reference`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ... import registry
from .hardware import DEFAULT_HEADROOM, REPO
from .planner import plan

REFERENCE_COMMON = ["optim.name=adafactor", "optim.lr=0.01", "schedule.name=inverse_sqrt", "schedule.rsqrt_steps=10000",
                    "model.z_loss=1e-4", "parallel.global_batch_size=2048", "parallel.micro_batch_size=8",
                    "parallel.zero_stage=0"]
# the reference experiment's architectures: the registry entries with a reference size (CD, ND, ED)
REFERENCE_CELLS = [(a, o) for a, spec in registry.ARCHITECTURES.items() if spec.reference_size
                   for o in ("flm", "plm", "mlm")]
# SCIENCE.md gives the adaptation length for NC-A (~51B tokens); LM-A is planned at the same length
REFERENCE_TOKENS = {"pretrain": 168e9, "nc-a": 51e9, "lm-a": 51e9, "mt-f": 13e9}


def _fits(arch: str, objective: str) -> bool:
    return objective in registry.get(arch).objectives


def _model(arch: str) -> list[str]:
    """The overrides of an architecture at its reference size."""
    return [f"model.arch={arch}", f"model.size={registry.get(arch).reference_size}"]


def _lm_a_runs() -> list[dict]:
    """LM-A: each MLM-pretrained model continued with the language-modelling objective its
    architecture reads: FLM where the context is read causally (CD), else PLM (ND, ED)."""
    runs = []
    for a in dict.fromkeys(a for a, _ in REFERENCE_CELLS):
        if not _fits(a, "mlm"):
            continue
        obj = "flm" if registry.get(a).reads_context_causally else "plm"
        runs.append({"run": f"{a.upper()}:MLM -> LM-A ({a.upper()}:{obj.upper()})", "phase": "adaptation",
                     "arch": a, "objective": obj,
                     "overrides": _model(a) + [f"objective.name={obj}",
                                                  f"schedule.train_tokens={int(REFERENCE_TOKENS['lm-a'])}"]})
    return runs


def _reference_runs() -> list[dict]:
    """Every run of the reference experiment as (name, overrides), SCIENCE.md's numbers."""
    runs = []
    for arch, obj in REFERENCE_CELLS:
        runs.append({"run": f"{arch.upper()}:{obj.upper()}", "phase": "pretraining", "arch": arch, "objective": obj,
                     "overrides": _model(arch) + [f"objective.name={obj}",
                                                  f"schedule.train_tokens={int(REFERENCE_TOKENS['pretrain'])}"]})
    runs.extend(_lm_a_runs())
    runs.append({"run": "CD:FLM -> NC-A (ND:MLM)", "phase": "adaptation", "arch": "nd", "objective": "mlm",
                 "overrides": _model("nd") + ["objective.name=mlm",
                                              f"schedule.train_tokens={int(REFERENCE_TOKENS['nc-a'])}"]})
    mtf = [r for r in runs if r["phase"] == "pretraining" and _fits(r["arch"], r["objective"])]
    mtf.append(runs[-1])
    for r in mtf:
        arch = r["arch"]
        runs.append({"run": f"{r['run']} -> MT-F", "phase": "multitask finetuning", "arch": arch, "objective": "prompted",
                     "overrides": _model(arch) + [
                         "objective.name=prompted", "model.overrides.dropout=0.1", "optim.lr=1e-3",
                         "schedule.name=constant", f"schedule.train_tokens={int(REFERENCE_TOKENS['mt-f'])}"]})
    return runs


def reference_plan(gpus: int = 64, gpu: str = "h100-80gb", *, mfu: Optional[float] = None,
                   bench_dir: Path = REPO / "bench", headroom: float = DEFAULT_HEADROOM) -> dict:
    """The reference experiment (SCIENCE.md) on `gpus` x `gpu`: every pretraining cell CD/ND/ED x
    FLM/PLM/MLM at 168B tokens (ED:FLM does not exist: flm has no encoder input), LM-A (each
    X:MLM continued with FLM (CD) or PLM (ND, ED), 51B tokens as NC-A), NC-A (CD:FLM -> ND:MLM,
    51B tokens), and MT-F (13B tokens, dropout 0.1, lr 1e-3 constant) of every
    pretrained model and of the NC-A model. Each run starts from the reference setup (Adafactor,
    ZeRO-0, micro-batch 8, global batch 2048) and takes the planner's first fix when it does not
    fit; when only flat-Adafactor layouts fit, it is planned with optim.allow_flat_adafactor=true
    and says so. MT-F runs use the objective's default lengths (as pretraining)."""
    rows, total = [], 0.0
    for r in _reference_runs():
        ov = REFERENCE_COMMON + r["overrides"]
        row = {"run": r["run"], "phase": r["phase"], "tokens": None, "overrides": ov}
        if not _fits(r["arch"], r["objective"]):
            rows.append({**row, "status": f"not available: {registry.get(r['arch']).unfit_reason(r['objective'])}"})
            continue
        p = plan(None, ov, gpus=gpus, gpu=gpu, mfu=mfu, bench_dir=bench_dir, headroom=headroom)
        note = ""
        if not p["memory"]["fits"] and (p["fix"] or {}).get("change") is None:
            ov = ov + ["optim.allow_flat_adafactor=true"]
            p = plan(None, ov, gpus=gpus, gpu=gpu, mfu=mfu, bench_dir=bench_dir, headroom=headroom)
            note = "flat Adafactor (no factored layout fits); "
        chosen = p
        change = "as configured"
        if not p["memory"]["fits"]:
            fix = p["fix"] or {}
            if fix.get("change") is None:
                rows.append({**row, "status": f"does not fit: {fix.get('reason')}"})
                continue
            change = fix["change"]
            chosen = plan(None, ov + fix["overrides"], gpus=gpus, gpu=gpu, mfu=mfu, bench_dir=bench_dir,
                          headroom=headroom, fix=False) if "overrides" in fix else p
            if chosen["warnings"] and not note:
                note = "flat Adafactor; "
        t, par = chosen["time"], chosen["parallel"]
        total += t["gpu_hours"]
        rows.append({**row, "tokens": t["train_tokens"], "status": "ok", "layout": note + change,
                     "parameters": chosen["model"]["parameters"],
                     "zero_stage": par["zero_stage"], "pipeline_stages": par["pipeline_stages"],
                     "micro_batch_size": par["micro_batch_size"],
                     "activation_checkpointing": par["activation_checkpointing"],
                     "checkpoint_policy": par["checkpoint_policy"],
                     "peak_gib": chosen["memory"]["peak_gib"], "step_seconds": t["step_seconds"],
                     "tokens_per_second": t["tokens_per_second"], "wall_hours": t["wall_hours"],
                     "gpu_hours": t["gpu_hours"], "gpu_hours_overlapped": t["gpu_hours_overlapped"],
                     "mfu": t["mfu"], "mfu_source": t["mfu_source"],
                     "warnings": chosen["warnings"]})
    total_overlapped = sum(r.get("gpu_hours_overlapped", 0.0) for r in rows)
    return {"schema": 1, "gpus": gpus, "gpu": gpu, "rows": rows, "total_gpu_hours": total,
            "total_gpu_hours_overlapped": total_overlapped,
            "total_wall_hours_one_run_at_a_time": total / gpus}


def format_reference(ref: dict) -> str:
    lines = [f"The reference experiment on {ref['gpus']} x {ref['gpu']} (one run at a time on all GPUs)", "",
             "| run | phase | tokens | layout (first fit) | peak GiB | step s | tokens/s | wall h | GPU-hours | "
             "GPU-hours, comm. overlapped |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in ref["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['run']} | {r['phase']} | - | {r['status']} | | | | | | |")
            continue
        lines.append(f"| {r['run']} | {r['phase']} | {r['tokens'] / 1e9:.1f}B | {r['layout']} | {r['peak_gib']:.1f} | "
                     f"{r['step_seconds']:.2f} | {r['tokens_per_second']:,.0f} | {r['wall_hours']:,.1f} | "
                     f"{r['gpu_hours']:,.0f} | {r['gpu_hours_overlapped']:,.0f} |")
    lines += [f"| **total** | | | | | | | {ref['total_wall_hours_one_run_at_a_time']:,.0f} | "
              f"**{ref['total_gpu_hours']:,.0f}** | **{ref['total_gpu_hours_overlapped']:,.0f}** |"]
    mfus = sorted({r["mfu_source"] for r in ref["rows"] if r["status"] == "ok"})
    lines += ["", "MFU: " + "; ".join(mfus)]
    return "\n".join(lines)

