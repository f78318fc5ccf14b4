"""`bash bench/device_run.sh check` (`python -m bench.check`): the whole GPU check of issue 30 in
one device call of at most 540 s, wheel install and compiles included.

Items, in priority order, each with its own time budget and the least time it needs to start:
  1 gpu_tests  tests/test_gpu.py's bf16 flex-vs-fp32-reference cases (forward and backward,
               every mask and score_mod) and its no-recompile test, in a pytest subprocess
  2 matmul     the bf16 matmul peak
  3 models     HF Llama, CD:FLM, ND:PLM, ED:MLM, HF T5: training steps at ~1.3B parameters,
               sequence 2048 (ED 1024/1024, HF T5 at ED's shape), in this process
  4 attention  causal flash, prefix flex, T5-bias flex, forward + backward
  5 profile    a short torch.profiler trace of each model's step (bench/profile.py)
A deadline runs from --started (device_run.sh passes the time it began, so the wheel install
counts): an item, or a row inside one, with less time left than it needs is skipped with a
`[check] skip` line and the reason in the JSON. The JSON (env, items, rows: the `python -m bench`
format, so `--merge` reads it) is rewritten after every item and every row: a call cut short
still returns what it measured. `--device cpu` runs the same items at tiny shapes (CI).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("CD:FLM", "ND:PLM", "ED:MLM")
ATTENTION = ("causal (flash)", "prefix per row", "T5 bias, causal")
GPU_TESTS = ["tests/test_gpu.py", "-k", "bf16_flex_path or do_not_recompile"]


@dataclasses.dataclass(frozen=True)
class Budget:
    """Seconds per item: (its budget, the least it needs to start) and the least one row needs."""

    total: float
    items: dict  # item -> (budget_s, need_s)
    row_need: dict  # "archscale" | "hf" | "attention" | "profile" -> need_s per row


# GPU (H100): see docs/performance.md for the arithmetic; 540 s from the script's start
GPU_BUDGET = Budget(540, {"gpu_tests": (150, 40), "matmul": (15, 5), "models": (220, 60), "attention": (45, 15),
                          "profile": (60, 20)},
                    {"archscale": 45, "hf": 15, "attention": 10, "profile": 20})
# CPU (CI): generous, since a shared 2-core machine can take minutes to import deepspeed
CPU_BUDGET = Budget(1800, {"gpu_tests": (300, 1), "matmul": (60, 0.5), "models": (900, 5), "attention": (120, 1),
                           "profile": (600, 5)},
                    {"archscale": 3, "hf": 1, "attention": 0.5, "profile": 3})


def check_shapes(device: str):
    """bench.suite's shapes cut to the check's rows: CD, ND and ED (GPU: ~1.3B, seq 2048; ED at CD's
    parameters, 1024/1024) and the two HF anchors; HF T5 at ED's shape (12 + 12 layers, d_ff 5632,
    untied), not the 2.93B anchor of the full benchmark. Fewer timed steps (2 warm-up, 5 timed)."""
    from .suite import gpu_shapes, smoke_shapes

    s = gpu_shapes() if device == "cuda" else smoke_shapes()
    models = [m for m in s.models if m.name in MODELS]
    ed = next(m for m in models if m.name == "ED:MLM")
    t5 = dict(s.hf_t5, d_model=ed.model["d_model"], d_kv=ed.model["head_dim"], d_ff=ed.model["d_ff"],
              num_layers=ed.model["n_layers"], num_heads=ed.model["n_heads"],
              tie_word_embeddings=ed.model.get("tie_embeddings", True))
    return dataclasses.replace(s, models=models, hf_t5=t5, ed_in=ed.rows.encoder, ed_out=ed.rows.decoder,
                               ed_micro=ed.micro, warmup=min(s.warmup, 2), iters=min(s.iters, 5))


class Check:
    """The deadline, the report and its JSON file."""

    def __init__(self, device: str, budget: Budget, started: float, json_path: Path):
        from .suite import environment

        self.device, self.budget, self.deadline, self.path = device, budget, started + budget.total, json_path
        self.shapes = check_shapes(device)
        self.report = {"env": environment(device != "cuda"), "budget_s": budget.total,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "items": {}, "rows": []}
        self.item_deadline = self.deadline

    def left(self, until: float = None) -> float:
        return (self.item_deadline if until is None else until) - time.time()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.report, indent=1, default=str))

    def keep(self, row) -> None:
        """A measured row: into the report (HF ratios linked), a line on stderr, the JSON rewritten."""
        from .suite import Row, link_anchors

        self.report["rows"].append(dataclasses.asdict(row))
        rows = [Row(**r) for r in self.report["rows"]]
        link_anchors(rows)
        self.report["rows"] = [dataclasses.asdict(r) for r in rows]
        print(f"[check] {row.group} {row.name}: {row.ms:.2f} ms", file=sys.stderr, flush=True)
        self.save()

    def room(self, item: str, kind: str) -> Callable[[str], bool]:
        """A predicate for the rows of `item`: False (with a skip line, the reason in the JSON) when
        less time is left in the item than one row of `kind` needs."""
        need = self.budget.row_need[kind]

        def ok(name: str) -> bool:
            left = self.left()
            if left >= need:
                return True
            reason = f"{max(left, 0):.0f} s left in the item, a row needs {need:g} s"
            self.report["items"][item].setdefault("skipped_rows", {})[name] = reason
            print(f"[check] skip {item} / {name}: {reason}", flush=True)
            self.save()
            return False

        return ok


# -------------------------------------------------------------------------------------- items
def gpu_tests(c: Check) -> dict:
    """tests/test_gpu.py's bf16 cases in a pytest subprocess, cut at the item's deadline."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(c.left(), 1))
        out, rc, cut = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as e:  # its output so far comes as bytes, even with text=True
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        rc, cut = None, True
    tests = dict(re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", out, re.M))
    counts = {k.lower(): sum(v == k for v in tests.values()) for k in ("PASSED", "FAILED", "SKIPPED", "ERROR")}
    result = {"returncode": rc, "cut_at_deadline": cut, **counts, "tests": tests, "tail": out[-3000:]}
    if tests and counts["skipped"] == len(tests):
        result["status"], result["reason"] = "skipped", f"no CUDA GPU: pytest skipped all {len(tests)} tests"
    elif cut:
        result["status"] = "partial"
    elif rc not in (0, None) or counts["failed"] or counts["error"]:
        result["status"] = "failed"
    return result


def matmul(c: Check) -> dict:
    from .suite import bench_matmul

    row = bench_matmul(c.shapes)
    c.keep(row)
    return {"tflops": row.tflops}


def models(c: Check) -> dict:
    """HF Llama first (the CD / ND anchor), then CD, ND, ED, then HF T5: a cut run keeps pairs."""
    from .suite import bench_archscale, bench_hf

    peak = next((r["tflops"] for r in c.report["rows"] if r["group"] == "peak"), None)
    for row in bench_hf(c.shapes, peak, when=lambda n: n == "HF Llama" and c.room("models", "hf")(n)):
        c.keep(row)
    for row in bench_archscale(c.shapes, peak, when=c.room("models", "archscale")):
        c.keep(row)
    for row in bench_hf(c.shapes, peak, when=lambda n: n == "HF T5" and c.room("models", "hf")(n)):
        c.keep(row)
    return {"rows": [r["name"] for r in c.report["rows"] if r["group"] in ("hf", "archscale")]}


def attention(c: Check) -> dict:
    from .suite import bench_attention

    room = c.room("attention", "attention")
    names = []
    for row in bench_attention(c.shapes, when=lambda n: n in ATTENTION and room(n)):
        c.keep(row)
        names.append(row.name)
    return {"rows": names}


def profile(c: Check) -> dict:
    from .profile import profile_models

    return {"summaries": profile_models(c.shapes, None, str(c.path.parent), steps=2,
                                        when=c.room("profile", "profile"))}


ITEMS = {"gpu_tests": gpu_tests, "matmul": matmul, "models": models, "attention": attention, "profile": profile}


def run_items(c: Check) -> None:
    for name, fn in ITEMS.items():
        budget, need = c.budget.items[name]
        left = c.left(c.deadline)
        entry = c.report["items"][name] = {"budget_s": budget}
        if left < need:
            entry.update(status="skipped", reason=f"{max(left, 0):.0f} s left of the {c.budget.total:.0f} s budget, "
                                                   f"the item needs {need:g} s")
            print(f"[check] skip {name}: {entry['reason']}", flush=True)
            c.save()
            continue
        print(f"[check] {name}: budget {budget:.0f} s, {left:.0f} s left", flush=True)
        t0 = time.time()
        c.item_deadline = min(c.deadline, t0 + budget)
        try:
            entry.update(fn(c))
            entry.setdefault("status", "done")
        except Exception as e:  # noqa: BLE001 (one item's failure must not lose the later items)
            traceback.print_exc()
            entry.update(status="failed", reason=f"{type(e).__name__}: {e}"[:1000])
        entry["seconds"] = round(time.time() - t0, 1)
        c.save()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: tiny shapes (CI)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds from --started (default: 540 GPU, 1800 CPU)")
    p.add_argument("--started", type=float, default=None, help="epoch seconds the deadline runs from (default: now)")
    p.add_argument("--json", default=None, help="the report (default: $OUT/check.json or device_out/check.json)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --device cpu for the CPU mode", file=sys.stderr)
        return 2
    if a.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    base = GPU_BUDGET if a.device == "cuda" else CPU_BUDGET
    budget = base if a.budget_s is None else dataclasses.replace(base, total=a.budget_s)
    path = Path(a.json or Path(os.environ.get("OUT", "device_out")) / "check.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    c = Check(a.device, budget, time.time() if a.started is None else a.started, path)
    torch.manual_seed(0)
    run_items(c)
    from .suite import Row, format_table

    if c.report["rows"]:
        print(format_table([Row(**r) for r in c.report["rows"]]))
    for name, entry in c.report["items"].items():
        print(f"[check] {name:<10} {entry['status']:<8} {entry.get('seconds', 0):>6.1f} s  {entry.get('reason', '')}")
    print(f"[check] wrote {path}; {c.left(c.deadline):.0f} s of the budget left")
    return 1 if any(e["status"] == "failed" for e in c.report["items"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
