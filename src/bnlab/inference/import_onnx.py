"""An ``.onnx`` file -> :class:`Graph` (needs the ``onnx`` package: ``pip install bnlab[onnx]``).

Operators (default ONNX domain, opsets 7-22): Conv, BatchNormalization, Relu, Clip, Sigmoid,
HardSigmoid, HardSwish, Add, Mul, Sub, Div (of two tensors, or of a tensor and a constant),
MaxPool, AveragePool, GlobalAveragePool, ReduceMean (over H and W), Flatten, Reshape / Squeeze
(to (N, features)), Gemm, MatMul, Concat (channels), Dropout, Identity, Softmax, Constant.
Anything else is an :class:`UnsupportedOperatorError` naming the operator and the node.

A file that does not parse, is truncated, or is inconsistent (a node reading a tensor nothing
defines, an attribute of the wrong type, a weight whose data does not match its shape, NaN in a
weight) is a :class:`~bnlab.errors.DataFormatError` naming the file: never a crash.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnlab.errors import BNLabError, DataFormatError
from bnlab.inference import _act
from bnlab.inference._builder import ACTIVATIONS, Builder
from bnlab.inference.graph import Graph, UnsupportedOperatorError

IDENTITY_OPS = ("Identity", "Dropout")


def _onnx():
    try:
        import onnx  # noqa: PLC0415
    except ImportError as err:  # pragma: no cover - the onnx extra is installed in CI
        raise ImportError(
            "reading .onnx files needs the onnx package: pip install 'bnlab[onnx]'"
        ) from err
    return onnx


def load_model(path):
    """The parsed ModelProto of ``path``, or a DataFormatError (never a crash)."""
    onnx = _onnx()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise DataFormatError(f"{path}: not a file")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf's DecodeError, onnx's checks, OSError of external data
        raise DataFormatError(f"{path}: not a readable ONNX model ({_first_line(err)})") from err
    if not model.graph.node:
        raise DataFormatError(f"{path}: not an ONNX model with a graph (no nodes)")
    return model


def from_onnx(path) -> Graph:
    """Read an ONNX file into a graph (see the module doc for what is accepted)."""
    model = load_model(path)
    try:
        return from_model(model, str(path))
    except BNLabError:
        raise
    except Exception as err:  # a malformed model: attribute types, tensor data, references
        raise DataFormatError(f"{path}: malformed ONNX model ({_first_line(err)})") from err


def _first_line(err) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def from_model(model, source: str = "ONNX model") -> Graph:
    onnx = _onnx()
    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    consts = {t.name: _tensor(onnx, t, source) for t in g.initializer}
    inputs = [i for i in g.input if i.name not in consts]
    if len(inputs) != 1:
        raise DataFormatError(
            f"{source}: the model must take one input tensor, it takes {[i.name for i in inputs]}"
        )
    if len(g.output) != 1:
        raise UnsupportedOperatorError(
            f"{source}: the model has {len(g.output)} outputs, the engine runs one"
        )
    b = Builder(source)
    t = _Translator(onnx, b, consts, opset)
    for i, node in enumerate(g.node):
        t.node(node, node.name or f"{node.op_type}_{i}")
    return b.graph(inputs[0].name, g.output[0].name, _in_channels(inputs[0], g, consts, source))


def _tensor(onnx, t, source: str) -> np.ndarray:
    from onnx import numpy_helper  # noqa: PLC0415

    try:
        return numpy_helper.to_array(t)
    except Exception as err:
        raise DataFormatError(
            f"{source}: tensor {t.name!r} is malformed ({_first_line(err)})"
        ) from err


def _in_channels(inp, g, consts, source: str) -> int:
    dims = inp.type.tensor_type.shape.dim
    if len(dims) not in (0, 4):
        raise UnsupportedOperatorError(
            f"{source}: input {inp.name!r} has {len(dims)} dimensions; the engine runs image "
            "batches (N, C, H, W)"
        )
    if len(dims) == 4 and dims[1].HasField("dim_value") and dims[1].dim_value > 0:
        return int(dims[1].dim_value)
    for node in g.node:  # the channels of the first conv that reads the input
        if node.op_type == "Conv" and node.input[0] == inp.name and node.input[1] in consts:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            return int(consts[node.input[1]].shape[1] * group)
    raise DataFormatError(f"{source}: cannot tell the input's channel count")


class _Translator:
    """One ONNX node at a time into the builder."""

    def __init__(self, onnx, b: Builder, consts: dict, opset: int):
        self.onnx, self.b, self.consts, self.opset = onnx, b, consts, opset

    def attrs(self, node) -> dict:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    def const(self, name: str, what: str, node: str) -> np.ndarray:
        if name not in self.consts:
            raise UnsupportedOperatorError(
                f"node {node}: {what} ({name!r}) must be a constant (an initializer)"
            )
        return self.consts[name]

    def node(self, node, name: str) -> None:  # noqa: C901 - one case per operator
        op, b = node.op_type, self.b
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOperatorError(f"unsupported operator {node.domain}.{op} (node {name})")
        a = self.attrs(node)
        ins, out = list(node.input), node.output[0] if node.output else ""
        if not out:
            raise DataFormatError(f"node {name} ({op}) has no output")
        x = ins[0] if ins else ""
        if op == "Constant":
            self.consts[out] = self._constant(a, name)
        elif op in IDENTITY_OPS:
            if len(node.output) > 1 and node.output[1]:
                raise UnsupportedOperatorError(f"node {name}: Dropout's mask output is used")
            if op == "Dropout" and len(ins) > 2 and ins[2] and bool(self.consts.get(ins[2], 0)):
                raise UnsupportedOperatorError(f"node {name}: Dropout in training mode")
            if x in self.consts:  # exporters alias equal initializers through Identity nodes
                self.consts[out] = self.consts[x]
            else:
                b.identity(out, x)
        elif op == "Conv":
            self._conv(node, a, ins, out, name)
        elif op == "BatchNormalization":
            if a.get("training_mode", 0) or len([o for o in node.output if o]) > 1:
                raise UnsupportedOperatorError(f"node {name}: BatchNormalization in training mode")
            if a.get("spatial", 1) != 1:
                raise UnsupportedOperatorError(f"node {name}: BatchNormalization spatial=0")
            p = [
                self.const(v, k, name)
                for v, k in zip(ins[1:5], ("scale", "B", "mean", "var"), strict=True)
            ]
            b.bn(x, out, name, p[2], p[3], p[0], p[1], a.get("epsilon", 1e-5))
        elif op in ("Relu", "Sigmoid", "HardSwish"):
            b.act(x, out, name, ACTIVATIONS[op.lower()])
        elif op == "HardSigmoid":
            b.act(x, out, name, (_act.HARDSIGMOID, a.get("alpha", 0.2), a.get("beta", 0.5)))
        elif op == "Clip":
            lo, hi = (
                (a.get("min", -np.inf), a.get("max", np.inf))
                if self.opset < 11
                else (self._scalar(ins, 1, -np.inf, name), self._scalar(ins, 2, np.inf, name))
            )
            b.act(x, out, name, (_act.CLIP, float(lo), float(hi)))
        elif op in ("Add", "Mul", "Sub", "Div"):
            self._binary(op.lower(), ins, out, name)
        elif op in ("MaxPool", "AveragePool"):
            self._pool(node, a, x, out, name)
        elif op == "GlobalAveragePool":
            b.add("adaptive_avgpool", [x], out, name, output_size=(1, 1))
        elif op == "ReduceMean":
            axes = a.get("axes") or (
                list(self.const(ins[1], "axes", name)) if len(ins) > 1 and ins[1] else None
            )
            if axes is None or sorted(int(v) % 4 for v in axes) != [2, 3]:
                raise UnsupportedOperatorError(
                    f"node {name}: ReduceMean over axes {axes} (only H and W of (N, C, H, W))"
                )
            if a.get("keepdims", 1):
                b.add("adaptive_avgpool", [x], out, name, output_size=(1, 1))
            else:
                b.add("adaptive_avgpool", [x], out + "#pool", name, output_size=(1, 1))
                b.add("flatten", [out + "#pool"], out, name)
        elif op == "Flatten":
            if a.get("axis", 1) != 1:
                raise UnsupportedOperatorError(f"node {name}: Flatten axis={a['axis']} (only 1)")
            b.add("flatten", [x], out, name)
        elif op in ("Reshape", "Squeeze"):
            self._reshape(op, a, ins, out, name)
        elif op == "Gemm":
            self._gemm(a, ins, out, name)
        elif op == "MatMul":
            w = self.const(ins[1], "B", name)
            if w.ndim != 2:
                raise UnsupportedOperatorError(f"node {name}: MatMul with a {w.ndim}-D weight")
            b.add("linear", [x], out, name, {"weight": np.ascontiguousarray(w.T)})
        elif op == "Concat":
            if a.get("axis") != 1:
                raise UnsupportedOperatorError(
                    f"node {name}: Concat axis={a.get('axis')} (only channels, 1)"
                )
            b.add("concat", ins, out, name)
        elif op == "Softmax":
            axis = a.get("axis", 1 if self.opset < 13 else -1)
            if axis not in (1, -1):
                raise UnsupportedOperatorError(f"node {name}: Softmax axis={axis}")
            b.add("softmax", [x], out, name)
        else:
            raise UnsupportedOperatorError(f"unsupported operator {op} (node {name})")

    def _constant(self, a: dict, name: str) -> np.ndarray:
        if "value" in a:
            return _tensor(self.onnx, a["value"], f"node {name}")
        for key in ("value_float", "value_floats", "value_int", "value_ints"):
            if key in a:
                return np.asarray(a[key])
        raise UnsupportedOperatorError(f"node {name}: a Constant of kind {sorted(a)}")

    def _scalar(self, ins, i, default, name):
        if len(ins) <= i or not ins[i]:
            return default
        v = self.const(ins[i], "a bound", name)
        if v.size != 1:
            raise UnsupportedOperatorError(f"node {name}: a non-scalar bound of shape {v.shape}")
        return float(v.reshape(-1)[0])

    def _conv(self, node, a, ins, out, name) -> None:
        w = self.const(ins[1], "weight", name)
        bias = self.const(ins[2], "bias", name) if len(ins) > 2 and ins[2] else None
        k = w.shape[2:]
        if "kernel_shape" in a and tuple(a["kernel_shape"]) != tuple(k):
            raise DataFormatError(
                f"node {name}: kernel_shape {a['kernel_shape']} does not match "
                f"the weight's {tuple(k)}"
            )
        strides, dil = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
        pads = self._pads(a, k, strides, dil, name)
        self.b.conv(ins[0], out, name, w, bias, strides, pads, dil, a.get("group", 1))

    def _pads(self, a, k, strides, dil, name):
        mode = a.get("auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode in ("NOTSET", ""):
            p = a.get("pads", [0, 0, 0, 0])
            return (p[0], p[1], p[2], p[3]) if len(p) == 4 else p
        if mode == "VALID":
            return (0, 0, 0, 0)
        if any(s != 1 for s in strides):  # the padding of a strided SAME depends on the size
            raise UnsupportedOperatorError(
                f"node {name}: auto_pad={mode} with strides {list(strides)}"
            )
        total = [d * (kk - 1) for d, kk in zip(dil, k, strict=True)]
        lo = [t // 2 if mode == "SAME_UPPER" else t - t // 2 for t in total]
        return (lo[0], lo[1], total[0] - lo[0], total[1] - lo[1])

    def _pool(self, node, a, x, out, name) -> None:
        if len(node.output) > 1 and node.output[1]:
            raise UnsupportedOperatorError(f"node {name}: MaxPool's indices output is used")
        k = a["kernel_shape"]
        pads = self._pads(a, k, a.get("strides", [1] * len(k)), a.get("dilations", [1, 1]), name)
        if node.op_type == "MaxPool":
            self.b.pool(
                "maxpool",
                x,
                out,
                name,
                k,
                a.get("strides", [1, 1]),
                pads,
                a.get("dilations", [1, 1]),
                a.get("ceil_mode", 0),
            )
        else:
            self.b.pool(
                "avgpool",
                x,
                out,
                name,
                k,
                a.get("strides", [1, 1]),
                pads,
                ceil_mode=a.get("ceil_mode", 0),
                count_include_pad=a.get("count_include_pad", 0),
            )

    def _binary(self, kind, ins, out, name) -> None:
        xc, yc = ins[0] in self.consts, ins[1] in self.consts
        if not xc and not yc:
            if kind not in ("add", "mul"):
                raise UnsupportedOperatorError(
                    f"unsupported operator {kind.title()} of two tensors (node {name})"
                )
            self.b.add(kind, ins, out, name)
            return
        if xc and yc:
            raise UnsupportedOperatorError(f"node {name}: {kind.title()} of two constants")
        k = np.asarray(self.consts[ins[0] if xc else ins[1]], np.float64)
        var = ins[1] if xc else ins[0]
        flat = k.reshape(-1)
        if k.size != 1 and not (
            k.ndim <= 1
            or (k.ndim >= 3 and k.shape[-2:] == (1, 1))
            or (k.ndim == 2 and k.shape[0] == 1)
        ):
            raise UnsupportedOperatorError(
                f"node {name}: a constant of shape {k.shape} (only "
                "scalars or one value per channel)"
            )
        ones = np.ones_like(flat)
        if kind == "sub":
            scale, shift = (ones, -flat) if yc else (-ones, flat)
        elif kind == "div":
            if xc:
                raise UnsupportedOperatorError(f"node {name}: Div of a constant by a tensor")
            scale, shift = 1.0 / flat, 0.0 * flat
        else:
            scale, shift = (flat, 0.0 * flat) if kind == "mul" else (ones, flat)
        self.b.add("affine", [var], out, name, {"scale": scale, "shift": shift})

    def _reshape(self, op, a, ins, out, name) -> None:
        if op == "Squeeze":
            axes = a.get("axes") or (
                list(self.const(ins[1], "axes", name)) if len(ins) > 1 and ins[1] else None
            )
            if axes is None or sorted(int(v) % 4 for v in axes) != [2, 3]:
                raise UnsupportedOperatorError(f"node {name}: Squeeze axes {axes} (only 2, 3)")
        else:  # (N, features): the batch kept (0), inferred (-1) or given, features inferred
            shape = [int(v) for v in self.const(ins[1], "shape", name)]
            if len(shape) != 2 or not (shape[1] == -1 or shape[0] in (0, -1, 1)):
                raise UnsupportedOperatorError(
                    f"node {name}: Reshape to {shape} (only to (N, features))"
                )
        self.b.add("flatten", [ins[0]], out, name)

    def _gemm(self, a, ins, out, name) -> None:
        if a.get("transA", 0):
            raise UnsupportedOperatorError(f"node {name}: Gemm with transA=1")
        w = self.const(ins[1], "B", name).astype(np.float64) * a.get("alpha", 1.0)
        w = w if a.get("transB", 0) else w.T  # (out, in)
        bias = None
        if len(ins) > 2 and ins[2]:
            c = self.const(ins[2], "C", name).astype(np.float64) * a.get("beta", 1.0)
            bias = np.broadcast_to(
                c.reshape(-1) if c.size > 1 else c.reshape(()), (w.shape[0],)
            ).copy()
        self.b.add(
            "linear",
            [ins[0]],
            out,
            name,
            {
                "weight": w.astype(np.float32),
                "bias": None if bias is None else bias.astype(np.float32),
            },
        )
