"""``Conv2d`` by im2col + GEMM, with a direct-loop reference for the tests.

Cross-correlation, as in PyTorch (x (N, C, H, W), W (O, C/g, kh, kw), b (O,)):

    y[n, o, i, j] = b[o] + Σ_{c, p, q} W[o, c, p, q] · xpad[n, c, i·s + p·d, j·s + q·d]
    OH = ⌊(H + 2·pad − d·(kh − 1) − 1)/s⌋ + 1   (same for OW)

im2col: the patches become a matrix cols (N, C·kh·kw, OH·OW), so y = W₂ · cols with
W₂ = W.reshape(O, C·kh·kw), one batched GEMM. Backward:

    dW₂ = Σₙ dyₙ colsₙᵀ      db = Σ_{n,i,j} dy      dcols = W₂ᵀ dy  → col2im (scatter-add) → dx
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from bnlab import init
from bnlab.errors import ShapeError
from bnlab.nn._batch_parallel import batched_matmul
from bnlab.nn._util import check_dout, check_x, float_dtype, pair, positive_int, use_numba
from bnlab.nn.module import Module, Parameter


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def pad_input(x: np.ndarray, pad: tuple[int, int]) -> np.ndarray:
    """Zero-pad the two spatial dims of an NCHW array (no copy when pad is 0)."""
    ph, pw = pad
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))


def patch_view(xp, kernel, stride, dilation, out_hw) -> np.ndarray:
    """Read-only strided view (N, C, kh, kw, OH, OW) of a padded NCHW array: no copy."""
    n, c = xp.shape[:2]
    sn, sc, sh, sw = xp.strides
    (kh, kw), (s_h, s_w), (d_h, d_w) = kernel, stride, dilation
    return as_strided(
        xp,
        shape=(n, c, kh, kw, *out_hw),
        strides=(sn, sc, sh * d_h, sw * d_w, sh * s_h, sw * s_w),
        writeable=False,
    )


def im2col(xp, kernel, stride, dilation, out_hw, out=None) -> np.ndarray:
    """cols (N, C·kh·kw, OH·OW) of a padded NCHW array; ``out`` is reused when given.

    Stride 1 without dilation under the numba backend: ``_kernels.im2col_unit``; else
    :func:`im2col_reference`.
    """
    n, c = xp.shape[:2]
    if out is None:
        out = np.empty((n, c * kernel[0] * kernel[1], out_hw[0] * out_hw[1]), xp.dtype)
    if _unit_steps(stride, dilation) and use_numba():
        from bnlab.nn import _kernels

        return _kernels.im2col_unit(np.ascontiguousarray(xp), *kernel, *out_hw, out)
    return im2col_reference(xp, kernel, stride, dilation, out_hw, out)


def im2col_reference(xp, kernel, stride, dilation, out_hw, out=None) -> np.ndarray:
    """NumPy im2col: one copy of a strided patch view."""
    n, c = xp.shape[:2]
    view = patch_view(xp, kernel, stride, dilation, out_hw)
    if out is None:
        out = np.empty((n, c * kernel[0] * kernel[1], out_hw[0] * out_hw[1]), xp.dtype)
    np.copyto(out.reshape(view.shape), view)
    return out


def _unit_steps(stride, dilation) -> bool:
    return tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)


def col2im(dcols, padded_shape, kernel, stride, dilation, out_hw) -> np.ndarray:
    """Adjoint of :func:`im2col`: scatter-add (N, C·kh·kw, OH·OW) back to a padded NCHW array.

    Uses the numba kernels when the backend is "numba" (``col2im_add_unit`` for stride 1
    without dilation, else ``col2im_add``), else :func:`col2im_reference`.
    """
    if use_numba():
        from bnlab.nn import _kernels

        dxp = np.empty(padded_shape, dcols.dtype)
        dc = np.ascontiguousarray(dcols).reshape(padded_shape[0], -1, out_hw[0] * out_hw[1])
        if _unit_steps(stride, dilation):
            return _kernels.col2im_add_unit(dc, *kernel, *out_hw, dxp)
        return _kernels.col2im_add(dc, *kernel, *stride, *dilation, *out_hw, dxp)
    return col2im_reference(dcols, padded_shape, kernel, stride, dilation, out_hw)


def col2im_reference(dcols, padded_shape, kernel, stride, dilation, out_hw) -> np.ndarray:
    """NumPy col2im: one strided add per kernel tap."""
    n, c, hp, wp = padded_shape
    (kh, kw), (s_h, s_w), (d_h, d_w) = kernel, stride, dilation
    oh, ow = out_hw
    d6 = dcols.reshape(n, c, kh, kw, oh, ow)
    dxp = np.zeros(padded_shape, dcols.dtype)
    for p in range(kh):
        for q in range(kw):
            h0, w0 = p * d_h, q * d_w
            dxp[:, :, h0 : h0 + s_h * (oh - 1) + 1 : s_h, w0 : w0 + s_w * (ow - 1) + 1 : s_w] += d6[
                :, :, p, q
            ]
    return dxp


def conv2d_reference(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Direct loops over output positions: slow and obvious; what the tests compare against."""
    stride, padding, dilation = (
        pair(stride, "stride", 1),
        pair(padding, "padding"),
        pair(dilation, "dilation", 1),
    )
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    oh = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    xp = pad_input(x, padding)
    y = np.zeros((n, o, oh, ow), np.result_type(x, weight))
    og = o // groups
    for oc in range(o):
        g = oc // og
        xs = xp[:, g * cg : (g + 1) * cg]
        for i in range(oh):
            for j in range(ow):
                hs, ws = i * stride[0], j * stride[1]
                patch = xs[
                    :,
                    :,
                    hs : hs + dilation[0] * (kh - 1) + 1 : dilation[0],
                    ws : ws + dilation[1] * (kw - 1) + 1 : dilation[1],
                ]
                y[:, oc, i, j] = (patch * weight[oc]).sum(axis=(1, 2, 3))
        if bias is not None:
            y[:, oc] += bias[oc]
    return y


