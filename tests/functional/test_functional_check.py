"""``bnlab check``: passes on the real implementations, fails (exit 1) on a broken one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bnlab import check
from bnlab import functional as F
from bnlab.cli import main


def test_check_passes_and_covers_every_op_and_layout():
    rows = check.run_checks(seed=3, use_numba=False)
    assert {(r.op, r.layout) for r in rows} == {
        (o, lay) for o in check.OPS for lay in check.LAYOUTS
    }
    assert [r for r in rows if r.failures()] == []
    for r in rows:
        assert r.errors["numeric"] is not None
        assert r.errors["float32"] is not None and r.errors["float16"] is not None
        assert (r.errors["graph"] is not None) == (r.op == "batch_norm[train]")
    table = check.format_table(rows)
    assert table.count("\n") == len(rows) + 1
    assert "FAIL" not in table


def _wrong_backward(dout, cache):
    """A plausible bug: the mean(dx̂·x̂) term dropped from batch norm's training dx."""
    dx, dgamma, dbeta = F.batch_norm_backward(dout, cache)
    lay = cache.layout
    xhat = F.batch_norm_forward(cache.x, None, None, training=True, layout=lay.name)[0]
    d = dout * lay.per_channel(cache.gamma)
    term = (d * xhat).mean(axis=lay.reduce_axes, keepdims=True) * xhat
    return dx + lay.per_channel(cache.rstd) * term, dgamma, dbeta


def test_check_detects_a_wrong_backward(monkeypatch, capsys):
    broken = dataclasses.replace(check.OPS["batch_norm[train]"], backward=_wrong_backward)
    monkeypatch.setitem(check.OPS, "batch_norm[train]", broken)
    rows = check.run_checks(seed=0, use_torch=False, use_numba=False)
    failed = {(r.op, tuple(r.failures())) for r in rows if r.failures()}
    assert {op for op, _ in failed} == {"batch_norm[train]"}
    assert all("numeric" in f and "graph" in f for _, f in failed)
    assert main(["check", "--no-torch", "--no-numba"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_cli_check_exit_zero(capsys):
    assert main(["check", "--seed", "1", "--no-torch", "--no-numba"]) == 0
    out = capsys.readouterr().out
    assert "| batch_norm[train] | NHWC |" in out and "0 failed" in out
    assert "not run: torch, numba" in out


def test_rel_error_and_tolerances():
    assert check.rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == pytest.approx(0.2)
    assert check.rel_error(np.array([1e-13]), np.array([0.0])) == pytest.approx(1e-13)
    with pytest.raises(ValueError, match="cannot compare shapes"):
        check.rel_error(np.zeros(2), np.zeros(3))
    t16, t32, t64 = (check.dtype_tolerance(d) for d in (np.float16, np.float32, np.float64))
    assert t64 < t32 < t16
    assert check.dtype_tolerance(np.float32, 1e4) > 100 * check.dtype_tolerance(np.float32)
