"""The normalization checks of cs231n's BatchNormalization.ipynb and ConvolutionalNetworks.ipynb
(2021), cell by cell, with the notebooks' seeds, sizes and printed tolerances (written here from
the public notebooks, run on a ``norm`` namespace of cs231n's layer functions).

Each cell returns rows ``Check(cell, check, value, tolerance, stated)``: ``tolerance`` is the
bound asserted by tests/clients (the notebook's upper bound where it prints one), ``stated`` what
the notebook says. benchmarks/bench_clients.py prints the same rows as the closing table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cs231n_textbook as textbook
import numpy as np
from cs231n_harness import (
    FullyConnectedNet,
    eval_numerical_gradient,
    eval_numerical_gradient_array,
    rel_error,
)

BN_NB, CONV_NB = "BatchNormalization.ipynb", "ConvolutionalNetworks.ipynb"


@dataclass
class Check:
    cell: str
    check: str
    value: float
    tolerance: float | None  # None: informational, nothing asserted
    stated: str

    @property
    def ok(self) -> bool:
        return self.tolerance is None or self.value <= self.tolerance


def _deviation(a, b) -> float:
    """max |a − b| / max(1, max |b|): the notebooks' rel_error divides by |a| + |b| elementwise,
    which is noise for outputs near 0; this is the measure for "same as the textbook"."""
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _two_layer_activations(n, d1, d2, d3):
    """cells 5/6/30: a = relu(X·W1)·W2 with X (n, d1), in the notebooks' draw order."""
    X = np.random.randn(n, d1)
    W1, W2 = np.random.randn(d1, d2), np.random.randn(d2, d3)
    return np.maximum(0, X.dot(W1)).dot(W2)


def _moment_rows(cell, out, gamma, beta, axis, stated, what=""):
    """max abs(mean − β) and max abs(std − γ)/γ of out over ``axis``."""
    mean_err = float(np.max(np.abs(out.mean(axis=axis) - beta)))
    std_err = float(np.max(np.abs(out.std(axis=axis) - gamma) / gamma))
    return [
        Check(cell, f"max abs(mean − β){what}", mean_err, 1e-10, stated),
        Check(cell, f"max abs(std − γ)/γ{what}", std_err, 1e-6, stated),
    ]


def _gradient_cell(cell, ours, theirs, tol, stated):
    """Rows of a numeric gradient check: the notebook's relative errors of dx, dγ, dβ with bnlab's
    layers (``ours()``), asserted ≤ the notebook's upper bound or 2x what the textbook layers give
    on the same cell (``theirs()``), whichever is larger: finite differences turn each forward's
    rounding (~1e-15) into noise of this size on the small gradient entries."""
    rows = []
    for name, o, t in zip(("dx", "dgamma", "dbeta"), ours(), theirs(), strict=True):
        bound = max(tol, 2 * t)
        rows.append(Check(cell, f"{name} error", o, bound, f"{stated}; textbook layers {t:.2g}"))
    return rows


def _errors(grads, numeric):
    return [float(rel_error(num, g)) for g, num in zip(grads, numeric, strict=True)]


# --------------------------------------------------------------------------- BatchNormalization


def bn_forward_train(norm):
    """cell 5: training-time means and stds, γ=1/β=0 and γ=[1,2,3], β=[11,12,13]."""
    np.random.seed(231)
    a = _two_layer_activations(200, 50, 60, 3)
    rows = []
    for gamma, beta, what in (
        (np.ones(3), np.zeros(3), " (γ=1, β=0)"),
        (np.asarray([1.0, 2.0, 3.0]), np.asarray([11.0, 12.0, 13.0]), ""),
    ):
        out, _ = norm.batchnorm_forward(a, gamma, beta, {"mode": "train"})
        rows += _moment_rows(
            f"{BN_NB} [5]",
            out,
            gamma,
            beta,
            0,
            "means close to β, stds close to γ (no number)",
            what,
        )
    return rows


def _warm_up_then_test(forward, shape_fn, gamma, beta, steps=50):
    bn_param = {"mode": "train"}
    for _ in range(steps):
        forward(shape_fn(), gamma, beta, bn_param)
    bn_param["mode"] = "test"
    out, _ = forward(shape_fn(), gamma, beta, bn_param)
    return out, bn_param


def bn_forward_test(norm):
    """cell 6: 50 training passes warm up the running averages, then a test-time pass."""
    np.random.seed(231)
    W1, W2 = np.random.randn(50, 60), np.random.randn(60, 3)
    state = np.random.get_state()

    def batch():
        return np.maximum(0, np.random.randn(200, 50).dot(W1)).dot(W2)

    outs = []
    for layers in (norm, textbook):
        np.random.set_state(state)
        outs.append(_warm_up_then_test(layers.batchnorm_forward, batch, np.ones(3), np.zeros(3)))
    return _test_time_rows(f"{BN_NB} [6]", outs, (0,))


