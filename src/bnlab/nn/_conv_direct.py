"""Direct (im2col-free) stride-1 convolution kernels for layers with few input channels.

For LeNet's first layer (1 input channel, 6 outputs, 5×5) im2col builds a (N, 25, 576) matrix
(15 MB at batch 256) only to multiply it by a 6×25 weight: the copy costs more than the
arithmetic. These kernels read the padded input in place instead.

The "flat row" trick (stride 1, no dilation): with the padded input of one sample and channel
flattened, xf[h·Wp + w] (Hp×Wp plane), every kernel tap (p, q) is ONE contiguous slice

    y_flat[m] += W[o, c, p, q] · xf[p·Wp + q + m],      m ∈ [0, L),  L = (OH − 1)·Wp + OW

where y_flat[i·Wp + j] = y[i, j] for j < OW, and the columns j ∈ [OW, Wp) are wasted work
(they wrap into the next row and are dropped). Long contiguous loops vectorise well; the
waste is (Wp − OW)/Wp of the arithmetic (14% for 28×28 input, 5×5 kernel). L is rounded up
to a whole number of vectors, the flat input buffer carrying zeros after each plane.

    forward:   y[n, o]      = b[o] + Σ_{c,p,q} W[o, c, p, q] · xf[n, c, p·Wp + q : … + L]
    weight:    dW[o, c, p, q] = Σ_n Σ_m dy_flat[n, o, m] · xf[n, c, p·Wp + q + m]
               (dy_flat: dy spread to row width Wp with zeros in the wasted columns)

The kernel width ``kw`` is a compile-time constant of the forward kernel (one compiled kernel
per width, made by :func:`forward_kernel`): the tap loop over q is then unrolled and the loop
over m vectorised with the accumulator in a register; with a run-time width LLVM vectorises
the 5-long q loop instead and the kernel is ~9x slower. Both kernels update three output
channels per pass over the input, so that each input load feeds three multiply-adds (LeNet's
conv1: forward 0.87 -> 0.64 ms, weight gradient 1.2 -> 0.8 ms at batch 256, one thread).

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
    def conv_forward_flat(xf, w, b, wp, length, out):
        """out[n, o, i, j] = b[o] + Σ_{c,p,q} w[o,c,p,q] · xf[n, c, (i+p)·wp + j + q].

        xf (N, C, (KH − 1)·wp + kw − 1 + length): the padded input planes flattened, then
        zeros; ``length`` >= (OH − 1)·wp + OW; w (O, C, KH, kw), b (O,), out (N, O, OH, OW).
        Three output channels per pass share every input load (the last block repeats the
        last channel and drops it).
        """
        n_all, c_all = xf.shape[0], xf.shape[1]
        o_all, kh = w.shape[0], w.shape[2]
        oh, ow = out.shape[2], out.shape[3]
        for n in prange(n_all):
            acc = np.empty((3, length), xf.dtype)
            a0, a1, a2 = acc[0], acc[1], acc[2]
            for o0 in range(0, o_all, 3):
                o1, o2 = min(o0 + 1, o_all - 1), min(o0 + 2, o_all - 1)
                a0[:], a1[:], a2[:] = b[o0], b[o1], b[o2]
                for c in range(c_all):
                    xr = xf[n, c]
                    for p in range(kh):
                        xs = xr[p * wp : p * wp + length + kw - 1]
                        w0, w1, w2 = w[o0, c, p], w[o1, c, p], w[o2, c, p]
                        for m in range(length):
                            s0, s1, s2 = a0[m], a1[m], a2[m]
                            for q in range(kw):  # kw is a constant: unrolled
                                v = xs[q + m]
                                s0 += w0[q] * v
                                s1 += w1[q] * v
                                s2 += w2[q] * v
                            a0[m], a1[m], a2[m] = s0, s1, s2
                for t in range(min(3, o_all - o0)):
                    for i in range(oh):
                        for j in range(ow):
                            out[n, o0 + t, i, j] = acc[t, i * wp + j]
        return out

    return conv_forward_flat


@njit(parallel=True, fastmath=True, cache=True)
def weight_grad_partials(xf, dy, wp, length, part, bias_part):
    """part[n, o, c, p, q] = Σ_{i,j} dy[n, o, i, j] · xf[n, c, (i+p)·wp + j + q]; dW = Σ_n part;
    bias_part[n, o] = Σ_{i,j} dy[n, o, i, j]; db = Σ_n bias_part (read while dy is copied).

    xf and ``length`` as for the forward kernel, dy (N, O, OH, OW), part (N, O, C, KH, KW),
    bias_part (N, O).
    Three output channels per pass share every input load (zero rows pad the last block).
    fastmath lets LLVM vectorise the dot products (reassociated sums: results differ from the
    im2col GEMM in the last bits, and are the same for any thread count).
    """
    n_all, c_all = xf.shape[0], xf.shape[1]
    o_all, oh, ow = dy.shape[1], dy.shape[2], dy.shape[3]
    kh, kw = part.shape[3], part.shape[4]
    zero = xf.dtype.type(0)
    for n in prange(n_all):
        d = np.zeros((o_all + 2, length), xf.dtype)
        for o in range(o_all):
            sb = zero
            for i in range(oh):
                for j in range(ow):
                    v = dy[n, o, i, j]
                    d[o, i * wp + j] = v
                    sb += v
            bias_part[n, o] = sb
        for c in range(c_all):
            xr = xf[n, c]
            for p in range(kh):
                for q in range(kw):
                    xs = xr[p * wp + q : p * wp + q + length]
                    for o0 in range(0, o_all, 3):
                        d0, d1, d2 = d[o0], d[o0 + 1], d[o0 + 2]
                        s0, s1, s2 = zero, zero, zero
                        for m in range(length):
                            v = xs[m]
                            s0 += d0[m] * v
                            s1 += d1[m] * v
                            s2 += d2[m] * v
                        part[n, o0, c, p, q] = s0
                        if o0 + 1 < o_all:
                            part[n, o0 + 1, c, p, q] = s1
                        if o0 + 2 < o_all:
                            part[n, o0 + 2, c, p, q] = s2
    return part


# Loop lengths are rounded up to a multiple of this (one AVX-512 vector of float32): no
# scalar remainder iterations (measured ~15% of the weight gradient's time for LeNet's conv1).
LANES = 16


def flat_geometry(hw: tuple[int, int], pad: tuple[int, int], kernel: tuple[int, int]):
    """(wp, length, row): padded row width, rounded loop length, flat buffer length per plane."""
    (h, w), (ph, pw), (kh, kw) = hw, pad, kernel
    hp, wp = h + 2 * ph, w + 2 * pw
    oh, ow = hp - kh + 1, wp - kw + 1
    length = -(-((oh - 1) * wp + ow) // LANES) * LANES
    return wp, length, max(hp * wp, (kh - 1) * wp + kw - 1 + length)


def flat_input(x: np.ndarray, pad: tuple[int, int], kernel: tuple[int, int]) -> np.ndarray:
    """x (N, C, H, W) zero-padded by ``pad`` and flattened per plane, zeros after: (N, C, row)."""
    n, c, h, w = x.shape
    (ph, pw), (wp, _, row) = pad, flat_geometry((h, w), pad, kernel)
    hp = h + 2 * ph
    xf = np.zeros((n, c, row), x.dtype)
    xf[:, :, : hp * wp].reshape(n, c, hp, wp)[:, :, ph : ph + h, pw : pw + w] = x
    return xf


def conv_forward(x, weight, bias, pad) -> tuple[np.ndarray, np.ndarray]:
    """Stride-1, undilated, ungrouped conv of x (N, C, H, W) zero-padded by ``pad``.

    Returns y (N, O, OH, OW) and the flat input (for :func:`conv_weight_grad`).
    """
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    wp, length, _ = flat_geometry((h, w), pad, (kh, kw))
    xf = flat_input(x, pad, (kh, kw))
    b = np.zeros(o, x.dtype) if bias is None else bias
    out = np.empty((n, o, h + 2 * pad[0] - kh + 1, wp - kw + 1), x.dtype)
    forward_kernel(kw)(xf, np.ascontiguousarray(weight), b, wp, length, out)
    return out, xf


def conv_weight_grad(xf, dout, hw, pad, kernel) -> tuple[np.ndarray, np.ndarray]:
    """(dW (O, C, KH, KW), db (O,)) from the flat input of :func:`conv_forward` and dy."""
    n, c = xf.shape[:2]
    o = dout.shape[1]
    wp, length, _ = flat_geometry(hw, pad, kernel)
    part = np.empty((n, o, c, *kernel), xf.dtype)
    bias_part = np.empty((n, o), xf.dtype)
    weight_grad_partials(xf, np.ascontiguousarray(dout, xf.dtype), wp, length, part, bias_part)
    return part.sum(axis=0), bias_part.sum(axis=0)
