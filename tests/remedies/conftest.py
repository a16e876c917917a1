"""The remedies tests check the math on the NumPy reference backend; the numba kernels are
checked against it by the dedicated ``test_numba_backend_matches_reference`` tests, which pass
``backend="numba"`` explicitly. (Also keeps numba's first-call compilation out of this folder's
time budget.)"""

from __future__ import annotations

import pytest

import bnlab


@pytest.fixture(autouse=True)
def numpy_backend():
    previous = bnlab.get_backend()
    bnlab.set_backend("numpy")
    yield
    bnlab.set_backend(previous)