def _test_time_rows(cell, outs, axes):
    (out, ours), (ref, theirs) = outs
    stated = "means close to 0, stds close to 1, noisier than training (no number)"
    return [
        Check(
            cell, "test-time max abs(mean)", float(np.abs(out.mean(axis=axes)).max()), None, stated
        ),
        Check(
            cell,
            "test-time max abs(std − 1)",
            float(np.abs(out.std(axis=axes) - 1).max()),
            None,
            stated,
        ),
        Check(
            cell,
            "running_mean: max abs(Δ) vs textbook",
            _deviation(ours["running_mean"], theirs["running_mean"]),
            1e-12,
            "running averages (no number)",
        ),
        Check(
            cell,
            "running_var: max abs(Δ) vs textbook",
            _deviation(ours["running_var"], theirs["running_var"]),
            1e-12,
            "running averages (no number)",
        ),
        Check(
            cell,
            "test-time output: max abs(Δ) vs textbook",
            _deviation(out, ref),
            1e-12,
            "(no number)",
        ),
    ]


def _bn_errors(layers):
    np.random.seed(231)
    N, D = 4, 5
    x = 5 * np.random.randn(N, D) + 12
    gamma, beta, dout = np.random.randn(D), np.random.randn(D), np.random.randn(N, D)
    bn_param = {"mode": "train"}
    fwd = layers.batchnorm_forward
    numeric = [
        eval_numerical_gradient_array(lambda x: fwd(x, gamma, beta, bn_param)[0], x, dout),
        eval_numerical_gradient_array(lambda a: fwd(x, a, beta, bn_param)[0], gamma.copy(), dout),
        eval_numerical_gradient_array(lambda b: fwd(x, gamma, b, bn_param)[0], beta.copy(), dout),
    ]
    _, cache = fwd(x, gamma, beta, bn_param)
    return _errors(layers.batchnorm_backward(dout, cache), numeric)


def bn_backward(norm):
    """cell 8: numeric gradient check of batchnorm_backward."""
    return _gradient_cell(
        f"{BN_NB} [8]",
        lambda: _bn_errors(norm),
        lambda: _bn_errors(textbook),
        1e-8,
        "between 1e-13 and 1e-8",
    )


def bn_backward_alt(norm):
    """cell 12: the graph and the closed-form backward agree (N, D = 100, 500)."""
    np.random.seed(231)
    N, D = 100, 500
    x = 5 * np.random.randn(N, D) + 12
    gamma, beta, dout = np.random.randn(D), np.random.randn(D), np.random.randn(N, D)
    _, cache = norm.batchnorm_forward(x, gamma, beta, {"mode": "train"})
    t1 = time.perf_counter()
    g1 = norm.batchnorm_backward(dout, cache)
    t2 = time.perf_counter()
    g2 = norm.batchnorm_backward_alt(dout, cache)
    t3 = time.perf_counter()
    stated = "nearly identical (no number)"
    rows = [
        Check(f"{BN_NB} [12]", f"{n} difference", float(rel_error(a, b)), 1e-10, stated)
        for a, b, n in zip(g1, g2, ("dx", "dgamma", "dbeta"), strict=True)
    ]
    speedup = (t2 - t1) / max(t3 - t2, 1e-9)
    rows.append(Check(f"{BN_NB} [12]", "speedup (first call)", speedup, None, "a bit faster"))
    return rows


# cs231n's stated bounds for the FullyConnectedNet check, by parameter name prefix
_FC_TOLERANCES = {"W": 1e-4, "b": 1e-8, "beta": 1e-8, "gamma": 1e-8}
_FC_STATED = {"W": "1e-4 to 1e-10", "b": "1e-8 to 1e-10", "beta": "1e-8 to 1e-9", "gamma": "same"}


def _fc_errors(norm):
    """{(reg, name): error} of the cell-14 gradient check (one seed, both regs in turn, as the
    notebook draws them); b1, b2 (their true gradient is 0: a batch norm follows) by absolute
    error, the rest by the notebook's relative error."""
    np.random.seed(231)
    N, D, H1, H2, C = 2, 15, 20, 30, 10
    X, y = np.random.randn(N, D), np.random.randint(C, size=(N,))
    errors = {}
    for reg in (0, 3.14):
        model = FullyConnectedNet(
            [H1, H2], norm, input_dim=D, num_classes=C, reg=reg, weight_scale=5e-2,
            dtype=np.float64, normalization="batchnorm",
        )  # fmt: skip
        _, grads = model.loss(X, y)
        for name in sorted(grads):
            num = eval_numerical_gradient(lambda _, m=model: m.loss(X, y)[0], model.params[name])
            if name in ("b1", "b2"):
                errors[reg, name] = float(np.max(np.abs(num - grads[name])))
            else:
                errors[reg, name] = float(rel_error(num, grads[name]))
    return errors


