"""bnlab's own networks -> :class:`Graph`: ``bnlab.nn`` models, weight files and training runs.

* a bottleneck ResNet as a state dict (torchvision names; a file, a bnlab ``ResNet`` or any
  mapping), checked key by key against :mod:`bnlab.inference.spec`, BN given or folded;
* a ``bnlab.nn`` model made of ``Sequential``s of Conv2d, BatchNorm1d/2d, ReLU, Sigmoid,
  pooling, Flatten, Linear, Identity (LeNet and LeNet-BN);
* a training run folder or its checkpoint (``bnlab train``): the model it names, its weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnlab.errors import DataFormatError
from bnlab.inference import _act
from bnlab.inference._builder import Builder
from bnlab.inference.graph import Graph, UnsupportedOperatorError
from bnlab.inference.spec import ResNetSpec, check_state_dict, spec_for, to_numpy_state_dict

DEFAULT_EPS = 1e-5


def from_resnet_state_dict(sd: dict[str, np.ndarray], eps: float = DEFAULT_EPS) -> Graph:
    """The graph of a bottleneck ResNet's weights (checked against its spec first)."""
    spec = spec_for(sd)
    check_state_dict(sd, spec)
    return resnet_graph(sd, spec, eps)


def resnet_graph(sd, spec: ResNetSpec, eps: float) -> Graph:
    b = Builder("bottleneck ResNet weights")

    def conv_bn(cv, x, act=_act.IDENTITY) -> str:
        b.conv(
            x,
            cv.conv,
            cv.conv,
            sd[f"{cv.conv}.weight"],
            sd.get(f"{cv.conv}.bias"),
            cv.stride,
            cv.pad,
        )
        out = cv.conv
        if f"{cv.bn}.running_mean" in sd:
            b.bn(
                out,
                cv.bn,
                cv.bn,
                *(sd[f"{cv.bn}.{p}"] for p in ("running_mean", "running_var", "weight", "bias")),
                eps,
            )
            out = cv.bn
        if act != _act.IDENTITY:
            b.act(out, f"{out}.relu", f"{out}.relu", act)
            out = f"{out}.relu"
        return out

    x = conv_bn(spec.stem, "x", _act.RELU)
    b.pool("maxpool", x, "maxpool", "maxpool", 3, 2, 1)
    x = "maxpool"
    for blk in spec.blocks:
        t = conv_bn(blk.conv2, conv_bn(blk.conv1, x, _act.RELU), _act.RELU)
        t = conv_bn(blk.conv3, t)
        identity = conv_bn(blk.downsample, x) if blk.downsample else x
        b.add("add", [t, identity], f"{blk.name}.add", f"{blk.name}.add", act=_act.RELU)
        x = f"{blk.name}.add"
    b.add("adaptive_avgpool", [x], "avgpool", "avgpool", output_size=(1, 1))
    b.add("flatten", ["avgpool"], "flatten", "flatten")
    b.add("linear", ["flatten"], "fc", "fc", {"weight": sd["fc.weight"], "bias": sd["fc.bias"]})
    return b.graph("x", "fc", 3)


