"""The bottleneck-ResNet architecture as data: state_dict names and shapes, checked without torch.

torchvision's naming (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``...)
and ResNet v1.5 (the stride of a stage's first block sits on its 3x3 conv). Both the engine's
importer of weight files (:mod:`bnlab.inference.import_bnlab`) and ``bnlab.models.resnet`` take
the architecture from here, so a weight file is validated the same way everywhere.

A conv may come with its BN (``conv1.weight`` + ``bn1.{weight,bias,running_mean,running_var}``)
or already folded (``conv1.weight`` + ``conv1.bias``, no ``bn1.*``): ``bnlab fold`` writes the
second form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab.errors import DataFormatError, ShapeError

RESNET50_LAYERS = (3, 4, 6, 3)
EXPANSION = 4
BN_PARAMS = ("weight", "bias", "running_mean", "running_var")
BN_OPTIONAL = ("num_batches_tracked",)


@dataclass(frozen=True)
class ConvSpec:
    """One conv followed by one BN. ``conv``/``bn`` are state_dict prefixes."""

    conv: str
    bn: str
    c_in: int
    c_out: int
    k: int
    stride: int
    pad: int


@dataclass(frozen=True)
class BlockSpec:
    """A bottleneck: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand, optional downsample."""

    name: str
    conv1: ConvSpec
    conv2: ConvSpec
    conv3: ConvSpec
    downsample: ConvSpec | None


@dataclass(frozen=True)
class ResNetSpec:
    stem: ConvSpec
    blocks: tuple[BlockSpec, ...]
    num_features: int
    num_classes: int


def resnet_spec(layers=RESNET50_LAYERS, num_classes: int = 1000) -> ResNetSpec:
    """The architecture of a bottleneck ResNet (``layers=(3, 4, 6, 3)`` is ResNet-50)."""
    stem = ConvSpec("conv1", "bn1", 3, 64, 7, 2, 3)
    blocks = []
    inplanes = 64
    for stage, (n_blocks, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
        for b in range(n_blocks):
            name = f"layer{stage + 1}.{b}"
            stride = 2 if (b == 0 and stage > 0) else 1
            out = width * EXPANSION
            ds = None
            if b == 0 and (stride != 1 or inplanes != out):
                ds = ConvSpec(
                    f"{name}.downsample.0", f"{name}.downsample.1", inplanes, out, 1, stride, 0
                )
            blocks.append(
                BlockSpec(
                    name,
                    ConvSpec(f"{name}.conv1", f"{name}.bn1", inplanes, width, 1, 1, 0),
                    ConvSpec(f"{name}.conv2", f"{name}.bn2", width, width, 3, stride, 1),
                    ConvSpec(f"{name}.conv3", f"{name}.bn3", width, out, 1, 1, 0),
                    ds,
                )
            )
            inplanes = out
    return ResNetSpec(stem, tuple(blocks), inplanes, num_classes)


def all_convs(spec: ResNetSpec) -> list[ConvSpec]:
    convs = [spec.stem]
    for blk in spec.blocks:
        convs += [blk.conv1, blk.conv2, blk.conv3] + ([blk.downsample] if blk.downsample else [])
    return convs


def expected_shapes(spec: ResNetSpec, folded: bool = False) -> dict[str, tuple[int, ...]]:
    """state_dict key -> shape, unfolded (conv without bias + BN) or folded (conv with bias)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for cv in all_convs(spec):
        shapes[f"{cv.conv}.weight"] = (cv.c_out, cv.c_in, cv.k, cv.k)
        if folded:
            shapes[f"{cv.conv}.bias"] = (cv.c_out,)
        else:
            for p in BN_PARAMS:
                shapes[f"{cv.bn}.{p}"] = (cv.c_out,)
    shapes["fc.weight"] = (spec.num_classes, spec.num_features)
    shapes["fc.bias"] = (spec.num_classes,)
    return shapes


# --------------------------------------------------------------------------- state dicts


