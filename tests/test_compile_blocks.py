"""Compiled blocks without graph breaks (issue 30 item 2), on CPU with inductor: for CD, ND (full,
mixed_heads, mixed_layers) and ED, with the T5 bias and with RoPE (bench/compile_check.VARIANTS),
torch._dynamo counts zero graph breaks and no recompiles over 3 batches of different packing,
in the CPU training path (SDPA, forward + backward, loss equal to eager) and through flex
attention (forward; flex's compiled wrapper on as on CUDA; logits equal to the reference
attention for every block mask and score_mod). `python -m bench compile-check` prints the same
counts. The graphs expected: one per stack kind and mask direction (mixed_layers under flex: the
forward and backward directions are two mask functions; under SDPA only the mask's values).
tests/test_fastpaths.py holds compiled = eager gradients and the trainer run compiled."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.compile_check import MODES, VARIANTS, check_variant, main  # noqa: E402


def _graphs(name: str, mode: str) -> int:
    if name.startswith("ed"):
        return 2  # encoder block, decoder block
    return 2 if (name == "nd-mixed_layers" and mode == "flex") else 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiled_blocks_have_no_graph_breaks_and_no_recompiles(name, mode):
    r = check_variant(name, mode)
    assert r["breaks"] == 0, r["break_reasons"]
    assert r["recompiles"] == 0  # batches 2 and 3 (other packing, other prefixes) reuse the graphs
    # before the fix in model_zoo.blocks._flex, the flex mode compiled one graph more per stack (a
    # guard on the compiled wrapper's global) and recompiled mixed_layers on the second batch
    assert r["graphs"] == _graphs(name, mode)
    assert r["ok"], f"compiled differs from the reference by {r['max_err']:.2e}"


def test_compile_check_command_refuses_unknown_variants(capsys):
    assert main(["--variants", "cd-t5bias,xx"]) == 2
    assert "unknown variant(s) or mode(s) ['xx']" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_check_command_prints_the_counts(capsys):
    assert main(["--variants", "nd-full", "--modes", "train"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("nd-full"))
    assert line.split()[1:5] == ["train", "1", "0", "0"]  # mode, graphs, breaks, recompiles
    assert "0 of 1 variant(s) with graph breaks" in out
