"""bnlab's batch norm as ``torch.library`` custom operators, so that ``torch.compile`` and
``torch.export`` see one opaque node per BN call instead of tracing into NumPy and numba:

===================================== ==================================================
``torch.ops.bnlab.batch_norm``        (x, weight, bias, running_mean, running_var,
                                      training, eps, backend, on_nonfinite)
                                      -> (y, mean, var, rstd); pure (running statistics are
                                      only read, in eval); autograd registered
``torch.ops.bnlab.batch_norm_backward`` (dy, x, weight, mean, var, rstd, training, eps,
                                      backend) -> (dx, dweight, dbias)
``torch.ops.bnlab.update_running_stats_`` (running_mean!, running_var!, num_batches_tracked!,
                                      mean, var, count, momentum, backend, on_nonfinite) -> ();
                                      declares the buffers it mutates (``mutates_args``), so the
                                      compiler functionalizes it like any in-place op
===================================== ==================================================

Each op has a fake (meta) implementation with the exact output strides of the kernels, and a
vmap rule (a loop over the vmapped dim). The layout is read from x's strides when the op runs,
not fixed when it is traced, and the ops are tagged ``flexible_layout``: inductor stores a
convolution's output channels-last when that is faster, and the op then takes (and gives back)
that layout as it is, instead of inductor converting x to the traced layout and back (two extra
passes over the tensor per call, which cost more than the kernels save). The implementations
are those of :mod:`bnlab.torch._kernel`; eager calls go there directly (see that module).
``backend=""`` means the current default backend. The module's ``forward`` emits these ops when
``torch.compiler.is_compiling()`` (see :mod:`bnlab.torch.dispatch`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.torch._kernel import (
    accumulation_vector,
    backward_impl,
    differentiable_backward,
    forward_impl,
    update_impl,
)
from bnlab.torch._layout import layout_of, new_output

Opt = Tensor | None


def _backend(name: str) -> str | None:
    return name or None


# --------------------------------------------------------------------------- forward

_FLEXIBLE = (torch.Tag.flexible_layout,)


def _dense(x: Tensor) -> tuple[Tensor, str]:
    """x and the layout the kernels see it in (a contiguous copy if its strides fit none)."""
    layout = layout_of(x)
    if layout is None:
        x = x.contiguous()
        layout = layout_of(x)
    return x, layout


@torch.library.custom_op("bnlab::batch_norm", mutates_args=(), device_types="cpu", tags=_FLEXIBLE)
def batch_norm(
    x: Tensor,
    weight: Opt,
    bias: Opt,
    running_mean: Opt,
    running_var: Opt,
    training: bool,
    eps: float,
    backend: str,
    on_nonfinite: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, layout = _dense(x)
    y, mean, var, rstd = forward_impl(x, weight, bias, running_mean, running_var, training, eps,
                                      layout, _backend(backend), on_nonfinite)  # fmt: skip
    return y, mean, var, rstd


@batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, training, eps, backend, on_nonfinite):
    x, layout = _dense(x)
    y, _ = new_output(x, layout, alloc="torch")
    return y, accumulation_vector(x), accumulation_vector(x), accumulation_vector(x)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, training, eps, backend, _ = inputs
    _, mean, var, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, var, rstd)
    ctx.config = (training, eps, backend)


def _backward(ctx, dy, _dmean, _dvar, _drstd):
    x, weight, bias, mean, var, rstd = ctx.saved_tensors
    training, eps, backend = ctx.config
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
        dx, dgamma, dbeta = differentiable_backward(dy, x, weight, mean, var, training, eps)
    else:
        dx, dgamma, dbeta = torch.ops.bnlab.batch_norm_backward(
            dy, x, weight, mean, var, rstd, training, eps, backend
        )
    dgamma = None if weight is None else dgamma.to(weight.dtype)
    dbeta = None if bias is None else dbeta.to(bias.dtype)
    return dx, dgamma, dbeta, None, None, None, None, None, None


batch_norm.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- backward


@torch.library.custom_op(
    "bnlab::batch_norm_backward", mutates_args=(), device_types="cpu", tags=_FLEXIBLE
)
def batch_norm_backward(
    dy: Tensor,
    x: Tensor,
    weight: Opt,
    mean: Tensor,
    var: Tensor,
    rstd: Tensor,
    training: bool,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    x, layout = _dense(x)
    dx, dgamma, dbeta = backward_impl(
        dy, x, weight, mean, var, rstd, training, eps, layout, _backend(backend)
    )
    return dx, dgamma, dbeta


@batch_norm_backward.register_fake
def _(dy, x, weight, mean, var, rstd, training, eps, backend):
    x, layout = _dense(x)
    dx, _ = new_output(x, layout, alloc="torch")
    return dx, accumulation_vector(x), accumulation_vector(x)


# --------------------------------------------------------------------------- running statistics


@torch.library.custom_op(
    "bnlab::update_running_stats_",
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
    device_types="cpu",
)
def update_running_stats_(
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Opt,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    backend: str,
    on_nonfinite: str,
) -> None:
    update_impl(
        running_mean,
        running_var,
        num_batches_tracked,
        mean,
        var,
        count,
        momentum,
        _backend(backend),
        on_nonfinite,
    )


@update_running_stats_.register_fake
def _(
    running_mean,
    running_var,
    num_batches_tracked,
    mean,
    var,
    count,
    momentum,
    backend,
    on_nonfinite,
):
    return None


# --------------------------------------------------------------------------- vmap


def _loop(op, info, in_dims, args, n_out):
    """vmap by a loop over the vmapped dim: one op call per slice, results stacked at dim 0."""
    outs = []
    for i in range(info.batch_size):
        sliced = [a if d is None else a.select(d, i) for a, d in zip(args, in_dims, strict=True)]
        outs.append(op(*sliced))
    return tuple(torch.stack([o[k] for o in outs]) for k in range(n_out)), (0,) * n_out


@batch_norm.register_vmap
def _(info, in_dims, *args):
    return _loop(torch.ops.bnlab.batch_norm, info, in_dims, args, 4)


@batch_norm_backward.register_vmap
def _(info, in_dims, *args):
    return _loop(torch.ops.bnlab.batch_norm_backward, info, in_dims, args, 3)
