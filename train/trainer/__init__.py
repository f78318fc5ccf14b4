"""The trainer: the loop (loop.py), its callbacks, checkpoints (checkpointing.py), the
weight loader (weights.py), held-out batches and the non-finite guard (debug.py).

Kept empty on purpose: slurm/ imports train.trainer.checkpointing on a login node, which
must not import the loop, torch or deepspeed."""
