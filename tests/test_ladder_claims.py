"""`archscale ladder --claim NAME` (train/commands/ladder/claims.py): a reproduction's claim judged on
ladders by its own rule, on the fits' predicted differences at the target; the sign of each pair's
measured difference across rungs. Synthetic points with known laws, no training: seconds."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from train.commands.ladder import ChinchillaParams, LadderError, LadderPoint, Target, fit_ladder, judge
from train.commands.ladder import claims
from train.commands.ladder import command as L

SIZES = ["--sizes", "48x2,64x2,80x2", "--budgets", "3,6,12"]


def test_a_claim_gives_the_reproductions_cells_with_their_labels_and_matches(tmp_path):
    _, args = L.parse_args(["--claim", "su-ed-params", "--out", str(tmp_path), *SIZES])
    assert [(c.name, c.match) for c in args.cells] == [("CD:PLM", None), ("ED:PLM (ed-flops)", "flops"),
                                                      ("ED:PLM (ed-params)", "params")]
    _, args = L.parse_args(["--claim", "su-gpt-vs-unilm", "--out", str(tmp_path), *SIZES])
    mixed = args.cells[2]
    assert mixed.name == "ND:PLM (nd-mixed)" and "model.overrides.bidirectional_mode=mixed_heads" in mixed.overrides


@pytest.mark.parametrize("name, words", [
    ("no-such-claim", "is not a claim of archscale reproduce"),
    ("su-low-rank", "is judged on a measurement of the runs"),
])
def test_a_claim_a_ladder_cannot_judge_is_one_line(name, words, capsys, tmp_path):
    assert L.main(["--claim", name, "--out", str(tmp_path / "x"), *SIZES]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "a ladder judges: su-ed-params, su-gpt-vs-unilm" in err
    assert not (tmp_path / "x").exists()


def test_claim_and_cells_together_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        L.parse_args(["--claim", "su-ed-params", "--cells", "cd:flm"])
    assert e.value.code == 2 and "give --claim (the claim's own cells) or --cells, not both" in capsys.readouterr().err


def test_the_target_carries_each_cells_matched_ratio_unless_named(tmp_path):
    _, args = L.parse_args(["--claim", "su-ed-params", "--out", str(tmp_path), *SIZES])
    facts = {"cd-plm": {"non_embedding_params": 100}, "ed-flops": {"non_embedding_params": 210},
             "ed-params": {"non_embedding_params": 98}}
    plans = [SimpleNamespace(facts={k: {"non_embedding_params": 1} for k in facts}), SimpleNamespace(facts=facts)]
    t = L.target_of("N=1e9,D=2e10", args, plans, "su-ed-params")
    assert t.for_cell("CD:PLM") == (1e9, 2e10)
    assert t.for_cell("ED:PLM (ed-flops)") == pytest.approx((2.1e9, 2e10))  # the largest rung's ratio
    assert t.for_cell("ED:PLM (ed-params)") == pytest.approx((0.98e9, 2e10))
    named = L.target_of("N=1e9,D=2e10,N[ED:PLM (ed-flops)]=5e9", args, plans, "su-ed-params")
    assert named.for_cell("ED:PLM (ed-flops)") == (5e9, 2e10) and named.for_cell("ED:PLM (ed-params)")[0] == \
        pytest.approx(0.98e9)


def _points(cell: str, law: ChinchillaParams, shift: dict, seed: int) -> list[LadderPoint]:
    """3 rungs x 3 budgets x 2 seeds of `law`, each rung's loss moved by shift[rung] (nats)."""
    rng = np.random.default_rng(seed)
    out = []
    for r, N in enumerate(np.geomspace(1e6, 1e8, 3)):
        for D in N * np.array([5.0, 20.0, 80.0]):
            for s in range(2):
                loss = float(law.loss(N, D)) * float(np.exp(rng.normal(0.0, 0.002))) + shift.get(f"r{r}", 0.0)
                out.append(LadderPoint(cell, s, f"r{r}", float(N), float(D), 6.0 * N * D, loss))
    return out


