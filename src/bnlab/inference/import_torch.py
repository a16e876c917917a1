"""A ``torch.nn.Module`` in eval mode -> :class:`Graph`, captured with ``torch.export``.

``torch.export.export(model, (example,))`` traces the model's forward into ATen operators
(``aten.conv2d``, ``aten.batch_norm``, ``aten.relu_``, ...) whatever Python it is written in;
each operator is mapped to a graph node here. In-place operators (``relu_``, ``add_``) mutate
their first input: later reads of that input read the result, as in PyTorch.

The example input is (2, C, H, W): C from ``input_shape`` or the first Conv2d's ``in_channels``,
H = W = 224 by default. Shapes the model computes from the example (a ``view`` with constant
sizes) are fixed by it; the engine checks them when it plans another input size.
"""

from __future__ import annotations

import numpy as np

from bnlab.errors import DataFormatError
from bnlab.inference import _act
from bnlab.inference._builder import ACTIVATIONS, Builder, pads4
from bnlab.inference.graph import Graph, UnsupportedOperatorError

IDENTITY_OPS = {
    "dropout",
    "dropout_",
    "alpha_dropout",
    "feature_dropout",
    "clone",
    "contiguous",
    "detach",
    "alias",
    "_assert_tensor_metadata",
}
ACT_OPS = {
    "relu": "relu",
    "relu_": "relu",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "silu": "silu",
    "silu_": "silu",
    "hardswish": "hardswish",
    "hardswish_": "hardswish",
    "hardsigmoid": "hardsigmoid",
    "hardsigmoid_": "hardsigmoid",
    "relu6": "relu6",
}


def check_eval_mode(model) -> None:
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            "compile needs a model in eval mode: in training mode BN normalizes with batch "
            f"statistics and dropout is active. Call model.eval() first (in training mode: "
            f"{', '.join(training[:5])}{', ...' if len(training) > 5 else ''})"
        )


def default_input_shape(model) -> tuple[int, int, int]:
    import torch  # noqa: PLC0415

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return (m.in_channels, 224, 224)
    raise ValueError(
        "cannot tell the model's input channels (it has no Conv2d): pass input_shape=(C, H, W)"
    )


def from_torch(model, input_shape=None) -> Graph:
    """Capture ``model`` (eval mode) with torch.export and translate it into a Graph."""
    import torch  # noqa: PLC0415

    check_eval_mode(model)
    shape = tuple(input_shape) if input_shape is not None else default_input_shape(model)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    example = torch.zeros((2, *shape), dtype=_dtype_of(model))
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (example,))
    except Exception as err:  # export reports untraceable Python in many exception types
        raise DataFormatError(
            f"torch.export could not capture {type(model).__name__} on an input of shape "
            f"{tuple(example.shape)}: {str(err).strip().splitlines()[0] if str(err) else err!r} "
            "(pass input_shape=(C, H, W) if the model needs another size)"
        ) from err
    return _translate(ep, type(model).__name__, shape[0])


def _dtype_of(model):
    import torch  # noqa: PLC0415

    for p in model.parameters():
        return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.float32


def _constants(ep) -> tuple[dict, list[str]]:
    """placeholder name -> array for parameters, buffers and constants; the user inputs."""
    consts, users = {}, []
    for spec in ep.graph_signature.input_specs:
        kind, name, target = spec.kind.name, spec.arg.name, spec.target
        if kind == "USER_INPUT":
            users.append(name)
        elif target in ep.state_dict:
            consts[name] = ep.state_dict[target]
        elif target in ep.constants:
            consts[name] = ep.constants[target]
        else:  # pragma: no cover - torch.export always lifts them into one of the two
            raise DataFormatError(f"torch.export input {name} ({kind}) has no value")
    return consts, users


def _translate(ep, source: str, in_channels: int) -> Graph:
    consts, users = _constants(ep)
    if len(users) != 1:
        raise DataFormatError(
            f"{source}: the model must take one input tensor, it takes {len(users)}"
        )
    b = Builder(source)
    out = None
    for node in ep.graph.nodes:
        if node.op == "call_function":
            _call(b, node, consts)
        elif node.op == "output":
            res = node.args[0]
            if len(res) != 1:
                raise UnsupportedOperatorError(
                    f"{source}: the model returns {len(res)} outputs, the engine runs one"
                )
            out = str(res[0])
    return b.graph(users[0], out, in_channels)


