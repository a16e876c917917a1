"""Normalization modules: thin bookkeeping over :mod:`bnlab.functional` (one math path).

The modules hold parameters and buffers and pick the layout; every formula is in
``bnlab.functional`` (``batch_norm_forward/backward`` switch to the numba kernels by backend).

BatchNorm (training):  y = γ·(x − μ_B)/sqrt(σ²_B + ε) + β,  per channel over (N, *spatial);
    running ← (1 − momentum)·running + momentum·batch_stat   (PyTorch's momentum, default 0.1;
    the running variance uses the unbiased σ²_B·m/(m − 1); momentum=None: cumulative average).
BatchNorm (eval):      the running statistics replace μ_B, σ²_B.
LayerNorm:  statistics per sample over the trailing ``normalized_shape``; γ, β of that shape.
GroupNorm:  statistics per sample and group of C/G channels; γ, β per channel.
"""

from __future__ import annotations

import numpy as np

from bnlab import functional as F
from bnlab.errors import ShapeError
from bnlab.functional import _validate as v
from bnlab.functional._layout import get_layout
from bnlab.nn._util import check_x, float_dtype, positive_int
from bnlab.nn.module import Module, Parameter


def _buffer_dtype(dtype) -> np.dtype:
    """Running statistics of float16 modules are kept in float32: a batch variance above 65504
    (float16's maximum) would otherwise turn running_var into inf for good."""
    dt = np.dtype(dtype)
    return np.dtype(np.float32) if dt.type is np.float16 else dt


