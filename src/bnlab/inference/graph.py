"""The engine's network description: a list of nodes in execution order, NCHW semantics.

Every importer (bnlab models and weight files, ``torch.export``, ONNX) produces a :class:`Graph`;
the passes of :mod:`bnlab.inference.passes` fold and fuse it; :mod:`bnlab.inference.reference`
runs it in NumPy (the float64 reference); the engine plans it onto NHWC kernels.

A value is a tensor of shape (N, C, H, W) ("map") or (N, C) ("vector"); N is the batch, known
only when the graph runs. Each node has one output. The operators (``op``) and their fields:

=================  ======================================================================
op                 params (arrays) / attrs
=================  ======================================================================
conv               weight (C_out, C_in/groups, kh, kw), bias (C_out,) or absent;
                   stride (sh, sw), pads (top, left, bottom, right), dilation (dh, dw),
                   groups; after fusion: scale (C_out,) (an unfolded BN), act, and a second
                   input added before the activation (a residual)
linear             weight (C_out, C_in), bias; act (input a vector)
bn                 mean, var, gamma, beta (C,); eps
affine             scale, shift (C,): y = x·scale + shift per channel; act
act                act: (code, a, b) of :mod:`bnlab.inference._act`
add, mul           two inputs of the same shape, or a map and an (N, C, 1, 1) map; add: act
maxpool, avgpool   kernel (kh, kw), stride, pads, dilation (maxpool), ceil_mode,
                   count_include_pad (avgpool)
adaptive_avgpool   output_size (oh, ow)
flatten            (N, C, H, W) -> (N, C·H·W) in NCHW order
concat             inputs joined along the channels
softmax            over the channels of a vector
=================  ======================================================================

(Identity and dropout, which are identities at inference, are dropped by the importers.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnlab.errors import DataFormatError, ShapeError
from bnlab.inference._act import IDENTITY

OPS = (
    "conv",
    "linear",
    "bn",
    "affine",
    "act",
    "add",
    "mul",
    "maxpool",
    "avgpool",
    "adaptive_avgpool",
    "flatten",
    "concat",
    "softmax",
)


class UnsupportedOperatorError(DataFormatError):
    """A network uses an operator (or an operator setting) the engine does not implement."""


@dataclass(eq=False)
class Node:
    """One operator application: ``output = op(*inputs)`` with its arrays and settings."""

    op: str
    inputs: list[str]
    output: str
    name: str
    params: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.op not in OPS:
            raise UnsupportedOperatorError(f"unknown graph operator {self.op!r} (node {self.name})")
        if self.op in ("conv", "linear", "affine", "add") and "act" not in self.attrs:
            self.attrs["act"] = IDENTITY


@dataclass
class Graph:
    """Nodes in execution order from one input (N, in_channels, H, W) to one output."""

    input: str
    output: str
    nodes: list[Node]
    in_channels: int
    source: str = ""  # where the graph came from, for messages

    def producers(self) -> dict[str, Node]:
        return {nd.output: nd for nd in self.nodes}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for nd in self.nodes:
            for v in nd.inputs:
                out.setdefault(v, []).append(nd)
        return out

    def copy(self) -> Graph:
        """A copy whose nodes (and their dicts) can be changed; arrays are shared."""
        nodes = [
            Node(nd.op, list(nd.inputs), nd.output, nd.name, dict(nd.params), dict(nd.attrs))
            for nd in self.nodes
        ]
        return Graph(self.input, self.output, nodes, self.in_channels, self.source)

    def validate(self) -> Graph:
        """Every input defined before use, outputs unique, the output produced."""
        known = {self.input}
        for nd in self.nodes:
            for v in nd.inputs:
                if v not in known:
                    raise DataFormatError(
                        f"node {nd.name} ({nd.op}) reads {v!r}, which no earlier node produces"
                    )
            if nd.output in known:
                raise DataFormatError(f"node {nd.name} ({nd.op}) redefines value {nd.output!r}")
            known.add(nd.output)
            _check_params(nd)
        if self.output not in known:
            raise DataFormatError(f"the graph's output {self.output!r} is never produced")
        return self


def _check_params(nd: Node) -> None:
    """The arrays of a node fit together (what the kernels index by, unchecked)."""
    p = nd.params
    vectors = {"conv": ("bias", "scale"), "linear": ("bias",), "affine": ("scale", "shift"),
               "bn": ("mean", "var", "gamma", "beta")}.get(nd.op, ())  # fmt: skip
    width = None
    if nd.op in ("conv", "linear"):
        w = p["weight"]
        if w.ndim != (4 if nd.op == "conv" else 2):
            raise ShapeError(f"node {nd.name}: a {nd.op} weight of shape {w.shape}")
        if nd.op == "conv" and w.shape[0] % nd.attrs["groups"]:
            raise ShapeError(f"node {nd.name}: {w.shape[0]} output channels, groups "
                             f"{nd.attrs['groups']}")  # fmt: skip
        width = w.shape[0]
    for k in vectors:
        if k in p:
            width = len(p[k]) if width is None else width
            if p[k].shape != (width,):
                raise ShapeError(f"node {nd.name}: {k} of shape {p[k].shape}, expected ({width},)")
    if nd.op == "bn" and (p["var"] < 0).any():
        raise DataFormatError(f"node {nd.name}: a negative running variance")


# --------------------------------------------------------------------------- shapes


def conv_out_hw(h: int, w: int, kernel, stride, pads, dilation=(1, 1), ceil_mode=False):
    """Output (Ho, Wo) of a conv or pooling window on an h x w map (PyTorch's formula)."""
    out = []
    for size, k, s, p0, p1, d in (
        (h, kernel[0], stride[0], pads[0], pads[2], dilation[0]),
        (w, kernel[1], stride[1], pads[1], pads[3], dilation[1]),
    ):
        span = size + p0 + p1 - d * (k - 1) - 1
        o = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (o - 1) * s >= size + p0:  # the last window must start inside
            o -= 1
        out.append(o)
    return out[0], out[1]


def infer_shapes(graph: Graph, h: int, w: int) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of every value for an input (in_channels, h, w): (C, H, W) or (C,)."""
    shapes: dict[str, tuple[int, ...]] = {graph.input: (graph.in_channels, h, w)}
    for nd in graph.nodes:
        ins = [shapes[v] for v in nd.inputs]
        try:
            shapes[nd.output] = _node_shape(nd, ins)
        except ShapeError as err:
            raise ShapeError(f"node {nd.name} ({nd.op}): {err}") from None
    return shapes


def _node_shape(nd: Node, ins: list[tuple[int, ...]]) -> tuple[int, ...]:
    op, a = nd.op, nd.attrs
    x = ins[0]
    if op == "conv":
        wt = nd.params["weight"]
        _need_map(x, "a conv")
        if x[0] != wt.shape[1] * a["groups"]:
            raise ShapeError(f"expects {wt.shape[1] * a['groups']} input channels, got {x[0]}")
        ho, wo = conv_out_hw(x[1], x[2], wt.shape[2:], a["stride"], a["pads"], a["dilation"])
        if ho < 1 or wo < 1:
            raise ShapeError(f"the {x[1]}x{x[2]} input is smaller than the {wt.shape[2:]} kernel")
        return (wt.shape[0], ho, wo)
    if op == "linear":
        if len(x) != 1 or x[0] != nd.params["weight"].shape[1]:
            raise ShapeError(f"expects {nd.params['weight'].shape[1]} features, got shape {x}")
        return (nd.params["weight"].shape[0],)
    if op in ("bn", "affine"):
        c = len(nd.params["scale" if op == "affine" else "mean"])
        if x[0] != c and not (op == "affine" and c == 1):  # one value for every channel
            raise ShapeError(f"has {c} channels, its input {x[0]}")
        return x
    if op == "act" or op == "softmax":
        return x
    if op in ("add", "mul"):
        return _broadcast(ins[0], ins[1], op)
    if op in ("maxpool", "avgpool"):
        _need_map(x, "pooling")
        ho, wo = conv_out_hw(
            x[1],
            x[2],
            a["kernel"],
            a["stride"],
            a["pads"],
            a.get("dilation", (1, 1)),
            a.get("ceil_mode", False),
        )
        if ho < 1 or wo < 1:
            raise ShapeError(f"the {x[1]}x{x[2]} input is smaller than the window {a['kernel']}")
        return (x[0], ho, wo)
    if op == "adaptive_avgpool":
        _need_map(x, "pooling")
        return (x[0], *a["output_size"])
    if op == "flatten":
        return (int(np.prod(x)),)
    if op == "concat":
        if any(s[1:] != x[1:] for s in ins):
            raise ShapeError(f"concatenates inputs of different sizes {ins}")
        return (sum(s[0] for s in ins), *x[1:])
    raise UnsupportedOperatorError(f"no shape rule for {op}")


def _need_map(x, what: str) -> None:
    if len(x) != 3:
        raise ShapeError(f"{what} needs a (N, C, H, W) input, got (N, {', '.join(map(str, x))})")


def _broadcast(x, y, op: str):
    if x == y:
        return x
    if len(x) == 3 and y == (x[0], 1, 1):
        return x
    if len(y) == 3 and x == (y[0], 1, 1):
        return y
    raise ShapeError(
        f"{op} of shapes (N, {x}) and (N, {y}): only equal shapes or a per-channel "
        "(N, C, 1, 1) factor are supported"
    )
