"""Evaluation: `archscale eval` (evaluate.py: held-out loss, rank classification) and the
EleutherAI lm-eval adapter (lm_eval_adapter.py). Empty on purpose (nothing heavy on import)."""
