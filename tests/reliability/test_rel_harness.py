"""The suite's own checks can fail: expect_clean_error catches a modified buffer, file or module,
a missing word in the message and a wrong exception type (otherwise every case above proves
nothing)."""

from __future__ import annotations

import numpy as np
import pytest
from reliability_helpers import expect_clean_error

from bnlab import nn

FAMILY = "harness self-checks"


def _raise_after(mutate):
    def fn():
        mutate()
        raise ValueError("x must be positive")

    return fn


def test_detects_a_modified_array():
    a = np.zeros(3)
    with pytest.raises(AssertionError, match="modified"):
        expect_clean_error(_raise_after(lambda: a.__setitem__(1, 1e-300)), ValueError, ["x"], [a])


def test_detects_a_modified_module_buffer_and_mode():
    m = nn.BatchNorm2d(2)
    with pytest.raises(AssertionError, match="modified"):
        expect_clean_error(_raise_after(lambda: m.num_batches_tracked.__iadd__(1)), ValueError,
                           ["x"], [m])  # fmt: skip
    with pytest.raises(AssertionError, match="modified"):
        expect_clean_error(_raise_after(m.eval), ValueError, ["x"], [m])


def test_detects_a_modified_or_new_file(tmp_path):
    f = tmp_path / "ckpt"
    f.write_bytes(b"old")
    with pytest.raises(AssertionError, match="modified"):
        expect_clean_error(_raise_after(lambda: f.write_bytes(b"new")), ValueError, ["x"], [f])
    with pytest.raises(AssertionError, match="modified"):
        expect_clean_error(_raise_after(lambda: (tmp_path / ".tmp").write_bytes(b"")), ValueError,
                           ["x"], [tmp_path])  # fmt: skip


def test_detects_a_vague_message_and_a_wrong_type():
    with pytest.raises(AssertionError, match="does not mention"):
        expect_clean_error(_raise_after(lambda: None), ValueError, ["eps"])
    with pytest.raises(ValueError):  # a ValueError where a TypeError is documented propagates
        expect_clean_error(_raise_after(lambda: None), TypeError, ["x"])
