"""Argument checks of ``bnlab.torch.functional.batch_norm``, with PyTorch 2.13's exception types,
messages and order, so that code which catches PyTorch's errors catches bnlab's.

Order (as ``torch.nn.functional.batch_norm`` and ATen do it):

1. training: more than one value per channel (``ValueError``);
2. ``eps``: > 0 when normalizing with batch statistics, >= 0 otherwise (``ValueError``);
3. an empty batch returns here (PyTorch checks nothing more for it);
4. dtypes (``NotImplementedError`` / ``RuntimeError``), (C,) sizes, running statistics in eval.

bnlab adds, each naming the argument: ``momentum`` must be a number (``TypeError``) and, when it
is used (training with running statistics), in [0, 1] (``ValueError``); ``eps`` must be finite;
``on_nonfinite`` must be ``"warn"`` or ``"raise"``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from bnlab.errors import ShapeError

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# PyTorch's ScalarType names, used in its "not implemented for" messages
_SCALAR_TYPE_NAMES = {
    torch.bool: "Bool",
    torch.uint8: "Byte",
    torch.int8: "Char",
    torch.int16: "Short",
    torch.int32: "Int",
    torch.int64: "Long",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.float32: "Float",
    torch.float64: "Double",
}


def values_per_channel(x: torch.Tensor) -> int:
    """m = N · spatial size: how many values each channel statistic is computed from."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def check_batch_size(x: torch.Tensor) -> None:
    """PyTorch's ``_verify_batch_size``: training needs N · spatial size > 1."""
    size = x.size()
    count = size[0]
    for d in size[2:]:
        count *= d
    if count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def check_eps(eps, batch_stats: bool) -> float:
    """PyTorch 2.13's rule: eps > 0 with batch statistics (a zero-variance channel would divide by
    zero), eps >= 0 with running statistics. Not a number or not finite: bnlab's errors."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {eps!r}")
    if batch_stats and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if not math.isfinite(eps):
        raise ValueError(f"eps must be finite, got {eps!r}")
    return float(eps)


def check_momentum(momentum, used: bool) -> float | None:
    """A number, or None (cumulative average); in [0, 1] when it is used (bnlab's rule: outside,
    the running statistics would extrapolate instead of average)."""
    if momentum is None:
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float in [0, 1] or None, got {momentum!r}")
    if used and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return float(momentum)


def type_name(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _check_dtypes(x: torch.Tensor, params: list[torch.Tensor]) -> None:
    """PyTorch's CPU rule: parameters share one dtype, which is x's or, for float16/bfloat16
    input only, float32 (statistics kept in float32)."""
    if not (x.dtype.is_floating_point and x.dtype in _SCALAR_TYPE_NAMES):
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{type_name(x.dtype)}'")
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        first, other = params[0].dtype, next(d for d in dtypes if d != params[0].dtype)
        raise RuntimeError(f"expected scalar type {type_name(first)} but found {type_name(other)}")
    if not dtypes or dtypes == {x.dtype}:
        return
    (p,) = dtypes
    if x.dtype in _LOW_PRECISION and p == torch.float32:
        return
    if p == torch.float32 or x.dtype == torch.float64:
        raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
    raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")


def check_tensor_args(x, running_mean, running_var, weight, bias) -> None:
    """Types, dims, dtypes and (C,) sizes, with PyTorch's exception types and messages."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ShapeError(f"input must have at least 2 dims (N, C, ...), got shape {tuple(x.shape)}")
    given = {"running_mean": running_mean, "running_var": running_var}
    given |= {"weight": weight, "bias": bias}
    _check_dtypes(x, [v for v in given.values() if v is not None])
    c = x.shape[1]
    for name, v in given.items():
        if v is not None and v.numel() != c:
            raise RuntimeError(f"{name} should contain {c} elements not {v.numel()}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")


def check_policy(on_nonfinite: str) -> str:
    if on_nonfinite not in ("warn", "raise"):
        raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
    return on_nonfinite


class BatchNormArgs(NamedTuple):
    """A checked ``batch_norm`` call. Buffers are None where they are not used (training
    without tracking), the counter None unless the statistics are updated."""

    x: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    training: bool
    momentum: float | None
    eps: float
    num_batches_tracked: torch.Tensor | None
    policy: str
    backend: str | None

    @property
    def tracking(self) -> bool:
        """Training with running statistics to update."""
        return self.training and self.running_mean is not None

    @property
    def vectors(self) -> tuple:
        return (self.weight, self.bias, self.running_mean, self.running_var)


def check_call(x, running_mean, running_var, weight, bias, training, momentum, eps,
               num_batches_tracked, on_nonfinite, backend) -> BatchNormArgs:  # fmt: skip
    """The checks PyTorch's ``F.batch_norm`` makes before its op, and bnlab's (module doc).
    Every call pays for them: the common cases (float eps and momentum) are tested inline."""
    training = bool(training)
    tracking = training and running_mean is not None
    if training:
        c = x.shape[1] if x.dim() > 1 else 0
        if c == 0 or x.numel() // c == 1:  # N·spatial == 1, or an odd shape: the full check
            check_batch_size(x)
    if not (type(eps) is float and 0.0 < eps < math.inf):
        eps = check_eps(eps, batch_stats=training)
    if not (type(momentum) is float and 0.0 <= momentum <= 1.0):
        momentum = check_momentum(momentum, used=tracking)
    if on_nonfinite != "warn":
        check_policy(on_nonfinite)
    if tracking and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative moving average) needs num_batches_tracked")
    if not tracking:
        num_batches_tracked = None
        if training:
            running_mean = running_var = None
    return BatchNormArgs(x, running_mean, running_var, weight, bias, training, momentum, eps,
                         num_batches_tracked, on_nonfinite, backend)  # fmt: skip


def check_eval_scalars(eps, momentum, on_nonfinite) -> None:
    """:func:`check_call`'s checks for an eval call (no batch-size rule, momentum unused)."""
    check_eps(eps, batch_stats=False)
    check_momentum(momentum, used=False)
    if on_nonfinite != "warn":
        check_policy(on_nonfinite)


def check_kernel_call(a: BatchNormArgs) -> None:
    """What PyTorch's op would check, for calls the kernels compute (same errors)."""
    check_tensor_args(a.x, a.running_mean, a.running_var, a.weight, a.bias)
    if not a.training and a.running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