def to_numpy_state_dict(obj) -> dict[str, np.ndarray]:
    """A weight file path, a bnlab/PyTorch model or a mapping name -> array/tensor, as
    name -> ndarray (no copy). Files go through :func:`bnlab.io.load_weights` (no pickle)."""
    if isinstance(obj, str) or hasattr(obj, "__fspath__"):
        from bnlab.io import load_weights  # noqa: PLC0415

        return load_weights(obj)
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        obj = obj.state_dict()
    if not hasattr(obj, "items"):
        raise TypeError(
            f"expected a model with .state_dict() or a mapping name -> array, got {type(obj)}"
        )
    out = {}
    for k, v in obj.items():
        if hasattr(v, "detach"):  # torch.Tensor, converted without importing torch
            v = v.detach().cpu().numpy()
        elif hasattr(v, "data") and isinstance(v.data, np.ndarray):  # bnlab Parameter
            v = v.data
        out[str(k)] = np.asarray(v)
    return out


def infer_layers(sd: dict[str, np.ndarray]) -> tuple[int, int, int, int]:
    """Blocks per stage from the keys (``layer3.5.conv1.weight`` -> stage 3 has >= 6 blocks)."""
    counts = [0, 0, 0, 0]
    for key in sd:
        parts = key.split(".")
        if len(parts) > 2 and parts[0] in ("layer1", "layer2", "layer3", "layer4"):
            if parts[1].isdigit():
                s = int(parts[0][-1]) - 1
                counts[s] = max(counts[s], int(parts[1]) + 1)
    return tuple(counts) if all(counts) else RESNET50_LAYERS


def spec_for(sd: dict[str, np.ndarray], layers=None) -> ResNetSpec:
    """The spec matching a state dict: layer counts and class count read from its keys."""
    fc = sd.get("fc.weight")
    n_classes = int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 1000
    return resnet_spec(layers or infer_layers(sd), n_classes)


def check_state_dict(sd: dict[str, np.ndarray], spec: ResNetSpec) -> None:
    """Raise one error listing every missing key, unexpected key and wrong shape.

    Each conv may be given with its BN or folded (conv bias, no BN); ``num_batches_tracked`` is
    optional. Raises ``DataFormatError`` (missing/unexpected keys) or ``ShapeError`` (shapes only).
    """
    allowed = {}
    required = set()
    for cv in all_convs(spec):
        w_key = f"{cv.conv}.weight"
        allowed[w_key] = (cv.c_out, cv.c_in, cv.k, cv.k)
        required.add(w_key)
        allowed[f"{cv.conv}.bias"] = (cv.c_out,)
        has_bn = any(k.startswith(cv.bn + ".") for k in sd)
        for p in BN_PARAMS + BN_OPTIONAL:
            allowed[f"{cv.bn}.{p}"] = () if p in BN_OPTIONAL else (cv.c_out,)
        if has_bn:
            required.update(f"{cv.bn}.{p}" for p in BN_PARAMS)
    allowed["fc.weight"] = (spec.num_classes, spec.num_features)
    allowed["fc.bias"] = (spec.num_classes,)
    required.update(("fc.weight", "fc.bias"))

    missing = sorted(required - sd.keys())
    unexpected = sorted(sd.keys() - allowed.keys())
    wrong = [
        f"{k}: expected {allowed[k]}, got {tuple(v.shape)}"
        for k, v in sd.items()
        if k in allowed and tuple(v.shape) != allowed[k] and not k.endswith(BN_OPTIONAL)
    ]
    bad_dtype = [
        f"{k}: dtype {v.dtype}"
        for k, v in sd.items()
        if k in allowed and not k.endswith(BN_OPTIONAL) and not np.issubdtype(v.dtype, np.floating)
    ]
    if not (missing or unexpected or wrong or bad_dtype):
        return
    lines = [
        "weights do not match a bottleneck ResNet "
        f"(layers={tuple(_layer_counts(spec))}, {spec.num_classes} classes):"
    ]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("wrong shapes", wrong),
        ("non-float arrays", bad_dtype),
    ):
        if items:
            shown = ", ".join(items[:20]) + (
                f", ... ({len(items)} in all)" if len(items) > 20 else ""
            )
            lines.append(f"  {title}: {shown}")
    cls = ShapeError if wrong and not (missing or unexpected or bad_dtype) else DataFormatError
    raise cls("\n".join(lines))


def _layer_counts(spec: ResNetSpec) -> list[int]:
    counts = [0, 0, 0, 0]
    for blk in spec.blocks:
        counts[int(blk.name[5]) - 1] += 1
    return counts
