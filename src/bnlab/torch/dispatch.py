"""Which implementation computes a batch-norm call: bnlab's kernels, or PyTorch's own op.

The **kernel route** (:mod:`bnlab.torch._kernel`; under ``torch.compile``/``torch.export`` the
custom ops of :mod:`bnlab.torch.ops`) is taken when all of these hold:

* x is a CPU float32/float64 tensor stored contiguously (NCHW, NCL, NCDHW) or channels-last
  (NHWC, NLC, NDHWC); weight, bias and running statistics are contiguous (C,) tensors of x's
  dtype; ``eps > 0``;
* eagerly: x and the vectors are plain tensors (no subclass), no forward-mode AD level is active
  and no ``torch.func`` transform wraps them;
* x is at least :func:`break_even` bytes: below that, PyTorch's op is as fast or faster
  (measured by ``benchmarks/bench_torch.py --sweep``; see :data:`BREAK_EVEN_BYTES`).

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

MIB = 1 << 20
# Bytes of x from which the kernels are at least as fast as PyTorch's op, per (traced,
# training, layout kind); from ``benchmarks/bench_torch.py --sweep`` (eager) and
# ``--sweep-compiled`` (BN + ReLU under torch.compile), 2 threads; docs/torch.md, "Never slower".
# * eager training, channels first (NC, NCL: NCHW, NCDHW): PyTorch's per-channel statistics
#   pass is slow there; the kernels are 1.4-1.8x faster from 8 MiB, mixed at 2 MiB;
# * eager training, channels last (NLC: NHWC, NDHWC): PyTorch's channels-last kernel is fast;
#   the kernels only win from 32 MiB, where PyTorch's fresh output memory (glibc maps
#   allocations that large anew) costs page faults that bnlab's reused memory does not;
# * compiled training: inductor's batch norm is slower than ATen's; the custom ops win from
#   4 MiB in both layouts (1.1-1.35x);
# * eval: PyTorch's inference pass is one multiply-add (fused into its neighbours when
#   compiled); the kernels only win where PyTorch's output costs page faults: always from
#   48 MiB (3-9x at 49 and 64 MiB), not always at 32 MiB (0.9x in one of three cases).
BREAK_EVEN_BYTES = {
    (False, True, "channels_first"): 8 * MIB,
    (False, True, "channels_last"): 32 * MIB,
    (True, True, "channels_first"): 4 * MIB,
    (True, True, "channels_last"): 4 * MIB,
    (False, False, "channels_first"): 48 * MIB,
    (False, False, "channels_last"): 48 * MIB,
    (True, False, "channels_first"): 48 * MIB,
    (True, False, "channels_last"): 48 * MIB,
}
_SMALLEST = min(BREAK_EVEN_BYTES.values())
_SMALLEST_EVAL = min(v for (_, training, _), v in BREAK_EVEN_BYTES.items() if not training)


def break_even(training: bool, layout: str, traced: bool = False) -> int:
    """The smallest x (in bytes) for which the kernel route is taken in ``"auto"`` mode."""
    kind = "channels_last" if layout == "NLC" else "channels_first"
    return BREAK_EVEN_BYTES[(bool(traced), bool(training), kind)]


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


def small_eval(x: torch.Tensor) -> bool:
    """An eval call PyTorch's op computes whatever else holds (below every eval break-even, or
    the kernels switched off): the caller may skip straight to it."""
    mode = _state["mode"]
    return mode == "never" or (mode == "auto" and x.numel() * x.element_size() < _SMALLEST_EVAL)


def kernel_route_layout(a, traced: bool) -> str | None:
    """The route decision for a checked call (:class:`bnlab.torch._checks.BatchNormArgs`): the
    layout the kernels see x in, or None for PyTorch's op. The size test comes first: most
    calls it rejects are small, and small calls must stay cheap."""
    mode = _state["mode"]
    if mode == "never":
        return None
    x = a.x
    nbytes = x.numel() * x.element_size()
    if mode == "auto" and nbytes < _SMALLEST:
        return None
    if not kernel_eligible(x, a.vectors, a.eps, traced):
        return None
    layout = layout_of(x)
    if layout is None or (mode == "auto" and nbytes < break_even(a.training, layout, traced)):
        return None
    return layout
