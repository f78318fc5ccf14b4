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

import pytest

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
