"""The compiled running-statistics update (numba backend) against the NumPy one: the same bits in
every buffer/statistics dtype, convention and momentum, and the same refusal of an update that
does not fit the buffers' dtype."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.conventions import PRESETS, get_convention
from bnlab.errors import NonFiniteBatchWarning, NonFiniteError
from bnlab.functional.running import update_running_stats
from bnlab.kernels.running import blend_running

FLOATS = (np.float32, np.float64)


def _update(case, blend):
    rng = np.random.default_rng(case["seed"])
    c = case["c"]
    rm = rng.standard_normal(c).astype(case["buf"])
    rv = (0.5 + rng.random(c)).astype(case["buf"])
    mean = (case["scale"] * rng.standard_normal(c)).astype(case["stat"])
    var = (case["scale"] ** 2 * rng.random(c)).astype(case["stat"])
    tracked = np.array(case["tracked"])
    wrote = update_running_stats(
        rm, rv, mean, var, case["count"], case["momentum"], get_convention(case["conv"]),
        tracked, blend=blend,
    )  # fmt: skip
    return wrote, rm, rv, tracked


@settings(max_examples=300, deadline=None)
@given(
    case=st.fixed_dictionaries(
        {
            "c": st.integers(1, 40),
            "buf": st.sampled_from(FLOATS),
            "stat": st.sampled_from(FLOATS),
            "conv": st.sampled_from(sorted(PRESETS)),
            "momentum": st.one_of(st.none(), st.floats(0.0, 1.0)),
            "count": st.integers(2, 10**6),
            "tracked": st.integers(0, 50),
            "scale": st.sampled_from([1e-3, 1.0, 1e3]),
            "seed": st.integers(0, 2**32 - 1),
        }
    )
)
def test_compiled_update_equals_numpy_bit_for_bit(case):
    expected = _update(case, None)
    got = _update(case, blend_running)
    assert got[0] is expected[0] is True
    for g, e in zip(got[1:], expected[1:], strict=True):
        assert g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)


def test_float16_buffers_are_left_to_numpy():
    half, stats = np.zeros(3, np.float16), np.zeros(3, np.float32)
    assert blend_running(half, half.copy(), stats, stats, 0.1, 4, True) is None


@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_update_that_overflows_float32_buffers_is_refused_untouched(policy):
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    var = np.array([1.0, 1e39, 2.0])  # finite in float64, not in a float32 buffer
    tracked = np.array(7)
    conv = get_convention("pytorch")
    args = (rm, rv, np.zeros(3), var, 10, 0.5, conv, tracked, policy)
    if policy == "raise":
        with pytest.raises(NonFiniteError, match="overflows the buffers' dtype"):
            update_running_stats(*args, blend=blend_running)
    else:
        with pytest.warns(
            NonFiniteBatchWarning, match="new running_var up to 5.556e\\+38 does not fit float32"
        ):
            assert update_running_stats(*args, blend=blend_running) is False
    assert np.all(rm == 0) and np.all(rv == 1) and int(tracked) == 7


@pytest.mark.parametrize("buffer", ["running_mean", "running_var"])
def test_buffer_already_non_finite_is_named_not_called_an_overflow(buffer):
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    (rm if buffer == "running_mean" else rv)[1] = np.inf
    before = rm.copy(), rv.copy()
    args = (rm, rv, np.zeros(3), np.ones(3), 10, 0.5, get_convention("pytorch"), None, "raise")
    with pytest.raises(NonFiniteError, match=f"{buffer} already holds NaN or Inf"):
        update_running_stats(*args, blend=blend_running)
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])
