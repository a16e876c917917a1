"""The slow, obvious evaluation of a :class:`~bnlab.inference.graph.Graph` in NumPy, NCHW.

Every operator is written the textbook way (padding with ``np.pad``, a convolution as a sum over
kernel taps of strided slices times the tap's weights, pooling over a stack of window slices),
in float64 by default or float32 on request. It is what the engine's kernels are tested against
and what the fold certificate measures with.
"""

from __future__ import annotations

import numpy as np

from bnlab.inference import _act
from bnlab.inference.graph import Graph, Node, conv_out_hw


def run(graph: Graph, x: np.ndarray, dtype=np.float64, keep: bool = False):
    """The graph's output for input x (N, C, H, W), computed in ``dtype``; with ``keep``, a dict
    of every value (by name) instead."""
    values = {graph.input: np.asarray(x, dtype)}
    for nd in graph.nodes:
        values[nd.output] = node_forward(nd, [values[v] for v in nd.inputs], dtype)
    return values if keep else values[graph.output]


def node_forward(nd: Node, ins: list[np.ndarray], dtype=np.float64) -> np.ndarray:
    """One node on its input arrays, in ``dtype``."""
    p = {k: np.asarray(v, dtype) for k, v in nd.params.items()}
    a = nd.attrs
    x = ins[0]
    if nd.op == "conv":
        y = conv2d(x, p["weight"], a["stride"], a["pads"], a["dilation"], a["groups"])
        if "scale" in p:
            y = y * p["scale"][:, None, None]
        if "bias" in p:
            y = y + p["bias"][:, None, None]
        if len(ins) > 1:
            y = y + ins[1]
        return _act.reference(y, a["act"]).astype(dtype, copy=False)
    if nd.op == "linear":
        y = x @ p["weight"].T + (p["bias"] if "bias" in p else 0)
        return _act.reference(y, a["act"]).astype(dtype, copy=False)
    if nd.op == "bn":
        return batch_norm(x, p["mean"], p["var"], p["gamma"], p["beta"], a["eps"])
    if nd.op == "affine":
        y = x * _per_channel(p["scale"], x) + _per_channel(p["shift"], x)
        return _act.reference(y, a["act"]).astype(dtype, copy=False)
    if nd.op == "act":
        return _act.reference(x, a["act"]).astype(dtype, copy=False)
    if nd.op == "add":
        return _act.reference(ins[0] + ins[1], a["act"]).astype(dtype, copy=False)
    if nd.op == "mul":
        return ins[0] * ins[1]
    if nd.op == "maxpool":
        return max_pool(
            x,
            a["kernel"],
            a["stride"],
            a["pads"],
            a.get("dilation", (1, 1)),
            a.get("ceil_mode", False),
        )
    if nd.op == "avgpool":
        return avg_pool(
            x,
            a["kernel"],
            a["stride"],
            a["pads"],
            a.get("ceil_mode", False),
            a.get("count_include_pad", True),
        )
    if nd.op == "adaptive_avgpool":
        return adaptive_avg_pool(x, a["output_size"])
    if nd.op == "flatten":
        return x.reshape(x.shape[0], -1)
    if nd.op == "concat":
        return np.concatenate(ins, axis=1)
    if nd.op == "softmax":
        z = x - x.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    raise NotImplementedError(nd.op)  # pragma: no cover - Node validates op


def _per_channel(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def conv2d(x, w, stride, pads, dilation=(1, 1), groups=1):
    """y[n, o] = Σ_{c in o's group, i, j} w[o, c, i, j] · xp[n, c, oh·sh + i·dh, ow·sw + j·dw],
    xp = x zero-padded by pads (top, left, bottom, right). x (N, C, H, W), w (O, C/g, kh, kw)."""
    pt, pl, pb, pr = pads
    (sh, sw), (dh, dw) = stride, dilation
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho, wo = conv_out_hw(h, wd, (kh, kw), stride, pads, dilation)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    wg = w.reshape(groups, o // groups, cg, kh, kw)
    y = np.zeros((n, groups, ho * wo, o // groups), x.dtype)
    for i in range(kh):
        for j in range(kw):
            tap = xp[
                :,
                :,
                i * dh : i * dh + sh * (ho - 1) + 1 : sh,
                j * dw : j * dw + sw * (wo - 1) + 1 : sw,
            ]
            tap = np.ascontiguousarray(tap.reshape(n, groups, cg, ho * wo).transpose(0, 1, 3, 2))
            y += tap @ np.ascontiguousarray(wg[:, :, :, i, j].transpose(0, 2, 1))  # (G, C/g, O/g)
    return y.transpose(0, 1, 3, 2).reshape(n, o, ho, wo)


def batch_norm(x, mean, var, gamma, beta, eps):
    """Inference BN: (x − μ) / sqrt(σ² + ε) · γ + β per channel (axis 1)."""

    def c(v):
        return _per_channel(v, x)

    return (x - c(mean)) / np.sqrt(c(var) + eps) * c(gamma) + c(beta)


def _windows(x, kernel, stride, pads, dilation, ceil_mode, fill):
    """The kh·kw window taps of every output position: (kh·kw, N, C, Ho, Wo), padding = fill
    (and, in ceil mode, as much more on the bottom/right as the last windows reach)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    h, w = x.shape[2:]
    ho, wo = conv_out_hw(h, w, kernel, stride, pads, dilation, ceil_mode)
    pt, pl = pads[0], pads[1]
    pb = max(pads[2], (ho - 1) * sh + (kh - 1) * dh + 1 - h - pt)
    pr = max(pads[3], (wo - 1) * sw + (kw - 1) * dw + 1 - w - pl)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=fill)
    return np.stack(
        [
            xp[
                :,
                :,
                i * dh : i * dh + sh * (ho - 1) + 1 : sh,
                j * dw : j * dw + sw * (wo - 1) + 1 : sw,
            ]
            for i in range(kh)
            for j in range(kw)
        ]
    )


def max_pool(x, kernel, stride, pads, dilation=(1, 1), ceil_mode=False):
    """Max over each window; padding never wins (it is −inf)."""
    return _windows(x, kernel, stride, pads, dilation, ceil_mode, -np.inf).max(axis=0)


def avg_pool(x, kernel, stride, pads, ceil_mode=False, count_include_pad=True):
    """Mean over each window, PyTorch's divisor: the window clipped to the padded map
    (count_include_pad) or to the map itself."""
    total = _windows(x, kernel, stride, pads, (1, 1), ceil_mode, 0.0).sum(axis=0)
    h, w = x.shape[2:]
    ho, wo = total.shape[2:]
    div = np.empty((ho, wo))
    for oh in range(ho):
        for ow in range(wo):
            h0, w0 = oh * stride[0] - pads[0], ow * stride[1] - pads[1]
            h1, w1 = min(h0 + kernel[0], h + pads[2]), min(w0 + kernel[1], w + pads[3])
            if count_include_pad:
                div[oh, ow] = (h1 - h0) * (w1 - w0)
            else:
                div[oh, ow] = (min(h1, h) - max(h0, 0)) * (min(w1, w) - max(w0, 0))
    return (total / div).astype(x.dtype, copy=False)


def adaptive_avg_pool(x, output_size):
    """Mean over rows [floor(i·H/oh), ceil((i+1)·H/oh)) and likewise columns."""
    h, w = x.shape[2:]
    oh, ow = output_size
    out = np.empty(x.shape[:2] + (oh, ow), x.dtype)
    for i in range(oh):
        h0, h1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out
