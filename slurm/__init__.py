"""Slurm launchers: render thin sbatch scripts, submit runs, sweeps (job arrays) and chains,
and report status from run directories and the scheduler. Light on purpose: no torch, no
model_zoo, no deepspeed; `python -m slurm submit ...` runs on a login node in a fraction of a second.

The local single-node cluster for development and tests: `bash slurm/local_cluster.sh start`.
"""
from .cluster import SlurmError
from .render import FINISHED, RUN_DIR_KEY, Resources, render_array, render_job, trainer_command
from .status import RunStatus, format_status, status
from .submit import Stage, Submission, Sweep, load_chain, submit, submit_chain, submit_sweep

__all__ = ["FINISHED", "RUN_DIR_KEY", "Resources", "RunStatus", "SlurmError", "Stage", "Submission",
           "Sweep", "format_status", "load_chain", "render_array", "render_job", "status", "submit",
           "submit_chain", "submit_sweep", "trainer_command"]