class _BatchNorm(Module):
    """Shared by BatchNorm1d/2d: ``torch.nn.BatchNorm*d`` arguments, buffers and state_dict keys.

    Parameters ``weight`` (γ) and ``bias`` (β), shape (C,), when ``affine``; buffers
    ``running_mean`` (zeros), ``running_var`` (ones), ``num_batches_tracked`` (int64 0-d) when
    ``track_running_stats``. Without running statistics, batch statistics are used in eval too.
    """

    _layouts: dict[int, str] = {}

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        *,
        layout: str | None = None,
        dtype=np.float32,
        backend: str | None = None,
    ):
        super().__init__()
        self.num_features = positive_int(num_features, "num_features")
        self.eps = v.check_eps(eps)
        self.momentum = v.check_momentum(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.layout = layout
        self.backend = backend
        dt = float_dtype(dtype)
        c = self.num_features
        if self.affine:
            self.weight = Parameter(np.ones(c, dt))
            self.bias = Parameter(np.zeros(c, dt))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            buf = _buffer_dtype(dt)
            self.register_buffer("running_mean", np.zeros(c, buf))
            self.register_buffer("running_var", np.ones(c, buf))
            self.register_buffer("num_batches_tracked", np.array(0, dtype=np.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def _on_dtype_change(self) -> None:
        for name in ("running_mean", "running_var"):
            b = self._buffers.get(name)
            if b is not None and b.dtype != _buffer_dtype(b.dtype):
                self._buffers[name] = b.astype(_buffer_dtype(b.dtype))

    def _state_value_problem(self, name: str, value: np.ndarray) -> str | None:
        if name == "running_var" and (value < 0).any():
            return f"a variance must be >= 0, found {float(value.min()):.4g}"
        if name == "num_batches_tracked" and (value < 0).any():
            return f"a batch count must be >= 0, found {int(value.min())}"
        return None

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def _layout_for(self, x) -> str:
        if self.layout is not None:
            return self.layout
        if x.ndim not in self._layouts:
            raise ShapeError(
                f"{type(self).__name__}: input must be {self._expected}, got shape {x.shape}"
            )
        return self._layouts[x.ndim]

    def forward(self, x: np.ndarray) -> np.ndarray:
        check_x(x, tuple(self._layouts), type(self).__name__, self._expected)
        layout = self._layout_for(x)
        axis = get_layout(layout).channel_axis
        if x.shape[axis] != self.num_features:
            raise ShapeError(
                f"{type(self).__name__}: input must have {self.num_features} channels "
                f"(axis {axis} of layout {layout!r}), got shape {x.shape}"
            )
        use_batch_stats = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        y, cache = F.batch_norm_forward(
            x,
            None if self.weight is None else self.weight.data,
            None if self.bias is None else self.bias.data,
            training=use_batch_stats,
            running_mean=self.running_mean if self.track_running_stats else None,
            running_var=self.running_var if self.track_running_stats else None,
            momentum=self.momentum,
            eps=self.eps,
            layout=layout,
            convention="pytorch",
            num_batches_tracked=self.num_batches_tracked if update else None,
            backend=self.backend,
        )
        self._cache = cache if self._need_cache() else None
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        dx, dgamma, dbeta = F.batch_norm_backward(dout, self._cached())
        if self.affine:
            self.weight.accumulate(dgamma)
            self.bias.accumulate(dbeta)
        return dx


class BatchNorm1d(_BatchNorm):
    """Batch norm of (N, C) or (N, C, L) input (``torch.nn.BatchNorm1d``)."""

    _layouts = {2: "NC", 3: "NCL"}
    _expected = "2-D (N, C) or 3-D (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch norm of (N, C, H, W) input (``torch.nn.BatchNorm2d``); ``layout="NHWC"`` for
    channels-last arrays."""

    _layouts = {4: "NCHW"}
    _expected = "4-D (N, C, H, W)"


class LayerNorm(Module):
    """``torch.nn.LayerNorm``: weight/bias of shape ``normalized_shape``."""

    def __init__(
        self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *, dtype=np.float32
    ):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape = tuple(positive_int(s, "normalized_shape") for s in shape)
        self.eps = v.check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        dt = float_dtype(dtype)
        w = Parameter(np.ones(self.normalized_shape, dt)) if elementwise_affine else None
        b = Parameter(np.zeros(self.normalized_shape, dt)) if elementwise_affine and bias else None
        self.register_parameter("weight", w)
        self.register_parameter("bias", b)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        y, cache = F.layer_norm_forward(
            x,
            self.normalized_shape,
            None if self.weight is None else self.weight.data,
            None if self.bias is None else self.bias.data,
            self.eps,
        )
        self._cache = cache if self._need_cache() else None
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        dx, dgamma, dbeta = F.layer_norm_backward(dout, self._cached())
        _accumulate_affine(self, dgamma, dbeta)
        return dx


class GroupNorm(Module):
    """``torch.nn.GroupNorm(num_groups, num_channels, eps, affine)``; weight/bias (C,)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, dtype=np.float32):
        super().__init__()
        self.num_groups = positive_int(num_groups, "num_groups")
        self.num_channels = positive_int(num_channels, "num_channels")
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_channels={num_channels}")
        self.eps = v.check_eps(eps)
        self.affine = bool(affine)
        dt = float_dtype(dtype)
        self.register_parameter("weight", Parameter(np.ones(num_channels, dt)) if affine else None)
        self.register_parameter("bias", Parameter(np.zeros(num_channels, dt)) if affine else None)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"

    def forward(self, x: np.ndarray) -> np.ndarray:
        check_x(x, (2, 3, 4, 5), "GroupNorm", f"(N, {self.num_channels}, *)")
        if x.shape[1] != self.num_channels:
            raise ShapeError(
                f"GroupNorm: input must have {self.num_channels} channels (dim 1), "
                f"got shape {x.shape}"
            )
        layout = {2: "NC", 3: "NCL", 4: "NCHW"}.get(x.ndim)
        if layout is None:
            raise ShapeError(f"GroupNorm: 5-D input is not supported yet, got shape {x.shape}")
        y, cache = F.group_norm_forward(
            x,
            self.num_groups,
            None if self.weight is None else self.weight.data,
            None if self.bias is None else self.bias.data,
            self.eps,
            layout,
        )
        self._cache = cache if self._need_cache() else None
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        dx, dgamma, dbeta = F.group_norm_backward(dout, self._cached())
        _accumulate_affine(self, dgamma, dbeta)
        return dx


def _accumulate_affine(mod: Module, dgamma, dbeta) -> None:
    if mod.weight is not None and dgamma is not None:
        mod.weight.accumulate(dgamma)
    if mod.bias is not None and dbeta is not None:
        mod.bias.accumulate(dbeta)
