"""Conventions: the presets as the issue defines them, and the converters checked by simulation.

convert_momentum / convert_running_stats are checked by running the same batches through two
presets and comparing the buffers, not by re-deriving their formulas.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bnlab import functional as F
from bnlab.conventions import (
    PRESETS,
    convert_momentum,
    convert_running_stats,
    get_convention,
    momentum_lookalike,
)

# (momentum weighs the new batch?, default momentum, unbiased running variance?, eps) per preset,
# transcribed from docs/conventions.md; d2l's two versions from its published chapter code
# (release 0.17: momentum * moving + (1.0 - momentum) * mean with 0.9; 1.0: (1.0 - momentum) *
# moving + momentum * mean with 0.1; both average the biased variance)
SPEC = {
    "pytorch": (True, 0.1, True, 1e-5),
    "keras": (False, 0.99, False, 1e-3),
    "flax": (False, 0.99, False, 1e-5),
    "cs231n": (False, 0.9, False, 1e-5),
    "d2l-0.17": (False, 0.9, False, 1e-5),
    "d2l-1.0": (True, 0.1, False, 1e-5),
    "d2l": (False, 0.9, False, 1e-5),  # the name bnlab has always used: d2l-0.17
}


@pytest.mark.parametrize("name", list(SPEC))
def test_presets_match_the_spec(name):
    conv = get_convention(name)
    got = (conv.momentum_weighs_new, conv.momentum, conv.unbiased_running_var, conv.eps)
    assert got == SPEC[name]
    assert set(PRESETS) == set(SPEC)


def test_unknown_convention_is_a_clear_error():
    with pytest.raises(ValueError, match=r"convention must be one of \[.*'pytorch'.*\], got 'tf'"):
        get_convention("tf")


def _simulate(preset, momentum, batches, layout="NCHW", init_var=1.0):
    rm, rv = np.zeros(3), np.full(3, init_var)
    for x in batches:
        F.batch_norm_forward(
            x, None, None, training=True, running_mean=rm, running_var=rv, momentum=momentum,
            convention=preset, layout=layout,
        )  # fmt: skip
    return rm, rv


def _batches(rng, shape=(4, 3, 2, 3), steps=12):
    return [rng.standard_normal(shape) * (1 + t) + t for t in range(steps)]


PAIRS = list(itertools.permutations(SPEC, 2))


@pytest.mark.parametrize("src,dst", PAIRS)
@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 0.99, 1.0])
def test_converted_momentum_and_stats_reproduce_the_other_preset(rng, src, dst, momentum):
    """Train under src with ``momentum``, under dst with the converted momentum: after converting
    src's saved statistics with count = N·H·W, they equal what dst accumulated (dst starting from
    the converted initial value: the conversion is linear and scales that term too)."""
    batches = _batches(rng)
    count = 4 * 2 * 3
    rm_src, rv_src = _simulate(src, momentum, batches)
    init = convert_running_stats(np.zeros(1), np.ones(1), src, dst, count=count)[1][0]
    rm_dst, rv_dst = _simulate(dst, convert_momentum(momentum, src, dst), batches, init_var=init)
    rm_conv, rv_conv = convert_running_stats(rm_src, rv_src, src, dst, count=count)
    np.testing.assert_allclose(rm_conv, rm_dst, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv_conv, rv_dst, rtol=1e-12, atol=1e-12)


def test_d2l_versions_give_the_same_averages_with_their_own_defaults(rng):
    """The example of the d2l trap: one batch of mean ~1.14 from zeros. d2l 1.0 with its 0.1
    gives 0.114; the same 0.1 under the older meaning gives 1.02."""
    batch = [rng.standard_normal((8, 3, 2, 2)) * 0.01 + 1.14]
    rm_new, _ = _simulate("d2l-1.0", 0.1, batch)
    rm_old, _ = _simulate("d2l-0.17", 0.9, batch)
    np.testing.assert_allclose(rm_new, rm_old, rtol=1e-12)
    np.testing.assert_allclose(rm_new, 0.114, atol=2e-3)
    np.testing.assert_allclose(_simulate("d2l", 0.1, batch)[0], 1.026, atol=2e-2)
    assert convert_momentum(0.1, "d2l-1.0", "d2l") == 0.9


@pytest.mark.parametrize(
    "momentum,convention,expected",
    [
        (0.1, "d2l", "d2l-1.0"),
        (0.1, "d2l-0.17", "d2l-1.0"),
        (0.9, "d2l-1.0", "d2l-0.17"),
        (0.9, "d2l", None),
        (0.1, "d2l-1.0", None),
        (0.5, "d2l", None),
        (0.1, "cs231n", None),  # no family: nothing to confuse it with
        ("0.1", "d2l", None),
    ],
)
def test_momentum_lookalike(momentum, convention, expected):
    found = momentum_lookalike(momentum, convention)
    assert (found.name if found else None) == expected


def test_convert_momentum_known_values():
    assert convert_momentum(0.1, "pytorch", "keras") == 0.9
    assert convert_momentum(0.99, "keras", "pytorch") == pytest.approx(0.01, abs=1e-15)
    assert convert_momentum(0.9, "cs231n", "d2l") == 0.9
    assert convert_momentum(0.3, "pytorch", "pytorch") == 0.3


@pytest.mark.parametrize("bad,exc", [(-0.1, ValueError), (1.01, ValueError), ("0.1", TypeError)])
def test_convert_momentum_rejects_bad_values(bad, exc):
    with pytest.raises(exc, match="momentum"):
        convert_momentum(bad, "pytorch", "keras")


def test_convert_running_stats_needs_the_batch_count(rng):
    rm, rv = rng.standard_normal(3), rng.uniform(1, 2, 3)
    with pytest.raises(ValueError, match=r"count is required .* n/\(n-1\)"):
        convert_running_stats(rm, rv, "pytorch", "keras")
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="count must be an int >= 2"):
            convert_running_stats(rm, rv, "keras", "pytorch", count=bad)


def test_convert_running_stats_same_bias_is_a_copy(rng):
    rm, rv = rng.standard_normal(3), rng.uniform(1, 2, 3)
    m2, v2 = convert_running_stats(rm, rv, "keras", "cs231n")
    np.testing.assert_array_equal(m2, rm)
    np.testing.assert_array_equal(v2, rv)
    m2 += 1  # a copy: the caller's arrays are untouched
    np.testing.assert_array_equal(convert_running_stats(rm, rv, "flax", "d2l")[0], rm)
    assert not np.shares_memory(m2, rm)


def test_conversion_is_only_approximate_when_batch_sizes_vary(rng):
    """The documented limit: with varying n the factor n/(n-1) is not one number."""
    batches = [rng.standard_normal((n, 3, 1, 1)) + 1 for n in (2, 3, 2, 5, 2, 8)]
    rm_p, rv_p = _simulate("pytorch", 0.5, batches)
    rm_k, rv_k = _simulate("keras", 0.5, batches)
    _, rv_conv = convert_running_stats(rm_p, rv_p, "pytorch", "keras", count=4)
    np.testing.assert_allclose(rm_p, rm_k, rtol=1e-12)
    assert not np.allclose(rv_conv, rv_k, rtol=1e-6)
