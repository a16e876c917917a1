"""Self-check of the normalization family: every implementation, every layout, random inputs.

For each operation (batch norm in training and in inference, layer norm, group norm, instance
norm) and each layout, on a small random float64 input with a *random* upstream gradient
(never ones: batch norm's input gradient is then zero and every bug passes), measure:

``graph``    closed-form backward vs the staged computational-graph backward (batch norm train)
``numeric``  every gradient (dx, dgamma, dbeta) vs central differences of  L = Σ dout·f(x)
``torch``    outputs, gradients and running statistics vs ``torch.nn.functional`` + autograd
``numba``    the numba backend vs this NumPy reference, in float32 and float64
``float32``, ``float16``  the same computation from float32 / float16 input vs float64 math on
             the same rounded values, within :func:`dtype_tolerance` (which grows with the
             input's centering condition number κ)

Each error is ``max|a − b| / max(1, max|b|)`` (the largest deviation relative to the largest
reference value, so it means the same for every tensor) and fails when above its tolerance in
:data:`TOLERANCES`. ``bnlab check`` prints the table and exits non-zero on any failure.

:data:`DTYPE_TOLERANCES` (in :mod:`bnlab.tolerances`, re-exported here) is the single place
stating how close a float16/32/64 result must be to the float64 answer; the test suite imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bnlab import functional as F
from bnlab.functional._layout import LAYOUTS, get_layout
from bnlab.tolerances import (
    CONDITION_FACTOR,
    DTYPE_TOLERANCES,
    NUMERIC_STEP,
    TOLERANCES,
    centering_condition,
    dtype_tolerance,
    numeric_gradient,
    rel_error,
)

__all__ = [
    "CHECK_SHAPES",
    "CONDITION_FACTOR",
    "DTYPE_TOLERANCES",
    "GN_GROUPS",
    "NUMERIC_STEP",
    "OPS",
    "TOLERANCES",
    "Op",
    "Problem",
    "Row",
    "centering_condition",
    "check_dtype",
    "check_graph",
    "check_numba",
    "check_numeric",
    "check_torch",
    "dtype_tolerance",
    "format_table",
    "layer_norm_shape",
    "numeric_gradient",
    "rel_error",
    "run_checks",
    "torch_available",
    "torch_reference",
]

# --------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Op:
    """One member of the family, as the checks see it.

    ``forward(x, gamma, beta, layout, **extra) -> (y, cache)``;
    ``backward(dout, cache) -> (dx, dgamma, dbeta)``;
    ``param_shape(x_shape, layout)`` the shape of γ and β.
    """

    name: str
    forward: Callable
    backward: Callable
    param_shape: Callable
    graph_backward: Callable | None = None
    has_buffers: bool = False


def _channel_params(shape, layout):
    return (shape[get_layout(layout).channel_axis],)


def layer_norm_shape(shape, layout) -> tuple[int, ...]:
    """The layer-norm ``normalized_shape`` for a layout: the channel for NC/NLC/NHWC
    (transformer style, channels last), all of (C, *spatial) for channels-first layouts."""
    lay = get_layout(layout)
    if lay.channel_axis == lay.ndim - 1:
        return (shape[-1],)
    return tuple(shape[1:])


def _bn_train(x, g, b, layout, **kw):
    return F.batch_norm_forward(x, g, b, training=True, layout=layout, **kw)


def _bn_eval(x, g, b, layout, running_mean, running_var, **kw):
    return F.batch_norm_forward(
        x, g, b, training=False, running_mean=running_mean, running_var=running_var,
        layout=layout, **kw,
    )  # fmt: skip


def _ln(x, g, b, layout, **kw):
    return F.layer_norm_forward(x, layer_norm_shape(x.shape, layout), g, b, **kw)


GN_GROUPS = 2


def _gn(x, g, b, layout, **kw):
    return F.group_norm_forward(x, GN_GROUPS, g, b, layout=layout, **kw)


def _in(x, g, b, layout, **kw):
    return F.instance_norm_forward(x, g, b, layout=layout, **kw)


OPS: dict[str, Op] = {
    "batch_norm[train]": Op(
        "batch_norm[train]", _bn_train, F.batch_norm_backward, _channel_params,
        graph_backward=F.batch_norm_backward_graph, has_buffers=True,
    ),
    "batch_norm[eval]": Op(
        "batch_norm[eval]", _bn_eval, F.batch_norm_backward, _channel_params, has_buffers=True
    ),
    "layer_norm": Op("layer_norm", _ln, F.layer_norm_backward, layer_norm_shape),
    "group_norm": Op("group_norm", _gn, F.group_norm_backward, _channel_params),
    "instance_norm": Op("instance_norm", _in, F.instance_norm_backward, _channel_params),
}  # fmt: skip

#: Small shapes with odd sizes; C=4 so that group norm has 2 groups of 2 channels.
CHECK_SHAPES: dict[str, tuple[int, ...]] = {
    "NC": (5, 4),
    "NCL": (3, 4, 5),
    "NLC": (3, 5, 4),
    "NCHW": (3, 4, 3, 2),
    "NHWC": (3, 3, 2, 4),
}


# --------------------------------------------------------------------------- one case


@dataclass
class Problem:
    """A random float64 problem: input, parameters, buffers and a random upstream gradient."""

    x: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    dout: np.ndarray

    @classmethod
    def random(cls, op: Op, shape, layout, rng: np.random.Generator) -> Problem:
        c = shape[get_layout(layout).channel_axis]
        pshape = op.param_shape(shape, layout)
        return cls(
            x=rng.standard_normal(shape) * 2.0 + 0.5,
            gamma=rng.standard_normal(pshape) + 1.0,
            beta=rng.standard_normal(pshape),
            running_mean=rng.standard_normal(c) * 0.5,
            running_var=rng.uniform(0.5, 2.0, c),
            dout=rng.standard_normal(shape),
        )

    def rounded(self, dtype) -> Problem:
        """The same problem with every array rounded to ``dtype`` (kept in float64)."""
        return Problem(*(a.astype(dtype).astype(np.float64) for a in dataclasses.astuple(self)))

    def buffers(self, dtype=np.float64) -> dict[str, np.ndarray]:
        return {
            "running_mean": self.running_mean.astype(dtype),
            "running_var": self.running_var.astype(dtype),
        }


def _run(op: Op, p: Problem, layout, dtype=np.float64, backend="numpy"):
    """Forward + backward of ``op`` in ``dtype``; returns (y, dx, dgamma, dbeta, buffers, cache).

    ``backend`` selects the NumPy reference or the numba kernels for every member.
    """
    kw = {"backend": backend}
    buffers = p.buffers(dtype) if op.has_buffers else {}
    x, g, b = (a.astype(dtype) for a in (p.x, p.gamma, p.beta))
    y, cache = op.forward(x, g, b, layout, **buffers, **kw)
    dx, dg, db = op.backward(p.dout.astype(dtype), cache)
    return y, dx, dg, db, buffers, cache


def _max_error(ours, ref) -> float:
    """Largest rel_error over (y, dx, dgamma, dbeta) and the buffers of two :func:`_run` results."""
    errors = [rel_error(a, b) for a, b in zip(ours[:4], ref[:4], strict=True)]
    errors += [rel_error(ours[4][k], ref[4][k]) for k in ours[4]]
    return max(errors)


def check_graph(op: Op, p: Problem, layout) -> float | None:
    if op.graph_backward is None:
        return None
    y, cache = op.forward(p.x, p.gamma, p.beta, layout, backend="numpy")
    closed = op.backward(p.dout, cache)
    graph = op.graph_backward(p.dout, cache)
    return max(rel_error(a, b) for a, b in zip(graph, closed, strict=True))


def check_numeric(op: Op, p: Problem, layout) -> float:
    """Analytic gradients vs central differences (buffers are only read, never updated here)."""
    x, g, b = p.x.copy(), p.gamma.copy(), p.beta.copy()
    extra = p.buffers() if op.name == "batch_norm[eval]" else {}
    extra["backend"] = "numpy"

    def f():
        return op.forward(x, g, b, layout, **extra)[0]

    _, cache = op.forward(x, g, b, layout, **extra)
    analytic = op.backward(p.dout, cache)
    numeric = [numeric_gradient(f, a, p.dout) for a in (x, g, b)]
    return max(rel_error(a, n) for a, n in zip(analytic, numeric, strict=True))


def torch_reference(op: Op, p: Problem, layout, momentum=0.1, eps=1e-5):
    """The same computation with ``torch.nn.functional`` and autograd, in float64.

    Returns (y, dx, dgamma, dbeta, buffers) as NumPy arrays, like :func:`_run`.
    """
    import torch
    import torch.nn.functional as TF

    ch = get_layout(layout).channel_axis
    xt = torch.tensor(p.x, requires_grad=True)
    gt = torch.tensor(p.gamma, requires_grad=True)
    bt = torch.tensor(p.beta, requires_grad=True)
    bufs = {k: torch.tensor(v) for k, v in p.buffers().items()} if op.has_buffers else {}
    xc = xt.movedim(ch, 1)  # torch wants channels at axis 1
    if op.name.startswith("batch_norm"):
        training = op.name == "batch_norm[train]"
        yc = TF.batch_norm(
            xc, bufs["running_mean"], bufs["running_var"], gt, bt, training, momentum, eps
        )
    elif op.name == "layer_norm":
        yc = TF.layer_norm(xt, layer_norm_shape(p.x.shape, layout), gt, bt, eps).movedim(ch, 1)
    else:
        groups = GN_GROUPS if op.name == "group_norm" else p.x.shape[ch]
        yc = TF.group_norm(xc, groups, gt, bt, eps)
    y = yc.movedim(1, ch)
    y.backward(torch.tensor(p.dout))
    grads = [t.grad.numpy() for t in (xt, gt, bt)]
    return (y.detach().numpy(), *grads, {k: v.numpy() for k, v in bufs.items()})


def check_torch(op: Op, p: Problem, layout) -> float:
    return _max_error(_run(op, p, layout), torch_reference(op, p, layout))


def check_numba(op: Op, p: Problem, layout) -> float | None:
    """numba backend vs the NumPy reference, in float32 and float64."""
    return max(
        _max_error(_run(op, p, layout, dt, backend="numba"), _run(op, p, layout, dt))
        for dt in (np.float32, np.float64)
    )


def check_dtype(op: Op, p: Problem, layout, dtype) -> tuple[float, float]:
    """(error, tolerance) of ``op`` from ``dtype`` input vs float64 on the same rounded values."""
    q = p.rounded(dtype)
    ref = _run(op, q, layout)
    ours = _run(op, q, layout, dtype)
    if ours[0].dtype != dtype or ours[1].dtype != dtype:
        return float("inf"), 0.0  # y and dx must come back in the input dtype
    return _max_error(ours, ref), dtype_tolerance(dtype, centering_condition(q.x, ref[5].rstd))


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    op: str
    layout: str
    shape: tuple[int, ...]
    errors: dict[str, float | None] = field(default_factory=dict)
    tolerances: dict[str, float] = field(default_factory=lambda: dict(TOLERANCES))

    def failures(self) -> list[str]:
        return [
            k
            for k, e in self.errors.items()
            if e is not None and not (np.isfinite(e) and e <= self.tolerances[k])
        ]


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run_checks(
    seed: int = 0,
    *,
    use_torch: bool | None = None,
    use_numba: bool | None = None,
    ops: dict[str, Op] | None = None,
    layouts=None,
) -> list[Row]:
    """Run every check on every (operation, layout); None for a check means 'when available'."""
    from bnlab.backend import numba_available

    use_torch = torch_available() if use_torch is None else use_torch
    use_numba = numba_available() if use_numba is None else use_numba
    with _torch_single_thread(use_torch):
        return _run_cases(seed, use_torch, use_numba, ops or OPS, layouts or LAYOUTS)


@contextlib.contextmanager
def _torch_single_thread(active: bool):
    """torch on one thread while checking (restored after): the tensors are tiny, and a second
    thread only spin-waits, which is 10-100x slower on a busy machine."""
    if not active:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_cases(seed, use_torch, use_numba, ops, layouts) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows = []
    for op in ops.values():
        for layout in layouts:
            shape = CHECK_SHAPES[layout]
            p = Problem.random(op, shape, layout, rng)
            row = Row(op.name, layout, shape)
            row.errors["graph"] = check_graph(op, p, layout)
            row.errors["numeric"] = check_numeric(op, p, layout)
            row.errors["torch"] = check_torch(op, p, layout) if use_torch else None
            row.errors["numba"] = check_numba(op, p, layout) if use_numba else None
            for dtype in (np.float32, np.float16):
                name = np.dtype(dtype).name
                row.errors[name], row.tolerances[name] = check_dtype(op, p, layout, dtype)
            rows.append(row)
    return rows


def _header(check: str) -> str:
    tol = TOLERANCES[check]
    if np.isfinite(tol):
        return f"{check} (tol {tol:.0e})"
    return f"{check} (tol {DTYPE_TOLERANCES[np.dtype(check)]:.0e}+κ)"  # dtype_tolerance


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the errors; '-' where a check does not apply or was not run."""
    cols = list(TOLERANCES)
    head = ["operation", "layout", "shape"] + [_header(c) for c in cols]
    lines = ["| " + " | ".join(head + ["ok"]) + " |", "|" + "---|" * (len(head) + 1)]
    for r in rows:
        cells = [r.op, r.layout, "x".join(map(str, r.shape))]
        cells += ["-" if r.errors.get(c) is None else f"{r.errors[c]:.1e}" for c in cols]
        cells.append("FAIL " + ",".join(r.failures()) if r.failures() else "ok")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
