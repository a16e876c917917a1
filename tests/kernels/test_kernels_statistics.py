"""The compiled finish of the batch statistics (numba backend) against the NumPy bookkeeping it
replaces: the float64 statistics rounded to the accumulation dtype, rstd = 1/sqrt(var + eps) in
that dtype (bnlab.functional.stats.inverse_std) and the finiteness test of
bnlab.functional.running.batch_is_finite: the same bits and the same verdict, including values
that overflow the dtype, NaN and Inf."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.functional.running import batch_is_finite
from bnlab.functional.stats import inverse_std
from bnlab.kernels.batch_norm import statistics as _statistics_in

SPECIAL = [0.0, 1e-45, 3.4e38, 1e39, 1e300, np.inf, -np.inf, np.nan, -0.0]


def _values(draw_floats, special):
    return st.lists(st.one_of(draw_floats, st.sampled_from(special)), min_size=1, max_size=40)


FLOATS = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)
NONNEG = st.floats(allow_nan=False, allow_infinity=False, min_value=0.0, max_value=1e8)


@settings(max_examples=300, deadline=None)
@given(
    mean=_values(FLOATS, SPECIAL),
    var=_values(NONNEG, SPECIAL),
    acc=st.sampled_from([np.float32, np.float64]),
    eps=st.sampled_from([1e-5, 1e-3, 0.1, 1e-12]),
)
def test_compiled_statistics_give_the_bits_of_the_numpy_bookkeeping(mean, var, acc, eps):
    c = min(len(mean), len(var))
    mean64, var64 = np.array(mean[:c], np.float64), np.array(var[:c], np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        want_mean, want_var = mean64.astype(acc), var64.astype(acc)
        want_rstd = inverse_std(want_var, eps)
    got_mean, got_var, got_rstd, finite = _statistics_in(np.dtype(acc), mean64, var64, eps)
    for got, want in ((got_mean, want_mean), (got_var, want_var), (got_rstd, want_rstd)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{got.itemsize}"))
    assert finite is batch_is_finite(want_mean, want_var)


def test_a_variance_that_overflows_float32_is_not_finite():
    """A float64 variance of 1e39 is finite, its float32 rounding is not: the batch must be
    reported (and kept out of the running statistics) like a NaN batch."""
    mean, var, _, finite = _statistics_in(
        np.dtype(np.float32), np.zeros(2), np.array([1.0, 1e39]), 1e-5
    )
    assert not finite and np.isinf(var[1])
    *_, finite64 = _statistics_in(np.dtype(np.float64), np.zeros(2), np.array([1.0, 1e39]), 1e-5)
    assert finite64
