"""Switches that change the suite's numerics but not its behaviour, to find fragile tests (issue 20).
Unset (CI) they change nothing.

    ARCHSCALE_TEST_SEED_SHIFT=1000 python -m pytest -q -m "not slow" tests/test_model_zoo.py ...
    ARCHSCALE_TEST_THREADS=2 python -m pytest ...          # torch threads at the start of each test
    ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 python -m pytest ...   # another CPU's kernels

ARCHSCALE_TEST_SEED_SHIFT=N adds N to every seed a test sets (torch.manual_seed, random.seed,
numpy.random.seed): a test whose assertion depends on the seed it happens to use fails. Golden
tests (tests/golden/) are meant to depend on their seeds. ATEN_CPU_CAPABILITY and
MKL_ENABLE_INSTRUCTIONS are torch's and MKL's own switches (vector width of the kernels).
"""
import os
import random
import shutil
import subprocess

import pytest

from services import CLUSTER_SCRIPT, skip_or_fail

_SHIFT = int(os.environ.get("ARCHSCALE_TEST_SEED_SHIFT", "0"))
_THREADS = int(os.environ.get("ARCHSCALE_TEST_THREADS", "0"))

if _SHIFT:
    import numpy as np
    import torch

    _torch_seed, _random_seed, _np_seed = torch.manual_seed, random.seed, np.random.seed
    torch.manual_seed = lambda seed: _torch_seed(int(seed) + _SHIFT)
    random.seed = lambda seed=None, *a, **k: _random_seed(seed + _SHIFT if isinstance(seed, int) else seed, *a, **k)
    np.random.seed = lambda seed=None: _np_seed(None if seed is None else (int(seed) + _SHIFT) % 2 ** 32)


if _THREADS:
    @pytest.fixture(autouse=True)
    def _archscale_test_threads():
        import torch

        torch.set_num_threads(_THREADS)
        yield


# ------------------------------------------------------------------ services the project installs
@pytest.fixture(scope="session")
def slurm_packages():
    """Slurm, munge, iproute2 and util-linux installed (`slurm/local_cluster.sh install --nodes 2`,
    root and apt-get): the one install step of every test that needs the local Slurm cluster, the
    one-node one (tests/test_slurm.py) and the two-node one (tests/test_multinode.py), whichever
    runs first. Without root or apt-get and with something missing, those tests skip (fail in CI)."""
    tools = ("sbatch", "slurmctld", "slurmd", "munged", "ip", "nsenter", "unshare")
    if all(shutil.which(t) for t in tools):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        skip_or_fail("Slurm, munge or iproute2 is missing and installing it needs root and apt-get "
                     "(bash slurm/local_cluster.sh install --nodes 2)")
    p = subprocess.run(["bash", str(CLUSTER_SCRIPT), "install", "--nodes", "2"], capture_output=True, text=True,
                       timeout=900)
    if p.returncode != 0:
        pytest.fail(f"slurm/local_cluster.sh install --nodes 2 failed:\n{p.stdout}\n{p.stderr}")


@pytest.fixture(scope="session")
def slurm_cluster(slurm_packages):
    """The one-node local cluster, started (and stopped afterwards if this fixture started it;
    ARCHSCALE_SLURM_KEEP=1 leaves it running). SLURM_CONF points the clients at it."""
    was_up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True).returncode == 0
    p = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"slurm/local_cluster.sh start failed:\n{p.stdout}\n{p.stderr}")
    conf = subprocess.run(["bash", str(CLUSTER_SCRIPT), "env"], capture_output=True, text=True).stdout
    os.environ["SLURM_CONF"] = conf.strip().split("=", 1)[1]
    yield
    if not was_up and not os.environ.get("ARCHSCALE_SLURM_KEEP"):
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Debug-size matmuls run faster, and steadier on a shared machine, on one thread (a module's
    tests use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
