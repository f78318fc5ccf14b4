"""The resume matrix: a run checkpointed at step 2 on W processes (ZeRO 1, 2 or 3; or 2 pipeline
stages at ZeRO-1) continues on W' processes to step 4; each cell either resumes with the losses
of the uninterrupted run (same global batch of 8 rows on every layout, dropout 0: the math is
the same, only reduction orders differ, so LOSS_TOL) or refuses with a one-line message that
names the layouts and the way out.

CI runs a subset in one 2-process launch (CI_CELLS: growing, staying and shrinking, each ZeRO
stage, a pipeline resume, and the pipeline <-> no pipeline refusal in both directions). `ARCHSCALE_RESUME_MATRIX=full` runs every cell of docs/resume.md's table and
prints the table (that is how the docs' table was made).

Launches are planned from the cells: sources on 1 process in this process, then one launch per
world size that has sources or targets whose sources exist, then the 1-process targets, then
launches for what is left (a target of a source made in a later launch).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from rehearse import CELLS, base_overrides, launch, losses, make_work, run_inproc, state

STEPS, CUT = 4, 2
LOSS_TOL = 1e-5
WORLDS = (1, 2, 4)
# a layout: (processes, pipeline stages)
PLAIN = [(w, 1) for w in WORLDS]
PIPES = [(2, 2), (4, 2)]


def full_cells() -> list[tuple]:
    cells = [(src, dst, z) for z in (1, 2, 3) for src in PLAIN for dst in PLAIN]
    cells += [(src, dst, 1) for src in PIPES for dst in PIPES + [(2, 1), (1, 1)]]
    cells += [((2, 1), (2, 2), 1)]
    return cells


# one 2-process launch: growing 1 -> 2 (ZeRO-1, ZeRO-3), staying 2 -> 2 (ZeRO-2, pipeline 2x1),
# shrinking 2 -> 1 (ZeRO-2, ZeRO-3), the refusals both ways; 4 processes are in
# tests/test_pipeline_dp.py (2x2 -> 2x1) and tests/test_multinode.py (2 nodes x 2 -> 1 x 2)
CI_CELLS = [((1, 1), (2, 1), 1), ((1, 1), (2, 1), 3), ((2, 1), (2, 1), 2), ((2, 1), (1, 1), 2),
            ((2, 1), (1, 1), 3), ((2, 2), (2, 2), 1), ((2, 2), (1, 1), 1), ((2, 1), (2, 2), 1)]


def name(layout) -> str:
    w, p = layout
    return f"{p}x{w // p}" if p > 1 else f"w{w}"


def overrides(work: Path, run_dir: Path, layout, zero: int) -> list[str]:
    return base_overrides(work) + CELLS["cd"] + [
        f"run_dir={run_dir}", f"schedule.max_steps={STEPS}", f"parallel.zero_stage={zero}",
        f"parallel.pipeline_stages={layout[1]}", "parallel.global_batch_size=8", f"checkpoint.every_n_steps={CUT}"]


def src_dir(work, layout, zero) -> Path:
    return work / f"src-{name(layout)}-z{zero}"


def dst_dir(work, src, dst, zero) -> Path:
    return work / f"{name(src)}-to-{name(dst)}-z{zero}"


def run_matrix(work: Path, cells: list[tuple]) -> dict:
    sources = sorted({(src, z) for src, _, z in cells})
    made: set = set()
    done: set = set()

    def source_runs(world):
        return [(s, z) for s, z in sources if s[0] == world and (s, z) not in made]

    def target_runs(world):
        return [c for c in cells if c[1][0] == world and c not in done and (c[0], c[2]) in made]

    def spec_of(world):
        spec = []
        srcs, made_now = source_runs(world), []
        for s, z in srcs:
            spec.append({"overrides": overrides(work, src_dir(work, s, z), s, z), "max_steps_now": CUT})
            made_now.append((s, z))
        made.update(made_now)
        for c in target_runs(world):
            src, dst, z = c
            spec.append({"overrides": overrides(work, dst_dir(work, src, dst, z), dst, z),
                         "copy_from": str(src_dir(work, src, z)), "expect_error": True})
            done.add(c)
        return spec

    def one_process():
        import shutil

        for item in spec_of(1):
            run = Path(next(o for o in item["overrides"] if o.startswith("run_dir="))[len("run_dir="):])
            if item.get("copy_from"):
                shutil.copytree(item["copy_from"], run)
            try:
                run_inproc(item["overrides"], max_steps_now=item.get("max_steps_now"))
                err = None
            except Exception as e:  # noqa: BLE001 - recorded as the cell's refusal
                if not item.get("expect_error"):
                    raise
                err = f"{type(e).__name__}: {e}"
            if item.get("expect_error"):
                (run / "error.txt").write_text(err or "no error")

    for z in sorted({z for _, _, z in cells}):  # the uninterrupted reference of each ZeRO stage
        run_inproc(overrides(work, work / f"ref-z{z}", (1, 1), z))
    one_process()
    for round_ in range(3):
        for world in (2, 4):
            spec = spec_of(world)
            if spec:
                launch(work, world, spec, f"launch{world}-{round_}")
        one_process()
        if done == set(cells):
            break
    assert done == set(cells), set(cells) - done
    return {c: outcome(work, *c) for c in cells}


def outcome(work: Path, src, dst, zero) -> dict:
    run = dst_dir(work, src, dst, zero)
    err = (run / "error.txt").read_text().strip()
    if err != "no error":
        return {"refused": err}
    got, ref = losses(run), losses(work / f"ref-z{zero}")
    st = state(run)
    return {"steps": sorted(got), "state": (st["step"], st["world_size"]),
            "diff": max(abs(got[s] - ref[s]) for s in range(CUT + 1, STEPS + 1)),
            "universal": (run / "checkpoints" / f"step-{CUT:08d}" / "engine_universal" / "COMPLETE").is_file()}


def table(results: dict) -> str:
    lines = []
    for z in sorted({c[2] for c in results}):
        cells = {(c[0], c[1]): r for c, r in results.items() if c[2] == z}
        srcs = sorted({s for s, _ in cells}, key=lambda l: (l[1], l[0]))
        dsts = sorted({d for _, d in cells}, key=lambda l: (l[1], l[0]))
        lines.append(f"\nZeRO-{z} (rows: saved on, columns: resumed on; max |loss diff| vs uninterrupted, steps "
                     f"{CUT + 1}-{STEPS})\n")
        lines.append("| saved on | " + " | ".join(label(d) for d in dsts) + " |")
        lines.append("|---" * (len(dsts) + 1) + "|")
        for s in srcs:
            row = []
            for d in dsts:
                r = cells.get((s, d))
                if r is None:
                    row.append("")
                elif "refused" in r:
                    row.append("refused")
                else:
                    row.append(f"{r['diff']:.1e}" + (" (universal)" if r["universal"] else ""))
            lines.append(f"| {label(s)} | " + " | ".join(row) + " |")
    refusals = sorted({r["refused"].split(": ", 1)[1].split(" was written")[1] for r in results.values()
                       if "refused" in r and " was written" in r["refused"]})
    for msg in refusals:
        lines.append(f"\nrefused with: `CHECKPOINT was written{msg}`")
    return "\n".join(lines)


def label(layout) -> str:
    w, p = layout
    return f"{p} stages x {w // p}" if p > 1 else f"{w} proc"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    work = make_work(tmp_path_factory, "resume_matrix")
    cells = full_cells() if os.environ.get("ARCHSCALE_RESUME_MATRIX") == "full" else CI_CELLS
    results = run_matrix(work, cells)
    print(table(results))
    return results


def expected_refusal(src, dst) -> bool:
    """A pipeline checkpoint names its parameters by layer, an unpipelined one by module."""
    return (src[1] > 1) != (dst[1] > 1)


@pytest.mark.slow
def test_every_cell_resumes_continuously_or_refuses_clearly(matrix):
    for (src, dst, z), r in matrix.items():
        cell = f"{name(src)} -> {name(dst)} ZeRO-{z}"
        if expected_refusal(src, dst):
            assert "refused" in r, (cell, r)
            msg = r["refused"]
            assert "\n" not in msg and f"parallel.pipeline_stages={src[1]}; this run has {dst[1]}" in msg, (cell, msg)
            assert "init.from_checkpoint" in msg, (cell, msg)
            continue
        assert "refused" not in r, (cell, r)
        assert r["steps"] == list(range(1, STEPS + 1)) and r["state"] == (STEPS, dst[0]), (cell, r)
        assert r["diff"] <= LOSS_TOL, (cell, r)
        # another number of processes goes through a universal checkpoint (ZeRO >= 1 or pipeline)
        assert r["universal"] == (src[0] != dst[0]), (cell, r)
