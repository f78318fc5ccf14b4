"""What tests that need an installable service (the local Slurm cluster) share with conftest.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

CLUSTER_SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "local_cluster.sh"


def skip_or_fail(reason: str) -> None:
    """Skip a test whose package or service is missing; under CI=true fail it instead: CI installs
    everything the project can install, so a skip there would hide a missing install step."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true, and {reason}")
    pytest.skip(reason)