def test_the_claims_rule_reads_the_predicted_differences_and_the_signs_across_rungs():
    """su-gpt-vs-unilm built to be reproduced at the target: ND's law is CD's (no gain), the mixed
    ND's E is 0.1 nats lower. Measured at the rungs, ND - CD flips sign at the middle rung (planted),
    so that pair's sign does not hold, while mixed - CD holds."""
    cd = ChinchillaParams(1.8, 400.0, 0.34, 410.0, 0.28)
    mixed = ChinchillaParams(1.7, 400.0, 0.34, 410.0, 0.28)
    pts = (_points("CD:PLM", cd, {}, 0) + _points("ND:PLM", cd, {"r0": 0.01, "r1": -0.01, "r2": 0.01}, 0)
           + _points("ND:PLM (nd-mixed)", mixed, {}, 0))
    ladder = fit_ladder(pts, resamples=60, seed=0, starts=16)
    claim = claims.claim_of("su-gpt-vs-unilm")
    verdict, reasons, signs = claims.judge_claim(claim, judge(ladder, Target(1e10, 2e11)),
                                                 [{**vars(p), "budget": round(p.D / p.N)} for p in pts], ["r0", "r1", "r2"])
    assert verdict == "reproduced", reasons
    (mix_cd,) = [r for r in reasons if r.startswith("ND:PLM (nd-mixed) - CD:PLM = ")]
    assert float(mix_cd.split("= ")[1].split()[0]) == pytest.approx(-0.1, abs=0.005), reasons  # the planted E gap
    by = {(s["a"], s["b"]): s for s in signs}
    nd_cd = by[("CD:PLM", "ND:PLM")]
    assert not nd_cd["holds"] and nd_cd["means"]["r1"] == pytest.approx(0.01, abs=0.005)
    assert nd_cd["n"] == {"r0": 6, "r1": 6, "r2": 6}  # 3 budgets x 2 seeds paired at each rung
    assert by[("CD:PLM", "ND:PLM (nd-mixed)")]["holds"]
    verdicts = judge(ladder, Target(1e10, 2e11))
    section = claims.claim_section(claim, verdict, reasons, signs, ["r0", "r1", "r2"], verdicts)
    assert ("**Caveat:**" in section) == any(d.bounded for d in verdicts.differences)
    assert "**Verdict at the target: reproduced.**" in section and "| CD:PLM - ND:PLM |" in section
    assert "| no |" in section and "| yes |" in section


def test_a_rung_without_a_paired_branch_is_shown_and_the_sign_does_not_hold():
    pts = [{"cell": "A", "rung": "r0", "seed": 0, "budget": 1.0, "loss": 2.0},
           {"cell": "B", "rung": "r0", "seed": 0, "budget": 1.0, "loss": 1.5},
           {"cell": "A", "rung": "r1", "seed": 0, "budget": 1.0, "loss": 2.0}]
    (s,) = claims.rung_signs(pts, ["A", "B"], ["r0", "r1"])
    assert s["means"] == {"r0": 0.5, "r1": None} and not s["holds"]


def test_a_claims_match_reference_must_be_its_first_cell():
    from dataclasses import replace

    claim = replace(claims.claim_of("su-ed-params"), match_to="ed:plm")
    with pytest.raises(LadderError, match="the ladder matches every rung to the first cell"):
        claims.claim_cells(claim)


def test_a_difference_between_fits_on_a_bound_says_so():
    """Points from a law with no irreducible loss (E ~ 0, as tiny CPU ladders give): the fit ends on
    E's lower bound, and each difference that involves it is marked, on the page too."""
    from train.commands.ladder.page import verdict_tables

    flat = ChinchillaParams(1e-9, 4.0, 0.06, 260.0, 0.41)
    pts = _points("CD:PLM", flat, {}, 0) + _points("ND:PLM", flat, {"r2": -0.01}, 1)
    v = judge(fit_ladder(pts, resamples=30, seed=0, starts=16), Target(1e10, 2e11))
    (d,) = v.differences
    assert d.bounded and all(b.endswith("E") or "E," in b for b in d.bounded), d.bounded
    text = "\n".join(verdict_tables(v))
    assert "fit on a bound" in text and "its bootstrap cut at that bound" in text