def _bound(node) -> dict:
    """The operator's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    args = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            args[a.name] = node.args[i]
        elif a.name in node.kwargs:
            args[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            args[a.name] = a.default_value
    return args


def _ref(v) -> str:
    return v.name if hasattr(v, "name") else str(v)


def _tensor(v, consts, what, node):
    if hasattr(v, "name") and v.name in consts:
        return consts[v.name]
    raise UnsupportedOperatorError(
        f"node {node}: {what} must be a constant (a parameter or a "
        "buffer), it is computed by the model"
    )


def _channels(node) -> int:
    val = node.meta.get("val")
    return int(val.shape[1]) if val is not None and len(val.shape) > 1 else 0


def _call(b: Builder, node, consts) -> None:
    name = node.name
    op = getattr(node.target, "__name__", str(node.target))
    if op == "getitem":  # the first output of a tuple-returning op (batch norm)
        src, idx = node.args
        if idx == 0:
            b.identity(name, _ref(src))
        return
    if not hasattr(node.target, "_schema"):
        raise UnsupportedOperatorError(f"unsupported operator {op} (node {name})")
    base = node.target._schema.name.split("::")[-1]
    a = _bound(node)
    x = _ref(next(iter(a.values()))) if a else ""
    _translate_op(b, node, base, a, x, consts)
    if base.endswith("_") and not base.startswith("_") and b.value(name) != b.value(x):
        b.alias[b.value(x)] = name  # in place: later reads of the input read the result


def _translate_op(b: Builder, node, base: str, a: dict, x: str, consts) -> None:  # noqa: C901
    name = node.name
    if base in IDENTITY_OPS:
        if a.get("train", False):
            raise UnsupportedOperatorError(f"node {name}: {base} in training mode")
        b.identity(name, x)
    elif base == "conv2d" or base == "convolution":
        if a.get("transposed", False):
            raise UnsupportedOperatorError(f"unsupported operator conv_transpose (node {name})")
        pad = a["padding"]
        if isinstance(pad, str):
            pad = _same_pads(pad, a, consts, node)
        bias = None if a["bias"] is None else _tensor(a["bias"], consts, "bias", name)
        b.conv(
            x,
            name,
            name,
            _tensor(a["weight"], consts, "weight", name),
            bias,
            a["stride"],
            pads4(pad, name),
            a["dilation"],
            a["groups"],
        )
    elif base in ("batch_norm", "_native_batch_norm_legit_no_training"):
        if a.get("training", False):
            raise UnsupportedOperatorError(f"node {name}: batch_norm in training mode")
        if a["running_mean"] is None:
            raise UnsupportedOperatorError(f"node {name}: batch_norm without running statistics")
        opt = {
            k: None if a[k] is None else _tensor(a[k], consts, k, name)
            for k in ("weight", "bias", "running_mean", "running_var")
        }
        b.bn(
            x,
            name,
            name,
            opt["running_mean"],
            opt["running_var"],
            opt["weight"],
            opt["bias"],
            a["eps"],
        )
    elif base in ACT_OPS:
        b.act(x, name, name, ACTIVATIONS[ACT_OPS[base]])
    elif base in ("hardtanh", "hardtanh_", "clamp", "clamp_"):
        lo = a.get("min_val", a.get("min"))
        hi = a.get("max_val", a.get("max"))
        if hasattr(lo, "name") or hasattr(hi, "name"):
            raise UnsupportedOperatorError(f"node {name}: {base} with tensor bounds")
        b.act(
            x,
            name,
            name,
            (_act.CLIP, -np.inf if lo is None else float(lo), np.inf if hi is None else float(hi)),
        )
    elif base in ("add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"):
        _binary(b, node, base.rstrip("_"), a, consts)
    elif base == "max_pool2d":
        b.pool(
            "maxpool",
            x,
            name,
            name,
            a["kernel_size"],
            a["stride"],
            a["padding"],
            a["dilation"],
            a["ceil_mode"],
        )
    elif base == "avg_pool2d":
        if a.get("divisor_override") is not None:
            raise UnsupportedOperatorError(f"node {name}: avg_pool2d with divisor_override")
        b.pool(
            "avgpool",
            x,
            name,
            name,
            a["kernel_size"],
            a["stride"],
            a["padding"],
            ceil_mode=a["ceil_mode"],
            count_include_pad=a["count_include_pad"],
        )
    elif base in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d"):
        size = a["output_size"]
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        b.add("adaptive_avgpool", [x], name, name, output_size=size)
    elif base == "mean":
        _mean(b, node, a, x)
    elif base == "flatten":
        ndim = len(node.args[0].meta["val"].shape)
        start, end = a["start_dim"] % ndim, a["end_dim"] % ndim
        if (start, end) == (1, ndim - 1):
            b.add("flatten", [x], name, name) if ndim > 2 else b.identity(name, x)
        else:
            raise UnsupportedOperatorError(f"node {name}: flatten({start}, {end}) (only 1..-1)")
    elif base in ("view", "reshape", "_unsafe_view"):
        _reshape(b, node, x)
    elif base == "linear":
        bias = None if a["bias"] is None else _tensor(a["bias"], consts, "bias", name)
        b.add(
            "linear",
            [x],
            name,
            name,
            {"weight": _tensor(a["weight"], consts, "weight", name), "bias": bias},
        )
    elif base == "cat":
        dim = a["dim"] % len(node.meta["val"].shape)
        if dim != 1:
            raise UnsupportedOperatorError(f"node {name}: cat along dim {dim} (only channels)")
        b.add("concat", [_ref(t) for t in a["tensors"]], name, name)
    elif base in ("softmax", "_softmax"):
        shape = node.meta["val"].shape
        if len(shape) != 2 or a["dim"] % 2 != 1:
            raise UnsupportedOperatorError(
                f"node {name}: softmax over dim {a['dim']} of a "
                f"{len(shape)}-D tensor (only classes of (N, C))"
            )
        b.add("softmax", [x], name, name)
    elif base in ("sym_size", "size"):
        return  # an integer for a view's shape
    else:
        raise UnsupportedOperatorError(f"unsupported operator {base} (node {name})")


def _binary(b: Builder, node, kind, a, consts) -> None:
    name = node.name
    x, y = a["self"], a["other"]
    if a.get("alpha", 1) != 1:
        raise UnsupportedOperatorError(f"node {name}: {kind} with alpha != 1")
    xc = isinstance(x, (int, float)) or (hasattr(x, "name") and x.name in consts)
    yc = isinstance(y, (int, float)) or (hasattr(y, "name") and y.name in consts)
    if not xc and not yc:
        if kind not in ("add", "mul"):
            raise UnsupportedOperatorError(
                f"unsupported operator {kind} of two tensors (node {name})"
            )
        b.add(kind, [_ref(x), _ref(y)], name, name)
        return
    if xc and yc:
        raise UnsupportedOperatorError(f"node {name}: {kind} of two constants")
    const, var = (x, y) if xc else (y, x)
    c = _channels(node)
    k = np.asarray(consts[const.name] if hasattr(const, "name") else const, np.float64)
    k = _per_channel_constant(k, c, name)
    if kind == "sub":
        scale, shift = (np.ones(c), -k) if yc else (-np.ones(c), k)
    elif kind == "div":
        if xc:
            raise UnsupportedOperatorError(f"node {name}: division of a constant by a tensor")
        scale, shift = 1.0 / k, np.zeros(c)
    else:
        scale, shift = (k, np.zeros(c)) if kind == "mul" else (np.ones(c), k)
    b.add(
        "affine",
        [_ref(var)],
        name,
        name,
        {"scale": scale.astype(np.float64), "shift": shift.astype(np.float64)},
    )


def _per_channel_constant(k: np.ndarray, c: int, name: str) -> np.ndarray:
    if k.size == 1:
        return np.full(c, float(k.reshape(-1)[0]))
    flat = k.reshape(-1)
    if flat.size == c and (k.ndim == 1 or k.shape[-2:] == (1, 1) or k.ndim == 2):
        return flat
    raise UnsupportedOperatorError(
        f"node {name}: a constant of shape {k.shape} (only scalars or one value per channel)"
    )


def _mean(b: Builder, node, a, x) -> None:
    ndim = len(node.args[0].meta["val"].shape)
    dims = sorted(d % ndim for d in (a["dim"] or range(ndim)))
    if ndim != 4 or dims != [2, 3]:
        raise UnsupportedOperatorError(
            f"node {node.name}: mean over dims {dims} (only the spatial dims of (N, C, H, W))"
        )
    if a.get("keepdim", False):
        b.add("adaptive_avgpool", [x], node.name, node.name, output_size=(1, 1))
    else:
        b.add("adaptive_avgpool", [x], node.name + "_pool", node.name, output_size=(1, 1))
        b.add("flatten", [node.name + "_pool"], node.name, node.name)


def _reshape(b: Builder, node, x) -> None:
    src, dst = node.args[0].meta["val"].shape, node.meta["val"].shape
    if len(dst) == 2 and len(src) >= 2 and int(np.prod(src[1:])) == dst[1]:
        if len(src) == 2:
            b.identity(node.name, x)
        else:
            b.add("flatten", [x], node.name, node.name)
        return
    raise UnsupportedOperatorError(
        f"node {node.name}: reshape {tuple(src)} -> {tuple(dst)} "
        "(only flattening (N, ...) to (N, features))"
    )


def _same_pads(mode: str, a, consts, node) -> tuple[int, int, int, int]:
    if mode == "valid":
        return (0, 0, 0, 0)
    w = _tensor(a["weight"], consts, "weight", node.name)
    kh, kw = w.shape[2:]
    dh, dw = a["dilation"] if len(a["dilation"]) == 2 else a["dilation"] * 2
    th, tw = dh * (kh - 1), dw * (kw - 1)  # PyTorch's "same": the extra pixel goes bottom/right
    return th // 2, tw // 2, th - th // 2, tw - tw // 2