def fc_batchnorm_gradcheck(norm):
    """cell 14: FullyConnectedNet with batch norm, gradient check at reg 0 and 3.14.

    b1 and b2 feed a batch norm, which removes any constant: their true gradient is 0 and the
    relative error compares two roundings of 0 (the notebook's own output shows b1 at 8.6e-6), so
    they are checked by absolute error (1e-8). The errors depend on the net and the finite
    differences more than on the layers: the asserted bound is the stated one or 2x what the
    textbook layers give on the same cell, whichever is larger (W1 at reg 0: 1.1e-4 with either,
    as in the notebook's published output)."""
    ours, theirs = _fc_errors(norm), _fc_errors(textbook)
    rows = []
    for (reg, name), err in ours.items():
        prefix = name.rstrip("0123456789")
        kind = "abs error (true gradient 0)" if name in ("b1", "b2") else "relative error"
        bound = max(_FC_TOLERANCES[prefix], 2 * theirs[reg, name])
        stated = f"{_FC_STATED[prefix]}; textbook layers {theirs[reg, name]:.2g}"
        rows.append(Check(f"{BN_NB} [14] reg={reg}", f"{name} {kind}", err, bound, stated))
    return rows


def ln_forward(norm):
    """cell 30: layer norm means and stds per sample (N=4)."""
    np.random.seed(231)
    a = _two_layer_activations(4, 50, 60, 3)
    rows = []
    for gamma, beta in ((np.ones(3), np.zeros(3)), (np.asarray([3.0] * 3), np.asarray([5.0] * 3))):
        out, _ = norm.layernorm_forward(a, gamma, beta, {"mode": "train"})
        rows += _moment_rows(
            f"{BN_NB} [30]",
            out,
            gamma[0],
            beta[0],
            1,
            "means close to β, stds close to γ (no number)",
            f" (γ={gamma[0]:g}, β={beta[0]:g})",
        )
    return rows


def _ln_errors(forward, backward):
    np.random.seed(231)
    N, D = 4, 5
    x = 5 * np.random.randn(N, D) + 12
    gamma, beta, dout = np.random.randn(D), np.random.randn(D), np.random.randn(N, D)
    ln_param = {}
    numeric = [
        eval_numerical_gradient_array(lambda x: forward(x, gamma, beta, ln_param)[0], x, dout),
        eval_numerical_gradient_array(
            lambda a: forward(x, a, beta, ln_param)[0], gamma.copy(), dout
        ),
        eval_numerical_gradient_array(
            lambda b: forward(x, gamma, b, ln_param)[0], beta.copy(), dout
        ),
    ]
    _, cache = forward(x, gamma, beta, ln_param)
    return _errors(backward(dout, cache), numeric)


def _textbook_ln_errors():
    return _ln_errors(textbook.layernorm_forward, textbook.layernorm_backward)


def ln_backward(norm):
    """cell 31: numeric gradient check of layernorm_backward."""
    return _gradient_cell(
        f"{BN_NB} [31]",
        lambda: _ln_errors(norm.layernorm_forward, norm.layernorm_backward),
        _textbook_ln_errors,
        1e-8,
        "between 1e-12 and 1e-8",
    )


def ln_backward_via_transposed_batchnorm(norm):
    """cell 31 with the common student layer norm: batch norm of x.T."""

    def forward(x, gamma, beta, ln_param):
        ln_param["mode"], ln_param["layernorm"] = "train", 1
        out, cache = norm.batchnorm_forward(
            x.T, gamma.reshape(-1, 1), beta.reshape(-1, 1), ln_param
        )
        return out.T, cache

    def backward(dout, cache):
        dx, dgamma, dbeta = norm.batchnorm_backward_alt(dout.T, cache)
        return dx.T, dgamma, dbeta

    return _gradient_cell(
        f"{BN_NB} [31] via batchnorm_forward(x.T)",
        lambda: _ln_errors(forward, backward),
        _textbook_ln_errors,
        1e-8,
        "between 1e-12 and 1e-8",
    )


# --------------------------------------------------------------------------- ConvolutionalNetworks


def sbn_forward_train(norm):
    """cell 41: spatial batch norm means/stds; the second pass has integer γ, β."""
    np.random.seed(231)
    x = 4 * np.random.randn(2, 3, 4, 5) + 10
    rows = []
    for gamma, beta, what in (
        (np.ones(3), np.zeros(3), " (γ=1, β=0)"),
        (np.asarray([3, 4, 5]), np.asarray([6, 7, 8]), " (integer γ, β)"),
    ):
        out, _ = norm.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
        rows += _moment_rows(
            f"{CONV_NB} [41]",
            out,
            gamma,
            beta,
            (0, 2, 3),
            "means close to β, stds close to γ (no number)",
            what,
        )
    return rows


