"""Which implementation computes a batch-norm call: bnlab's kernels, or PyTorch's own op.

The **kernel route** (:mod:`bnlab.torch._kernel`; under ``torch.compile``/``torch.export`` the
custom ops of :mod:`bnlab.torch.ops`) is taken when all of these hold:

* x is a CPU float32/float64 tensor stored contiguously (NCHW, NCL, NCDHW) or channels-last
  (NHWC, NLC, NDHWC); weight, bias and running statistics are contiguous (C,) tensors of x's
  dtype; ``eps > 0``;
* eagerly: x and the vectors are plain tensors (no subclass), no forward-mode AD level is active
  and no ``torch.func`` transform wraps them;
* x has at least :func:`break_even` elements: below that, PyTorch's op is faster (measured by
  ``benchmarks/bench_torch.py --sweep``; bnlab's per-call cost is ~0.1 ms of Python, NumPy
  views and thread wake-ups, which only a large enough layer repays).

Everything else takes the **PyTorch route** (:mod:`bnlab.torch._pytorch_op`): PyTorch's
``batch_norm`` with bnlab's running-statistics rule. Exporters that need standard ops
(``torch.onnx.export``, ``torch.jit.trace``) always get PyTorch's op.

:func:`kernel_route` overrides the size rule (``"always"``: every eligible call takes the kernels,
as the tests do to exercise them on small inputs; ``"never"``: PyTorch's op everywhere).
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as _forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from bnlab.torch._layout import layout_of

MODES = ("auto", "always", "never")
_state = {"mode": "auto"}

FAST_DTYPES = (torch.float32, torch.float64)
_PLAIN = (torch.Tensor, torch.nn.Parameter)

# Elements of x from which the kernels are faster than PyTorch's op, per (traced, training).
# Measured on the 2-core development machine (see docs/torch.md, "Never slower").
BREAK_EVEN = {
    (False, True): 1 << 17,
    (False, False): 1 << 17,
    (True, True): 1 << 17,
    (True, False): 1 << 17,
}


def break_even(training: bool, traced: bool) -> int:
    """The smallest x (in elements) for which the kernel route is taken in ``"auto"`` mode."""
    return BREAK_EVEN[(traced, training)]


@contextlib.contextmanager
def kernel_route(mode: str):
    """``with kernel_route("always"):`` — override the size rule for the calls inside."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    before = _state["mode"]
    _state["mode"] = mode
    try:
        yield
    finally:
        _state["mode"] = before


def exporting() -> bool:
    """ONNX export or ``torch.jit.trace``: standard ops only."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def tracing() -> bool:
    """Traced by ``torch.compile``/``torch.export`` or under a dispatch mode (fake tensors,
    ``make_fx``): outputs must come from ops the tracer sees, never from NumPy."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def functorch_active() -> bool:
    """A ``torch.func`` transform (vmap, grad, jvp, functionalize) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def under_transform() -> bool:
    """Eager only: forward-mode AD active, or a ``torch.func`` transform around the call."""
    return _forward_ad._current_level >= 0 or functorch_active()


def _vector_ok(v, x) -> bool:
    return v is None or (
        v.device.type == "cpu" and v.dtype == x.dtype and v.dim() == 1 and v.is_contiguous()
    )


def kernel_eligible(x, vectors, eps: float, traced: bool) -> bool:
    """Whether the kernels can compute this call (the first two bullets of the module doc)."""
    if x.device.type != "cpu" or x.dtype not in FAST_DTYPES or eps <= 0.0:
        return False
    if not all(_vector_ok(v, x) for v in vectors):
        return False
    if traced:
        return True
    if not all(type(t) in _PLAIN for t in (x, *vectors) if t is not None):
        return False
    return not under_transform()


def kernel_route_layout(a, traced: bool) -> str | None:
    """The route decision for a checked call (:class:`bnlab.torch._checks.BatchNormArgs`): the
    layout the kernels see x in, or None for PyTorch's op. The size test comes first: most
    calls it rejects are small, and small calls must stay cheap."""
    mode = _state["mode"]
    if mode == "never":
        return None
    x = a.x
    if mode == "auto" and x.numel() < break_even(a.training, traced):
        return None
    if not kernel_eligible(x, a.vectors, a.eps, traced):
        return None
    return layout_of(x)
