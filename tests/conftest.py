"""Shared test configuration.

Hypothesis profiles: ``dev`` (default) and ``ci`` (selected when CI=true). Both disable the
per-example deadline: the machine is shared and noisy, and tests never assert on time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "dev")

IN_CI = os.environ.get("CI") == "true"


@pytest.fixture
def rng():
    """A seeded generator: failures reproduce."""
    return np.random.default_rng(1234)


def require_fashion_mnist() -> Path:
    """The Fashion-MNIST folder; a skip on a dev machine without it, a *failure* under CI=true."""
    from bnlab.data import find_fashion_mnist  # noqa: PLC0415

    try:
        return find_fashion_mnist()
    except FileNotFoundError as err:
        if IN_CI:
            pytest.fail(f"CI=true but the real Fashion-MNIST data is missing: {err}")
        pytest.skip(f"Fashion-MNIST not installed: {err}")


@pytest.fixture
def fashion_mnist_dir() -> Path:
    return require_fashion_mnist()