def sbn_forward_test(norm):
    """cell 42: 50 warm-up training passes, then a test-time pass (N, C, H, W = 10, 4, 11, 12)."""
    np.random.seed(231)
    state = np.random.get_state()

    def batch():
        return 2.3 * np.random.randn(10, 4, 11, 12) + 13

    outs = []
    for layers in (norm, textbook):
        np.random.set_state(state)
        outs.append(
            _warm_up_then_test(layers.spatial_batchnorm_forward, batch, np.ones(4), np.zeros(4))
        )
    return _test_time_rows(f"{CONV_NB} [42]", outs, (0, 2, 3))


def _sbn_errors(layers):
    np.random.seed(231)
    N, C, H, W = 2, 3, 4, 5
    x = 5 * np.random.randn(N, C, H, W) + 12
    gamma, beta, dout = np.random.randn(C), np.random.randn(C), np.random.randn(N, C, H, W)
    bn_param = {"mode": "train"}

    def f(_):
        return layers.spatial_batchnorm_forward(x, gamma, beta, bn_param)[0]

    numeric = [eval_numerical_gradient_array(f, p, dout) for p in (x, gamma, beta)]
    _, cache = layers.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    return _errors(layers.spatial_batchnorm_backward(dout, cache), numeric)


def sbn_backward(norm):
    """cell 44: numeric gradient check of spatial_batchnorm_backward (as the notebook writes it,
    fg/fb ignore their argument: the checker perturbs gamma and beta in place)."""
    return _gradient_cell(
        f"{CONV_NB} [44]",
        lambda: _sbn_errors(norm),
        lambda: _sbn_errors(textbook),
        1e-6,
        "between 1e-12 and 1e-06",
    )


def gn_forward(norm):
    """cell 47: group norm (G=2) means/stds per (sample, group)."""
    np.random.seed(231)
    N, C, H, W, G = 2, 6, 4, 5, 2
    x = 4 * np.random.randn(N, C, H, W) + 10
    gamma, beta = np.ones((1, C, 1, 1)), np.zeros((1, C, 1, 1))
    out, _ = norm.spatial_groupnorm_forward(x, gamma, beta, G, {"mode": "train"})
    out_g = out.reshape((N * G, -1))
    stated = "means close to 0, stds close to 1 (no number)"
    return [
        Check(
            f"{CONV_NB} [47]",
            "output shape differs from x (0: no)",
            float(out.shape != x.shape),
            0,
            "(2, 6, 4, 5)",
        ),
        Check(
            f"{CONV_NB} [47]",
            "max abs(mean)",
            float(np.abs(out_g.mean(axis=1)).max()),
            1e-10,
            stated,
        ),
        Check(
            f"{CONV_NB} [47]",
            "max abs(std − 1)",
            float(np.abs(out_g.std(axis=1) - 1).max()),
            1e-6,
            stated,
        ),
    ]


def _gn_errors(layers):
    np.random.seed(231)
    N, C, H, W, G = 2, 6, 4, 5, 2
    x = 5 * np.random.randn(N, C, H, W) + 12
    gamma, beta = np.random.randn(1, C, 1, 1), np.random.randn(1, C, 1, 1)
    dout = np.random.randn(N, C, H, W)
    gn_param = {}

    def f(_):
        return layers.spatial_groupnorm_forward(x, gamma, beta, G, gn_param)[0]

    numeric = [eval_numerical_gradient_array(f, p, dout) for p in (x, gamma, beta)]
    _, cache = layers.spatial_groupnorm_forward(x, gamma, beta, G, gn_param)
    return _errors(layers.spatial_groupnorm_backward(dout, cache), numeric)


def gn_backward(norm):
    """cell 49: numeric gradient check of spatial_groupnorm_backward, γ, β of shape (1, C, 1, 1)."""
    return _gradient_cell(
        f"{CONV_NB} [49]",
        lambda: _gn_errors(norm),
        lambda: _gn_errors(textbook),
        1e-7,
        "between 1e-12 and 1e-07",
    )


CELLS = [
    bn_forward_train,
    bn_forward_test,
    bn_backward,
    bn_backward_alt,
    fc_batchnorm_gradcheck,
    ln_forward,
    ln_backward,
    ln_backward_via_transposed_batchnorm,
    sbn_forward_train,
    sbn_forward_test,
    sbn_backward,
    gn_forward,
    gn_backward,
]
