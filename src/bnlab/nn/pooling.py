"""Pooling over the spatial dims of NCHW arrays.

AvgPool2d:  y[n,c,i,j] = (1/(kh·kw)) Σ_{p,q} xpad[n, c, i·s+p, j·s+q]   (zero padding counted,
            PyTorch's ``count_include_pad=True``);  dx: dy/(kh·kw) added to every window cell.
MaxPool2d:  y = max over the window (padding is −∞); dx: dy routed to the first maximum.
AdaptiveAvgPool2d(out): window i spans [⌊i·H/out⌋, ⌈(i+1)·H/out⌉) as in PyTorch.

Non-overlapping windows that tile the input (stride == kernel, no padding, H and W divisible:
LeNet's pools) take a reshape fast path; the general path uses strided views.
"""

from __future__ import annotations

import math

import numpy as np

from bnlab.errors import ShapeError
from bnlab.nn._util import check_dout, check_x, pair, use_numba
from bnlab.nn.conv import conv_output_size, patch_view
from bnlab.nn.module import Module


def avgpool_tile_reference(x: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Mean over non-overlapping kh×kw tiles of (N, C, H, W), H % kh == W % kw == 0."""
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // kh, kh, w // kw, kw).sum(axis=(3, 5))
    y *= x.dtype.type(1.0 / (kh * kw))
    return y


def avgpool_tile_backward_reference(dout: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Each tile cell receives dout/(kh·kw)."""
    n, c, oh, ow = dout.shape
    d = dout * dout.dtype.type(1.0 / (kh * kw))
    dx = np.empty((n, c, oh, kh, ow, kw), d.dtype)
    dx[...] = d[:, :, :, None, :, None]
    return dx.reshape(n, c, oh * kh, ow * kw)


def _avgpool_tile(x, kh, kw):
    if not use_numba():
        return avgpool_tile_reference(x, kh, kw)
    from bnlab.nn import _kernels

    n, c, h, w = x.shape
    out = np.empty((n, c, h // kh, w // kw), x.dtype)
    if (kh, kw) == (2, 2):
        return _kernels.avgpool2x2_forward(np.ascontiguousarray(x), out)
    return _kernels.avgpool_tile_forward(np.ascontiguousarray(x), kh, kw, out)


def _avgpool_tile_backward(dout, kh, kw):
    if not use_numba():
        return avgpool_tile_backward_reference(dout, kh, kw)
    from bnlab.nn import _kernels

    n, c, oh, ow = dout.shape
    dx = np.empty((n, c, oh * kh, ow * kw), dout.dtype)
    if (kh, kw) == (2, 2):
        return _kernels.avgpool2x2_backward(np.ascontiguousarray(dout), dx)
    return _kernels.avgpool_tile_backward(np.ascontiguousarray(dout), kh, kw, dx)


def _check_pool_input(x, name: str) -> None:
    check_x(x, 4, name, "4-D (N, C, H, W)")


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else pair(stride, "stride", 1)
        self.padding = pair(padding, "padding", 0)
        if ceil_mode:
            raise NotImplementedError("ceil_mode=True is not supported")
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size, strict=True)):
            raise ValueError(
                f"padding {self.padding} must be at most half the kernel size {self.kernel_size}"
            )

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def _geometry(self, x) -> tuple[int, int]:
        _check_pool_input(x, type(self).__name__)
        oh = conv_output_size(x.shape[2], self.kernel_size[0], self.stride[0], self.padding[0], 1)
        ow = conv_output_size(x.shape[3], self.kernel_size[1], self.stride[1], self.padding[1], 1)
        if oh <= 0 or ow <= 0:
            raise ShapeError(
                f"{type(self).__name__}: input {x.shape} is smaller than the kernel "
                f"{self.kernel_size}"
            )
        return oh, ow

    def _tiles(self, shape) -> bool:
        """True when windows tile an input of this shape exactly: the tile fast path applies."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        return (
            (kh, kw) == (sh, sw)
            and self.padding == (0, 0)
            and shape[2] % kh == 0
            and shape[3] % kw == 0
        )

    def _padded(self, x, fill) -> np.ndarray:
        ph, pw = self.padding
        if ph == 0 and pw == 0:
            return x
        return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)

    def _windows(self, xp, out_hw) -> np.ndarray:
        """(N, C, kh, kw, OH, OW) view of the padded input."""
        return patch_view(xp, self.kernel_size, self.stride, (1, 1), out_hw)

    def _scatter(self, dwin, xshape, out_hw) -> np.ndarray:
        """Adjoint of _windows: add dwin (N, C, kh, kw, OH, OW) into a zero padded input."""
        n, c, h, w = xshape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        oh, ow = out_hw
        dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dwin.dtype)
        for p in range(kh):
            for q in range(kw):
                dxp[:, :, p : p + sh * (oh - 1) + 1 : sh, q : q + sw * (ow - 1) + 1 : sw] += dwin[
                    :, :, p, q
                ]
        return dxp[:, :, ph : ph + h, pw : pw + w]


class AvgPool2d(_Pool2d):
    """Average pooling (``torch.nn.AvgPool2d``, ``count_include_pad=True``)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        oh, ow = self._geometry(x)
        kh, kw = self.kernel_size
        self._cache = (x.shape, (oh, ow))
        if self._tiles(x.shape):
            return _avgpool_tile(x, kh, kw)
        y = self._windows(self._padded(x, 0), (oh, ow)).sum(axis=(2, 3))
        y *= x.dtype.type(1.0 / (kh * kw))
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        xshape, (oh, ow) = self._cached()
        n, c = xshape[:2]
        check_dout(dout, (n, c, oh, ow), "AvgPool2d")
        kh, kw = self.kernel_size
        if self._tiles(xshape):
            return _avgpool_tile_backward(dout, kh, kw)
        d = dout * dout.dtype.type(1.0 / (kh * kw))
        dwin = np.broadcast_to(d[:, :, None, None], (n, c, kh, kw, oh, ow))
        return self._scatter(dwin, xshape, (oh, ow))


class MaxPool2d(_Pool2d):
    """Max pooling (``torch.nn.MaxPool2d``); the gradient goes to the first maximum of a window."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        oh, ow = self._geometry(x)
        kh, kw = self.kernel_size
        win = self._windows(self._padded(x, -np.inf), (oh, ow))
        n, c = x.shape[:2]
        flat = np.moveaxis(win.reshape(n, c, kh * kw, oh, ow), 2, -1)  # (N, C, OH, OW, kh·kw)
        idx = flat.argmax(axis=-1)
        y = np.take_along_axis(flat, idx[..., None], axis=-1)[..., 0]
        if self._need_cache():
            self._cache = (x.shape, (oh, ow), idx)
        return np.ascontiguousarray(y)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        xshape, (oh, ow), idx = self._cached()
        n, c = xshape[:2]
        check_dout(dout, (n, c, oh, ow), "MaxPool2d")
        kh, kw = self.kernel_size
        taps = np.arange(kh * kw).reshape(kh, kw)[None, None, :, :, None, None]
        dwin = np.where(idx[:, :, None, None] == taps, dout[:, :, None, None], 0)
        return self._scatter(dwin.astype(dout.dtype, copy=False), xshape, (oh, ow))


def _adaptive_bounds(size: int, out: int) -> list[tuple[int, int]]:
    return [((i * size) // out, math.ceil((i + 1) * size / out)) for i in range(out)]


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed output size (``torch.nn.AdaptiveAvgPool2d``); (1, 1) = global."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = pair(output_size, "output_size", 1)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"

    def forward(self, x: np.ndarray) -> np.ndarray:
        _check_pool_input(x, "AdaptiveAvgPool2d")
        n, c, h, w = x.shape
        oh, ow = self.output_size
        self._cache = x.shape
        if (oh, ow) == (1, 1):
            return x.mean(axis=(2, 3), keepdims=True, dtype=x.dtype)
        y = np.empty((n, c, oh, ow), x.dtype)
        for i, (h0, h1) in enumerate(_adaptive_bounds(h, oh)):
            for j, (w0, w1) in enumerate(_adaptive_bounds(w, ow)):
                y[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
        return y

    def backward(self, dout: np.ndarray) -> np.ndarray:
        xshape = self._cached()
        n, c, h, w = xshape
        oh, ow = self.output_size
        check_dout(dout, (n, c, oh, ow), "AdaptiveAvgPool2d")
        dx = np.zeros(xshape, dout.dtype)
        for i, (h0, h1) in enumerate(_adaptive_bounds(h, oh)):
            for j, (w0, w1) in enumerate(_adaptive_bounds(w, ow)):
                area = (h1 - h0) * (w1 - w0)
                dx[:, :, h0:h1, w0:w1] += dout[:, :, i : i + 1, j : j + 1] / area
        return dx
