"""One benchmark command: the hardware's matmul peak, the attention kernels alone, and every
architecture through the real training step, side by side with the Hugging Face anchors.

    python -m bench                       # GPU: the issue's shapes (CD ~1.3B at seq 2048, ...)
    python -m bench --smoke               # CPU: tiny shapes, seconds; keeps the harness working in CI
    python -m bench --only attention      # matmul | attention | models | hf | data
    python -m bench --only models --models cd,nd   # some of the architecture rows (see MODELS)
    python -m bench --json out.json
    python -m bench --profile DIR         # profile each model's training step: top kernels, time shares
    python -m bench compile-check         # CPU: graph breaks / recompiles of the compiled blocks per variant

Prints a table (tokens/s, model TFLOP/s, fraction of the measured peak, ratio to the HF anchor,
peak memory) and writes JSON. Model FLOPs come from model_zoo.train_flops (one formula for all
architectures, attention counted as each mask requires); an attention kernel's FLOPs are the
work its mask requires (4 * B * H * hd * allowed pairs forward, 2.5x that for forward+backward).
Record every GPU run in bench/RESULTS.md with its device, versions and date.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from .suite import (Row, bench_archscale, bench_attention, bench_hf, bench_matmul, environment,  # noqa: F401
                    format_table, format_targets, gpu_shapes, link_anchors, load_rows, smoke_shapes, targets)


def _parser(parts: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU shapes (what CI runs)")
    p.add_argument("--only", nargs="*", default=parts, choices=parts,
                   help="the parts to run (default: all; the matmul peak always runs, ratios need it)")
    p.add_argument("--models", default=None,
                   help="comma-separated names of the archscale rows to run (default: all of them)")
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="print one table and the targets from the JSON files of several runs (same device)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile each model's training step instead: top kernels and time shares, into DIR")
    return p


def _write_json(path: str, env, rows: list[Row]) -> None:
    with open(path, "w") as f:
        json.dump({"env": env, "rows": [asdict(r) for r in rows]}, f, indent=1)


def _merge(files: list[str], json_path) -> int:
    """--merge: one table and the targets from the JSON files of several runs of one device."""
    rows, envs = load_rows(files)
    devices = {e.get("device") for e in envs}
    if len(devices) > 1:
        print(f"error: the files come from different devices {sorted(map(str, devices))}: ratios across devices "
              "mean nothing; merge runs of one device", file=sys.stderr)
        return 2
    link_anchors(rows)
    print(f"# {envs[0]}")
    print(format_table(rows))
    print()
    print(format_targets(targets(rows)))
    if json_path:
        _write_json(json_path, envs[0], rows)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compile-check"]:  # graph breaks and recompiles of the compiled blocks (CPU)
        from .compile_check import main as compile_check

        return compile_check(argv[1:])
    parts = ["matmul", "attention", "hf", "models", "data"]
    a = _parser(parts).parse_args(argv)
    if a.merge:
        return _merge(a.merge, a.json)
    if not a.smoke and not torch.cuda.is_available():
        print("error: no GPU here; run with --smoke for the CPU smoke mode", file=sys.stderr)
        return 2
    s = smoke_shapes() if a.smoke else gpu_shapes()
    names = None
    if a.models:
        names = {n.strip() for n in a.models.split(",") if n.strip()}
        unknown = names - {m.name for m in s.models}
        if unknown:
            print(f"error: unknown model row(s) {sorted(unknown)}; choose from: "
                  f"{', '.join(m.name for m in s.models)}", file=sys.stderr)
            return 2
    torch.manual_seed(0)
    if a.profile:
        from .profile import profile_models

        profile_models(s, names, a.profile)
        return 0
    env = environment(a.smoke)
    rows: list[Row] = []

    def keep(row: Row) -> None:
        """Each row as it is measured: a line on stderr and the JSON rewritten, so that a run cut
        by a time limit (a device call) still returns what it measured."""
        rows.append(row)
        print(f"[bench] {row.group} {row.name}: {row.ms:.2f} ms"
              + (f", {row.tflops:.3g} TFLOP/s" if row.tflops else "")
              + (f", {row.tokens_per_s:,.0f} tokens/s" if row.tokens_per_s else ""), file=sys.stderr, flush=True)
        if a.json:
            _write_json(a.json, env, rows)

    keep(bench_matmul(s))
    peak = rows[0].tflops
    parts = []
    if "attention" in a.only:
        parts.append(bench_attention(s))
    if "hf" in a.only:
        parts.append(bench_hf(s, peak))
    if "models" in a.only:
        parts.append(bench_archscale(s, peak, names))
    if "data" in a.only:
        from .data import bench_data

        parts.append(Row("data", d["name"], d["shape"], d["ms_per_batch"], tokens_per_s=d["tokens_per_s"],
                         note=d.get("note", "")) for d in bench_data(a.smoke))
    for part in parts:
        for row in part:
            keep(row)
    link_anchors(rows)
    print(f"# {env}")
    print(format_table(rows))
    print()
    if a.smoke:
        print("(smoke mode: tiny shapes on a CPU; these numbers say nothing about the GPU targets)")
    else:
        print(format_targets(targets(rows)))
    if a.json:
        _write_json(a.json, env, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
