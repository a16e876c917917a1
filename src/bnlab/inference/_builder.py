"""Shared by the importers: building a :class:`Graph` node by node, with settings normalized and
checked once (so torch.export, ONNX and bnlab models produce the same node forms)."""

from __future__ import annotations

import numpy as np

from bnlab.errors import DataFormatError
from bnlab.inference import _act
from bnlab.inference.graph import Graph, Node, UnsupportedOperatorError


def pair(v, what: str, node: str) -> tuple[int, int]:
    """An int or a 1- or 2-element sequence of positive ints -> (a, b)."""
    v = [int(v)] if isinstance(v, (int, np.integer)) else [int(x) for x in v]
    if len(v) not in (1, 2):
        raise UnsupportedOperatorError(f"node {node}: {what} {v} is not 2-D (only 2-D ops run)")
    if min(v) < 1:
        raise DataFormatError(f"node {node}: {what} must be positive, got {v}")
    return (v[0], v[-1])


def pads4(v, node: str) -> tuple[int, int, int, int]:
    """Padding as (top, left, bottom, right) from an int, (ph, pw) or ONNX's (t, l, b, r)."""
    v = [int(v)] if isinstance(v, (int, np.integer)) else [int(x) for x in v]
    if len(v) not in (1, 2, 4):
        raise UnsupportedOperatorError(f"node {node}: padding {v} is not 2-D")
    if min(v) < 0:
        raise DataFormatError(f"node {node}: padding must be >= 0, got {v}")
    return (v[0],) * 4 if len(v) == 1 else (v[0], v[1], v[0], v[1]) if len(v) == 2 else tuple(v)


class Builder:
    """Collects nodes; identities become aliases (a later read of the alias reads the source)."""

    def __init__(self, source: str):
        self.source = source
        self.nodes: list[Node] = []
        self.alias: dict[str, str] = {}
        self.channels: dict[str, int] = {}  # known channel counts (for per-channel constants)

    def value(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def identity(self, out: str, inp: str) -> None:
        self.alias[out] = self.value(inp)

    def add(self, op: str, inputs, output: str, name: str, params=None, **attrs) -> Node:
        params = {k: _array(v, k, name) for k, v in (params or {}).items() if v is not None}
        nd = Node(op, [self.value(v) for v in inputs], output, name, params, attrs)
        self.nodes.append(nd)
        return nd

    def conv(self, x, out, name, weight, bias=None, stride=1, pads=0, dilation=1, groups=1):
        w = _array(weight, "weight", name)
        if w.ndim != 4:
            raise UnsupportedOperatorError(
                f"node {name}: only 2-D convolutions run, got a weight of shape {w.shape}"
            )
        if 0 in w.shape:
            raise DataFormatError(f"node {name}: an empty conv weight of shape {w.shape}")
        groups = int(groups)
        if groups < 1 or w.shape[0] % groups:
            raise DataFormatError(f"node {name}: {w.shape[0]} output channels, groups={groups}")
        return self.add(
            "conv",
            [x],
            out,
            name,
            {"weight": w, "bias": bias},
            stride=pair(stride, "stride", name),
            pads=pads4(pads, name),
            dilation=pair(dilation, "dilation", name),
            groups=groups,
        )

    def bn(self, x, out, name, mean, var, gamma, beta, eps):
        c = _array(mean, "running_mean", name).shape[0]
        gamma = np.ones(c, np.float32) if gamma is None else gamma
        beta = np.zeros(c, np.float32) if beta is None else beta
        return self.add(
            "bn",
            [x],
            out,
            name,
            {"mean": mean, "var": var, "gamma": gamma, "beta": beta},
            eps=float(eps),
        )

    def act(self, x, out, name, act) -> Node:
        return self.add("act", [x], out, name, act=act)

    def pool(
        self,
        op,
        x,
        out,
        name,
        kernel,
        stride=None,
        pads=0,
        dilation=1,
        ceil_mode=False,
        count_include_pad=True,
    ):
        kernel = pair(kernel, "kernel", name)
        stride = (
            kernel
            if stride is None or (hasattr(stride, "__len__") and len(stride) == 0)
            else pair(stride, "stride", name)
        )
        attrs = {
            "kernel": kernel,
            "stride": stride,
            "pads": pads4(pads, name),
            "ceil_mode": bool(ceil_mode),
        }
        if op == "maxpool":
            attrs["dilation"] = pair(dilation, "dilation", name)
        else:
            attrs["count_include_pad"] = bool(count_include_pad)
        return self.add(op, [x], out, name, **attrs)

    def graph(self, inp: str, out: str, in_channels: int) -> Graph:
        g = Graph(inp, self.value(out), self.nodes, int(in_channels), self.source)
        return g.validate()


def _array(v, what: str, node: str) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    a = np.asarray(v)
    if not np.issubdtype(a.dtype, np.floating):
        raise DataFormatError(f"node {node}: {what} must be floating point, got dtype {a.dtype}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise DataFormatError(f"node {node}: {what} contains NaN or Inf")
    return a


ACTIVATIONS = {  # name -> activation, for importers that name them
    "relu": _act.RELU,
    "relu6": _act.RELU6,
    "sigmoid": (_act.SIGMOID, 0.0, 0.0),
    "silu": (_act.SILU, 0.0, 0.0),
    "hardswish": (_act.HARDSWISH, 1.0 / 6.0, 0.5),
    "hardsigmoid": (_act.HARDSIGMOID, 1.0 / 6.0, 0.5),
}
