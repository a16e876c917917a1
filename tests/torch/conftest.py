"""Fixtures of the bnlab.torch tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """torch and numba on one thread for the duration of a test (restored after).

    The small training runs here are dominated by per-call thread wake-ups on a shared 2-core
    machine; one thread makes them several times faster and does not change any result checked.
    """
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    numba = None
    try:
        import numba
    except ImportError:
        pass
    numba_before = numba.get_num_threads() if numba else None
    torch.set_num_threads(1)
    if numba:
        numba.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if numba:
        numba.set_num_threads(numba_before)
