"""Fixtures of tests/functional: the batch-norm backend under test (torch runs on one thread
through the autouse fixture of tests/conftest.py)."""

from __future__ import annotations

import pytest
from fn_support import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each batch-norm backend available here (``numpy`` always, ``numba`` with the kernels)."""
    return request.param
