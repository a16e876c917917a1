"""Fixtures of tests/functional: the batch-norm backend under test; torch on one thread."""

from __future__ import annotations

import sys

import pytest
from fn_support import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each batch-norm backend available here (``numpy`` always, ``numba`` with the kernels)."""
    return request.param


@pytest.fixture(autouse=True)
def _torch_single_thread():
    """Run torch on one thread during these tests, then restore the previous setting.

    The tensors here are tiny: torch's second thread brings no speed, only spin-waiting, which
    on a shared loaded machine made a 20-step comparison 100x slower (measured 1.0 s vs 0.01 s
    for 200 calls). Results are unaffected: tensors this small are never split across threads.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
