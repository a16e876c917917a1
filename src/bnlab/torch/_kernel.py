"""bnlab's kernels on torch tensors: forward, backward and the running-statistics update, each a
function of tensors only (what a ``torch.library`` custom op may be), and the eager
``autograd.Function`` that calls them directly.

The same three functions run in both places: eagerly through :class:`KernelBatchNorm` (a custom
op's dispatcher costs ~40 µs per call here, more than a whole small BN layer), and under
``torch.compile`` / ``torch.export`` through the custom ops of :mod:`bnlab.torch.ops`.

* forward: :func:`bnlab.functional.batch_norm_forward` on zero-copy NumPy views (layouts
  in :mod:`bnlab.torch._layout`), writing y into reused memory (:mod:`bnlab.buffers`);
* backward: the fused kernel :func:`bnlab.kernels.bn_backward` (``bn_eval_backward`` in eval)
  with the saved statistics, dx written into x's memory format; the ``"numpy"`` backend
  recomputes its cache with the reference forward and runs
  :func:`bnlab.functional.batch_norm_backward`;
* update: :func:`bnlab.functional.running.update_running_stats` (the overflow guard included),
  skipped for a batch that is not finite (the forward has already reported it).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from bnlab.backend import resolve_backend
from bnlab.conventions import get_convention
from bnlab.functional import batch_norm_backward, batch_norm_forward
from bnlab.functional.running import batch_is_finite, update_running_stats
from bnlab.torch._checks import values_per_channel
from bnlab.torch._layout import new_output, to_numpy, vector
from bnlab.torch.reference import accumulation_dtype, batch_norm_backward_reference

_PYTORCH = get_convention("pytorch")


def forward_impl(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    training: bool,
    eps: float,
    layout: str,
    backend: str | None,
    policy: str,
):
    """(y, mean, var, rstd): y in x's memory format; the (C,) statistics in the accumulation
    dtype are the batch's (training) or the running ones (eval). Modifies nothing."""
    y, y_array = new_output(x, layout)
    _, cache = batch_norm_forward(
        to_numpy(x, layout),
        vector(weight),
        vector(bias),
        training=training,
        running_mean=None if training else vector(running_mean),
        running_var=None if training else vector(running_var),
        eps=eps,
        layout=layout,
        convention="pytorch",
        on_nonfinite=policy,
        backend=backend,
        out=y_array,
    )
    stats = (torch.from_numpy(np.asarray(v)) for v in (cache.mean, cache.var, cache.rstd))
    return (y, *stats)


def update_impl(
    running_mean,
    running_var,
    num_batches_tracked,
    mean,
    var,
    count: int,
    momentum,
    backend: str | None,
    policy: str,
) -> None:
    """PyTorch's running-statistics update in place under bnlab's rule (a batch that is not
    finite was reported by the forward and is skipped here; an update that overflows the
    buffers' dtype is refused)."""
    mean, var = vector(mean), vector(var)
    if not batch_is_finite(mean, var):
        return
    update_running_stats(
        vector(running_mean),
        vector(running_var),
        mean,
        var,
        count,
        momentum,
        _PYTORCH,
        vector(num_batches_tracked),
        policy,
        blend=_compiled_blend(backend),
    )


def _compiled_blend(backend: str | None):
    if resolve_backend(backend) != "numba":
        return None
    from bnlab.kernels.running import blend_running

    return blend_running


def _kernel_view(a: np.ndarray, layout: str) -> tuple[np.ndarray, bool]:
    """The kernels' 3-D view of a layout's array: (N, C, S), or (N, S, C) with channels_last."""
    if layout == "NC":
        return a.reshape(a.shape[0], 1, a.shape[1]), True
    return a, layout == "NLC"


