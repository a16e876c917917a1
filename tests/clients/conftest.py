"""Fixtures of tests/clients: the real Fashion-MNIST, checked once per session."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def fashion_mnist_session():
    """Fashion-MNIST's folder: a skip on a dev machine without it, a failure under CI=true (the
    rule of tests/conftest.py's ``require_fashion_mnist``, for module-scoped data fixtures)."""
    from bnlab.data import find_fashion_mnist

    try:
        return find_fashion_mnist()
    except FileNotFoundError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the real Fashion-MNIST data is missing: {err}")
        pytest.skip(f"Fashion-MNIST not installed: {err}")
