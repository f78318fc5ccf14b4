"""One engine object (train/engine/engines.py) and one label shift (model_zoo.loss.align_labels).

The trainer and its callbacks hold an `Engine` and never ask which kind (plain or pipelined): a
grep of train/trainer/ keeps it so. The label shift is written once: the model, the pipeline's
last stage and the held-out token count agree on decoder and encoder-decoder batches alike. The
2-process contract (the same calls, the same types, from a plain and a 2-stage pipeline engine)
is tests/test_pipeline.py's `test_plain_and_pipeline_engines_answer_alike`.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import model_zoo
from model_zoo.loss import align_labels, shift_labels

ROOT = Path(__file__).resolve().parents[1]
# what a trainer that asks which engine it holds would write, or one that reaches past the
# Engine's calls into DeepSpeed's (whose calls differ between the kinds)
ENGINE_KIND = re.compile(r"\bpiped\b|is_first_stage|PipelineEngine|PlainEngine|isinstance\([^)]*Engine|\.grid\b|"
                         r"pipeline_(step|eval)\b|\beval_batch\(|train_batch\(data_iter|\.ds\.|"
                         r"engine\.(save|load)_checkpoint\(|get_lr\(|get_global_grad_norm|\beng\.(train_step|eval_loss|"
                         r"grad_norm|initialize)\b")


def test_the_trainer_never_asks_which_engine_it_holds():
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in sorted((ROOT / "train" / "trainer").rglob("*.py"))
            for i, line in enumerate(f.read_text().splitlines(), 1) if ENGINE_KIND.search(line)]
    assert not hits, "\n".join(hits)


def test_the_grep_would_find_a_branch_on_the_engine_kind():
    for line in ("losses = eng.pipeline_step(e, m) if self.piped else eng.train_step(e, m)",
                 "if t.engine.is_first_stage():", "if isinstance(t.engine, PipelineEngine):",
                 "t.engine.ds.save_checkpoint(str(d), tag='engine')", "lr = t.engine.get_lr()[0]"):
        assert ENGINE_KIND.search(line), line
    assert not ENGINE_KIND.search("losses = self.engine.train_batch(micro)")


# ------------------------------------------------------------------------------- the label shift
def test_align_labels_shifts_decoders_and_leaves_encoder_decoders():
    labels = torch.tensor([[-100, 5, 6, 7], [-100, 8, -100, 9]])  # (B, T)
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)  # (B, T, V)
    lg, lb = align_labels(labels, True, logits)
    assert torch.equal(lg, logits[:, :3]) and lb.tolist() == [[5, 6, 7], [8, -100, 9]]  # t predicts t + 1
    none, full = align_labels(labels, True)  # a loss over every position (fused)
    assert none is None and full.tolist() == [[5, 6, 7, -100], [8, -100, 9, -100]]
    assert torch.equal(full, shift_labels(labels))
    assert int((lb != -100).sum()) == int((full != -100).sum()) == 5  # the same targets either way
    lg, lb = align_labels(labels, False, logits)
    assert lg is logits and lb is labels  # T5: labels aligned with the decoder outputs
    assert align_labels(labels, False) == (None, labels)


@pytest.mark.parametrize("arch", ["cd", "ed"])
def test_every_loss_path_counts_the_targets_align_labels_gives(arch):
    """The model's dense loss, its fused loss and the held-out count (engine.runtime.eval_loss)
    shift alike: eval_loss's total / count is the model's mean cross-entropy, with no branch on
    the batch's keys (the model class says whether it shifts)."""
    from train.engine.runtime import eval_loss

    torch.manual_seed(0)
    model = model_zoo.build(arch, "debug")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 500, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    batch = {"input_ids": ids, "labels": labels}
    if arch == "ed":
        batch["decoder_input_ids"] = torch.randint(2, 500, (2, 12), generator=g)
    total, count = eval_loss(model, [batch], torch.device("cpu"))
    want = int((labels[:, 1:] != -100).sum()) if arch == "cd" else int((labels != -100).sum())
    assert count == want and model.shifts_labels == (arch == "cd")
    with torch.no_grad():
        model.eval()
        dense = model(**batch).ce_loss
    torch.testing.assert_close(torch.tensor(total / count), dense.float())
    model.train()
    model.config.loss_impl = "chunked"  # the fused path shifts through the same function
    with torch.no_grad():
        fused = model(**batch)
    assert fused.logits is None
    torch.testing.assert_close(fused.ce_loss, dense, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- missing loss terms
def test_a_term_the_step_does_not_measure_is_none_not_zero():
    """runtime.train_step (the plain engine) reports None for a term the model leaves None, as the
    pipeline engine does for ce_loss and z_loss; a term the model measures stays a float."""
    from types import SimpleNamespace

    from train.engine.runtime import StepLosses, train_step

    class FakeEngine:  # DeepSpeed's calls train_step makes, on a model that reports no z-loss term
        device = torch.device("cpu")
        module = torch.nn.Linear(1, 1)

        def __call__(self, **batch):
            loss = self.module(batch["x"]).sum()
            return SimpleNamespace(loss=loss, ce_loss=loss, z_loss=None)

        def backward(self, loss):
            loss.backward()

        def is_gradient_accumulation_boundary(self):
            return False

        def step(self):
            pass

    got = train_step(FakeEngine(), [{"x": torch.ones(2, 1)}, {"x": torch.ones(2, 1)}])
    assert isinstance(got, StepLosses) and isinstance(got.loss, float) and isinstance(got.ce_loss, float)
    assert got.z_loss is None
