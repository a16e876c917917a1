"""Direct (im2col-free) stride-1 convolution kernels for layers with few input channels.

For LeNet's first layer (1 input channel, 6 outputs, 5×5) im2col builds a (N, 25, 576) matrix
(15 MB at batch 256) only to multiply it by a 6×25 weight: the copy costs more than the
arithmetic. These kernels read the padded input in place instead.

The "flat row" trick (stride 1, no dilation): with the padded input of one sample and channel
flattened, xf[h·Wp + w] (Hp×Wp plane), every kernel tap (p, q) is ONE contiguous slice

    y_flat[m] += W[o, c, p, q] · xf[p·Wp + q + m],      m ∈ [0, L),  L = (OH − 1)·Wp + OW

where y_flat[i·Wp + j] = y[i, j] for j < OW, and the columns j ∈ [OW, Wp) are wasted work
(they wrap into the next row and are dropped). Long contiguous loops vectorise well; the
waste is (Wp − OW)/Wp of the arithmetic (14% for 28×28 input, 5×5 kernel).

    forward:   y[n, o]      = b[o] + Σ_{c,p,q} W[o, c, p, q] · xf[n, c, p·Wp + q : … + L]
    weight:    dW[o, c, p, q] = Σ_n Σ_m dy_flat[n, o, m] · xf[n, c, p·Wp + q + m]
               (dy_flat: dy spread to row width Wp with zeros in the wasted columns)

The kernel width ``kw`` is a compile-time constant of the forward kernel (one compiled kernel
per width, made by :func:`forward_kernel`): the tap loop over q is then unrolled and the loop
over m vectorised with the accumulator in a register; with a run-time width LLVM vectorises
the 5-long q loop instead and the kernel is ~9x slower.

Parallel over the batch only, each sample computed by one thread in a fixed order, and the
weight gradient is summed over per-sample partials by NumPy: results do not depend on the
thread count. References: :func:`bnlab.nn.conv.conv2d_reference` and the im2col path.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange


@functools.cache
def forward_kernel(kw: int):
    """The forward kernel for kernel width ``kw`` (compiled once per width, cached on disk)."""

    @njit(parallel=True, cache=True)
    def conv_forward_flat(xf, w, b, wp, out):
        """out[n, o, i, j] = b[o] + Σ_{c,p,q} w[o,c,p,q] · xf[n, c, (i+p)·wp + j + q].

        xf (N, C, Hp·Wp) C-contiguous padded input, w (O, C, KH, kw), b (O,),
        out (N, O, OH, OW) with OH = Hp − KH + 1, OW = wp − kw + 1.
        """
        n_all, c_all = xf.shape[0], xf.shape[1]
        o_all, kh = w.shape[0], w.shape[2]
        oh, ow = out.shape[2], out.shape[3]
        length = (oh - 1) * wp + ow
        for n in prange(n_all):
            acc = np.empty(length, xf.dtype)
            for o in range(o_all):
                acc[:] = b[o]
                for c in range(c_all):
                    xr = xf[n, c]
                    for p in range(kh):
                        xs = xr[p * wp : p * wp + length + kw - 1]
                        wr = w[o, c, p]
                        for m in range(length):
                            s = acc[m]
                            for q in range(kw):  # kw is a constant: unrolled
                                s += wr[q] * xs[q + m]
                            acc[m] = s
                for i in range(oh):
                    for j in range(ow):
                        out[n, o, i, j] = acc[i * wp + j]
        return out

    return conv_forward_flat


@njit(parallel=True, fastmath=True, cache=True)
def weight_grad_partials(xf, dy, wp, part):
    """part[n, o, c, p, q] = Σ_{i,j} dy[n, o, i, j] · xf[n, c, (i+p)·wp + j + q]; dW = Σ_n part.

    xf (N, C, Hp·Wp) C-contiguous padded input, dy (N, O, OH, OW), part (N, O, C, KH, KW).
    fastmath lets LLVM vectorise the dot products (reassociated sums: results differ from the
    im2col GEMM in the last bits, and are the same for any thread count).
    """
    n_all, c_all = xf.shape[0], xf.shape[1]
    o_all, oh, ow = dy.shape[1], dy.shape[2], dy.shape[3]
    kh, kw = part.shape[3], part.shape[4]
    length = (oh - 1) * wp + ow
    for n in prange(n_all):
        d = np.zeros((o_all, length), xf.dtype)
        for o in range(o_all):
            for i in range(oh):
                for j in range(ow):
                    d[o, i * wp + j] = dy[n, o, i, j]
        for c in range(c_all):
            xr = xf[n, c]
            for p in range(kh):
                for q in range(kw):
                    xs = xr[p * wp + q : p * wp + q + length]
                    for o in range(o_all):
                        dr = d[o]
                        s = xf.dtype.type(0)
                        for m in range(length):
                            s += dr[m] * xs[m]
                        part[n, o, c, p, q] = s
    return part


def conv_forward(xp: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Stride-1, undilated, ungrouped conv of an already padded NCHW input: (N, O, OH, OW)."""
    n, c, hp, wp = xp.shape
    o, _, kh, kw = weight.shape
    xf = np.ascontiguousarray(xp).reshape(n, c, hp * wp)
    b = np.zeros(o, xp.dtype) if bias is None else bias
    out = np.empty((n, o, hp - kh + 1, wp - kw + 1), xp.dtype)
    return forward_kernel(kw)(xf, np.ascontiguousarray(weight), b, wp, out)


def conv_weight_grad(xp: np.ndarray, dout: np.ndarray, kernel: tuple[int, int]) -> np.ndarray:
    """dW (O, C, KH, KW) of the stride-1 conv of padded input xp (N, C, Hp, Wp), given dy."""
    n, c, hp, wp = xp.shape
    o = dout.shape[1]
    xf = np.ascontiguousarray(xp).reshape(n, c, hp * wp)
    part = np.empty((n, o, c, *kernel), xp.dtype)
    weight_grad_partials(xf, np.ascontiguousarray(dout, xp.dtype), wp, part)
    return part.sum(axis=0)