def backward_impl(
    dy, x, weight, mean, var, rstd, training: bool, eps: float, layout: str, backend: str | None
):
    """(dx, dγ, dβ): dx in x's memory format (written straight into reused memory), dγ and dβ
    (C,) in the accumulation dtype. ``mean``/``var``/``rstd`` are the forward's statistics."""
    dx, dx_array = new_output(x, layout)
    x_array, dy_array = to_numpy(x, layout), to_numpy(dy, layout)
    if resolve_backend(backend) == "numpy":
        dgamma, dbeta = _reference_backward(
            dy_array, x_array, weight, mean, var, training, eps, layout, dx_array
        )
    else:
        from bnlab.kernels import bn_backward, bn_eval_backward

        c = x.shape[1]
        g = np.ones(c) if weight is None else vector(weight).astype(np.float64)
        x3, cl = _kernel_view(x_array, layout)
        dy3, _ = _kernel_view(dy_array, layout)
        dx3, _ = _kernel_view(dx_array, layout)
        kernel = bn_backward if training else bn_eval_backward
        _, dgamma, dbeta = kernel(dy3, x3, vector(mean), vector(rstd), g, cl, dx=dx3)
    return dx, torch.from_numpy(np.asarray(dgamma)), torch.from_numpy(np.asarray(dbeta))


def _reference_backward(dy_array, x_array, weight, mean, var, training, eps, layout, out):
    """The NumPy reference keeps no statistics between calls: its forward is recomputed (the
    same deterministic values; its warnings were given the first time)."""
    running = {} if training else {"running_mean": vector(mean), "running_var": vector(var)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, cache = batch_norm_forward(
            x_array,
            vector(weight),
            None,
            training=training,
            eps=eps,
            layout=layout,
            convention="pytorch",
            backend="numpy",
            **running,
        )
    _, dgamma, dbeta = batch_norm_backward(dy_array, cache, out=out)
    return dgamma, dbeta


def differentiable_backward(dy, x, weight, mean, var, training: bool, eps: float):
    """The backward in torch ops, for double backward and batched (vmapped) gradients."""
    if training:
        return batch_norm_backward_reference(dy, x, weight, eps, True)
    return batch_norm_backward_reference(dy, x, weight, eps, False, mean, var)


def needs_differentiable_backward(dy: torch.Tensor) -> bool:
    """create_graph=True, or dy batched (``torch.func.vmap``, or the legacy vmap of
    ``autograd.grad(..., is_grads_batched=True)`` and ``jacobian(vectorize=True)``): the NumPy
    kernels can do neither."""
    functorch = torch._C._functorch
    return (
        torch.is_grad_enabled()
        or functorch.is_functorch_wrapped_tensor(dy)
        or functorch.is_legacy_batchedtensor(dy)
    )


def param_grads(dgamma, dbeta, weight, bias, need):
    """Cast dγ, dβ to the parameters' dtypes; None where no gradient is needed."""
    dgamma = dgamma.to(weight.dtype) if need[1] and weight is not None else None
    dbeta = dbeta.to(bias.dtype) if need[2] and bias is not None else None
    return dgamma, dbeta


class KernelBatchNorm(torch.autograd.Function):
    """Eager batch norm by bnlab's kernels. Inputs: x (N, C, ...) stored in ``layout``; weight,
    bias, running_mean, running_var (C,) or None; num_batches_tracked 0-d or None. The running
    statistics are updated in place in training (when given)."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        training,
        momentum,
        eps,
        layout,
        backend,
        policy,
    ):
        y, mean, var, rstd = forward_impl(
            x, weight, bias, running_mean, running_var, training, eps, layout, backend, policy
        )
        if training and running_mean is not None:
            update_impl(
                running_mean,
                running_var,
                num_batches_tracked,
                mean,
                var,
                values_per_channel(x),
                momentum,
                backend,
                policy,
            )
        ctx.save_for_backward(x, weight, bias, mean, var, rstd)  # version counters guard x
        ctx.config = (training, eps, layout, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, var, rstd = ctx.saved_tensors
        training, eps, layout, backend = ctx.config
        if needs_differentiable_backward(dy):
            dx, dgamma, dbeta = differentiable_backward(dy, x, weight, mean, var, training, eps)
        else:
            dx, dgamma, dbeta = backward_impl(
                dy, x, weight, mean, var, rstd, training, eps, layout, backend
            )
        need = ctx.needs_input_grad
        dgamma, dbeta = param_grads(dgamma, dbeta, weight, bias, need)
        return (dx if need[0] else None, dgamma, dbeta) + (None,) * 9


def accumulation_vector(x: torch.Tensor) -> torch.Tensor:
    """An empty (C,) tensor in the statistics' dtype (for fake outputs)."""
    return x.new_empty((x.shape[1],), dtype=accumulation_dtype(x.dtype))