# Layers with at most this many input channels use the direct kernels (when they apply).
DIRECT_MAX_IN_CHANNELS = 1


class Conv2d(Module):
    """2-D convolution (``torch.nn.Conv2d``): NCHW input, weight (O, C/groups, kh, kw), bias (O,).

    Set ``input_grad = False`` on a first layer to skip dx (backward then returns None).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        *,
        dtype=np.float32,
        rng=None,
    ):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = pair(stride, "stride", 1)
        self.padding = pair(padding, "padding", 0)
        self.dilation = pair(dilation, "dilation", 1)
        self.groups = positive_int(groups, "groups")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        dt = float_dtype(dtype)
        wshape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self.weight = Parameter(np.empty(wshape, dt))
        b = Parameter(np.empty(self.out_channels, dt)) if bias else None
        self.register_parameter("bias", b)
        self.input_grad = True
        self._cols_buf: np.ndarray | None = None
        self.reset_parameters(rng)

    def reset_parameters(self, rng=None) -> None:
        b = None if self.bias is None else self.bias.data
        init.default_conv_linear_(self.weight.data, b, rng)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + ("" if self.bias is not None else ", bias=False")

    def _on_dtype_change(self) -> None:
        self._cols_buf = None

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        oh = conv_output_size(
            h, self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]
        )
        ow = conv_output_size(
            w, self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1]
        )
        return oh, ow

    def _check_input(self, x) -> tuple[int, int]:
        check_x(x, 4, "Conv2d", f"4-D (N, {self.in_channels}, H, W)")
        if x.shape[1] != self.in_channels:
            raise ShapeError(
                f"Conv2d: input must have {self.in_channels} channels (dim 1), got shape {x.shape}"
            )
        oh, ow = self.output_hw(x.shape[2], x.shape[3])
        if oh <= 0 or ow <= 0:
            raise ShapeError(
                f"Conv2d: input {x.shape[2]}x{x.shape[3]} is too small for kernel "
                f"{self.kernel_size} with padding {self.padding}, dilation {self.dilation}"
            )
        return oh, ow

    def _cols_buffer(self, shape, dtype) -> np.ndarray:
        """Reuse one im2col buffer across steps (allocating ~10 MB per step costs page faults)."""
        buf = self._cols_buf
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._cols_buf = np.empty(shape, dtype)
        return buf

    def uses_direct_kernel(self) -> bool:
        """True when this layer computes with the direct kernels of :mod:`bnlab.nn._conv_direct`.

        They apply to stride 1, no dilation, one group, the numba backend, and pay off when the
        input has few channels (im2col then copies far more than the GEMM computes: measured
        ~2x faster forward and weight gradient for LeNet's Conv(1, 6, 5); for Conv(6, 16, 5) on
        12x12 the im2col GEMM is faster).
        """
        return (
            self.in_channels <= DIRECT_MAX_IN_CHANNELS
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and use_numba()
        )

    def forward(self, x: np.ndarray) -> np.ndarray:
        oh, ow = self._check_input(x)
        x = x.astype(self.weight.data.dtype, copy=False)
        if self.uses_direct_kernel():
            from bnlab.nn import _conv_direct

            bias = None if self.bias is None else self.bias.data
            y, xf = _conv_direct.conv_forward(x, self.weight.data, bias, self.padding)
            if self._need_cache():
                self._cache = ("direct", xf, x.shape, (oh, ow))
            return y
        xp = pad_input(x, self.padding)
        y, cols = self._forward_im2col(xp, (oh, ow))
        if self._need_cache():
            self._cache = ("im2col", cols, x.shape, (oh, ow))
        return y

    def _forward_im2col(self, xp, out_hw) -> tuple[np.ndarray, np.ndarray]:
        """y (N, O, OH, OW) = W₂ · cols, and cols (N, C·kh·kw, OH·OW)."""
        (oh, ow), n, g = out_hw, xp.shape[0], self.groups
        k = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        cols_shape = (n, k, oh * ow)
        cols = self._cols_buffer(cols_shape, xp.dtype) if self._need_cache() else None
        cols = im2col(xp, self.kernel_size, self.stride, self.dilation, (oh, ow), out=cols)
        w2 = self.weight.data.reshape(g, self.out_channels // g, k // g)
        if g == 1:
            y = batched_matmul(w2[0], cols)
        else:
            colsg = cols.reshape(n, g, k // g, oh * ow)
            y = np.matmul(w2, colsg).reshape(n, self.out_channels, oh * ow)
        if self.bias is not None:
            y += self.bias.data[:, None]
        return y.reshape(n, self.out_channels, oh, ow), cols

    def backward(self, dout: np.ndarray) -> np.ndarray | None:
        path, saved, xshape, (oh, ow) = self._cached()
        n, o = xshape[0], self.out_channels
        check_dout(dout, (n, o, oh, ow), "Conv2d")
        dout = dout.astype(self.weight.data.dtype, copy=False)
        if path == "direct":
            from bnlab.nn import _conv_direct

            dw, db = _conv_direct.conv_weight_grad(
                saved, dout, xshape[2:], self.padding, self.kernel_size
            )
        else:
            dw = self._weight_grad_im2col(saved, dout)
            db = None if self.bias is None else dout.reshape(n, o, oh * ow).sum(axis=(0, 2))
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(db)
        if not self.input_grad:
            return None
        return self._input_grad(dout, xshape)

    def _weight_grad_im2col(self, cols, dout) -> np.ndarray:
        """dW₂ = Σₙ dyₙ colsₙᵀ, per group: (O, C/g·kh·kw)."""
        n, o, g, k = dout.shape[0], self.out_channels, self.groups, cols.shape[1]
        d = dout.reshape(n, o, -1)
        if g == 1:
            return batched_matmul(d, cols.transpose(0, 2, 1)).sum(axis=0)
        dg = d.reshape(n, g, o // g, -1)
        colsg = cols.reshape(n, g, k // g, -1)
        return np.matmul(dg, colsg.transpose(0, 1, 3, 2)).sum(axis=0)

    def _input_grad(self, dout, xshape) -> np.ndarray:
        """dx: dcols = W₂ᵀ dy, scattered back by col2im, padding cropped."""
        n, o, oh, ow = dout.shape
        (ph, pw), g = self.padding, self.groups
        padded_shape = (n, self.in_channels, xshape[2] + 2 * ph, xshape[3] + 2 * pw)
        k = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        d = dout.reshape(n, o, oh * ow)
        w2 = self.weight.data.reshape(g, o // g, k // g)
        if g == 1:
            dcols = batched_matmul(w2[0].T, d)
        else:
            dcols = np.matmul(w2.transpose(0, 2, 1), d.reshape(n, g, o // g, oh * ow))
        dxp = col2im(dcols, padded_shape, self.kernel_size, self.stride, self.dilation, (oh, ow))
        return dxp[:, :, ph : ph + xshape[2], pw : pw + xshape[3]]