def from_bnlab_module(model) -> Graph:
    """A ``bnlab.nn`` model (eval mode) as a graph."""
    from bnlab import nn  # noqa: PLC0415
    from bnlab.models.resnet import ResNet  # noqa: PLC0415

    training = [
        name or "<root>"
        for name, m in model.named_modules()
        if m.training and hasattr(m, "running_mean")
    ]  # what training mode changes
    if training:
        raise ValueError(
            "compile needs a model in eval mode (BN in training mode normalizes with"
            f" batch statistics): call model.eval() first (in training mode: "
            f"{', '.join(training[:5])})"
        )
    if isinstance(model, ResNet):
        eps = {float(m.eps) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
        if len(eps) > 1:
            raise ValueError(f"the model's BN layers use different eps values {sorted(eps)}")
        return from_resnet_state_dict(to_numpy_state_dict(model), eps.pop() if eps else 1e-5)
    b = Builder(type(model).__name__)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise UnsupportedOperatorError(
            f"{type(model).__name__}: no Conv2d, so not a CNN the "
            "engine can run (its input must be an image batch)"
        )
    out = _walk(b, model, "x", "")
    return b.graph("x", out, first_conv.in_channels)


def _walk(b: Builder, m, x: str, name: str) -> str:  # noqa: C901 - one case per module
    from bnlab import nn  # noqa: PLC0415

    out = name or "output"
    if isinstance(m, nn.Sequential):
        for child_name, child in m.named_children():
            x = _walk(b, child, x, f"{name}.{child_name}" if name else child_name)
        return x
    if isinstance(m, nn.Conv2d):
        bias = None if m.bias is None else m.bias.data
        b.conv(x, out, out, m.weight.data, bias, m.stride, m.padding, m.dilation, m.groups)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not m.track_running_stats:
            raise UnsupportedOperatorError(f"module {out}: BN without running statistics")
        g, bt = (m.weight.data, m.bias.data) if m.affine else (None, None)
        b.bn(x, out, out, m.running_mean, m.running_var, g, bt, m.eps)
    elif isinstance(m, nn.ReLU):
        b.act(x, out, out, _act.RELU)
    elif isinstance(m, nn.Sigmoid):
        b.act(x, out, out, (_act.SIGMOID, 0.0, 0.0))
    elif isinstance(m, nn.MaxPool2d):
        b.pool("maxpool", x, out, out, m.kernel_size, m.stride, m.padding)
    elif isinstance(m, nn.AvgPool2d):
        b.pool("avgpool", x, out, out, m.kernel_size, m.stride, m.padding)
    elif isinstance(m, nn.AdaptiveAvgPool2d):
        b.add("adaptive_avgpool", [x], out, out, output_size=tuple(m.output_size))
    elif isinstance(m, nn.Flatten):
        b.add("flatten", [x], out, out)
    elif isinstance(m, nn.Linear):
        bias = None if m.bias is None else m.bias.data
        b.add("linear", [x], out, out, {"weight": m.weight.data, "bias": bias})
    elif isinstance(m, nn.Identity):
        b.identity(out, x)
    else:
        raise UnsupportedOperatorError(f"unsupported module {type(m).__name__} ({out})")
    return out


def from_state_dict(sd: dict[str, np.ndarray]) -> Graph:
    """A weight dict of a bottleneck ResNet or of LeNet-BN / LeNet (bnlab's trained models)."""
    if any(k.startswith("layer1.") or k == "fc.weight" for k in sd):
        return from_resnet_state_dict(sd)
    model = _lenet_for(sd)
    if model is None:
        raise DataFormatError(
            "weights are neither a bottleneck ResNet (torchvision names, e.g. "
            "'layer1.0.conv1.weight') nor LeNet-BN/LeNet ('0.weight', '1.running_mean'); "
            f"first keys: {sorted(sd)[:5]}"
        )
    return from_bnlab_module(model)


def _lenet_for(sd):
    """LeNet-BN, LeNet or folded LeNet-BN (what ``bnlab fold`` writes) with ``sd`` loaded."""
    from bnlab.fold import fold  # noqa: PLC0415
    from bnlab.models import lenet, lenet_bn  # noqa: PLC0415

    for build in (lambda: lenet_bn(seed=0), lambda: lenet(seed=0),
                  lambda: fold(lenet_bn(seed=0).eval())[0]):  # fmt: skip
        model = build()
        if set(model.state_dict()) == set(sd):
            model.load_state_dict(sd, strict=True)
            return model.eval()
    return None


def is_checkpoint(path: Path) -> bool:
    """A training run folder, or a checkpoint's .json / .safetensors (bnlab metadata)."""
    if path.is_dir() or path.suffix == ".json":
        return True
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from bnlab.io import load_safetensors  # noqa: PLC0415

    try:
        _, meta = load_safetensors(path)
    except (DataFormatError, OSError, ValueError):
        return False
    return "bnlab" in meta


def from_checkpoint(path) -> Graph:
    """The model of a training run (folder, checkpoint.safetensors or checkpoint.json)."""
    from bnlab.checkpoint import load_checkpoint  # noqa: PLC0415
    from bnlab.models import build_model  # noqa: PLC0415

    ckpt = load_checkpoint(path)
    try:
        model = build_model(ckpt.model_name, seed=0)
    except (KeyError, ValueError) as err:
        raise DataFormatError(
            f"{path}: checkpoint of an unknown model {ckpt.model_name!r}"
        ) from err
    model.load_state_dict(ckpt.model_state)
    graph = from_bnlab_module(model.eval())
    graph.source = f"{ckpt.model_name} from {path}"
    return graph
