"""Shared test configuration.

Hypothesis profiles: ``dev`` (default) and ``ci`` (selected when CI=true). Both disable the
per-example deadline: the machine is shared and noisy, and tests never assert on time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# torch (OpenMP) and numba both keep worker threads; spinning idle workers of one steal the two
# cores from the other, making interleaved calls up to 100x slower. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


@pytest.fixture(autouse=True)
def _torch_single_thread():
    """Tests use tiny tensors: torch's second thread only adds synchronisation (100x slower on a
    shared 2-core machine). Restored after each test."""
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


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(size="64k", read_only=False) -> Path``: a fresh tmpfs of that size mounted under
    tmp_path (a real ENOSPC / EROFS, which root's permissions cannot bypass). Needs root (CI runs
    as root); unmounted after the test."""
    import subprocess

    mounts = []

    def make(size: str = "64k", read_only: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounts)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True
        )
        if done.returncode != 0:
            if IN_CI:
                pytest.fail(f"CI=true but tmpfs cannot be mounted: {done.stderr.decode()}")
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode()}")
        mounts.append(point)
        return point

    yield make
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
