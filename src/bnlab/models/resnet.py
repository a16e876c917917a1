"""ResNet-50 on ``bnlab.nn`` with torchvision's module structure and ``state_dict`` names.

    conv1 bn1 relu maxpool layer1..layer4 avgpool fc           (ResNet)
    conv1 bn1 conv2 bn2 conv3 bn3 [downsample.0 downsample.1]  (Bottleneck, v1.5: stride on the 3x3)

so a torchvision checkpoint loads as is (``resnet50(weights="resnet50.safetensors")``; ``.npz``
and ``.pt`` work too, see :func:`bnlab.io.load_weights`). ``folded=True`` builds the network that
``bnlab fold`` writes: convs with a bias and every BN replaced by ``Identity`` (no state).

This is the slow, obvious NCHW reference (forward and backward through bnlab.nn); the fast path
is :func:`bnlab.inference.compile`. The architecture and the weight-file check are shared with
it through :mod:`bnlab.inference.spec`.
"""

from __future__ import annotations

import numpy as np

from bnlab import nn
from bnlab.inference.spec import (
    RESNET50_LAYERS,
    ConvSpec,
    check_state_dict,
    resnet_spec,
    spec_for,
    to_numpy_state_dict,
)


def _conv(cv: ConvSpec, folded: bool, dtype, rng) -> nn.Conv2d:
    return nn.Conv2d(cv.c_in, cv.c_out, cv.k, stride=cv.stride, padding=cv.pad, bias=folded,
                     dtype=dtype, rng=rng)  # fmt: skip


def _norm(cv: ConvSpec, folded: bool, dtype) -> nn.Module:
    return nn.Identity() if folded else nn.BatchNorm2d(cv.c_out, dtype=dtype)


class Bottleneck(nn.Module):
    """y = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + identity(x))."""

    expansion = 4

    def __init__(self, conv1, conv2, conv3, downsample, *, folded=False, dtype=np.float32,
                 rng=None):  # fmt: skip
        super().__init__()
        self.conv1 = _conv(conv1, folded, dtype, rng)
        self.bn1 = _norm(conv1, folded, dtype)
        self.conv2 = _conv(conv2, folded, dtype, rng)
        self.bn2 = _norm(conv2, folded, dtype)
        self.conv3 = _conv(conv3, folded, dtype, rng)
        self.bn3 = _norm(conv3, folded, dtype)
        # three ReLU objects (torchvision shares one): each caches its own output for backward
        self.relu = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.relu3 = nn.ReLU()
        if downsample is not None:
            self.downsample = nn.Sequential(
                _conv(downsample, folded, dtype, rng), _norm(downsample, folded, dtype)
            )
        else:
            self.downsample = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)

    def backward(self, dout: np.ndarray) -> np.ndarray:
        d = self.relu3.backward(dout)
        d_identity = d if self.downsample is None else self.downsample.backward(d)
        d = self.conv3.backward(self.bn3.backward(d))
        d = self.conv2.backward(self.bn2.backward(self.relu2.backward(d)))
        d = self.conv1.backward(self.bn1.backward(self.relu.backward(d)))
        return d + d_identity


class ResNet(nn.Module):
    """A bottleneck ResNet, torchvision names: input (N, 3, H, W), output logits (N, classes)."""

    def __init__(self, layers=RESNET50_LAYERS, num_classes: int = 1000, *, folded: bool = False,
                 dtype=np.float32, seed: int | None = 0):  # fmt: skip
        super().__init__()
        rng = np.random.default_rng(seed)
        spec = resnet_spec(tuple(layers), num_classes)
        self.conv1 = _conv(spec.stem, folded, dtype, rng)
        self.bn1 = _norm(spec.stem, folded, dtype)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        for stage in range(1, 5):
            blocks = [b for b in spec.blocks if b.name.startswith(f"layer{stage}.")]
            seq = nn.Sequential(
                *(
                    Bottleneck(
                        b.conv1, b.conv2, b.conv3, b.downsample, folded=folded, dtype=dtype, rng=rng
                    )
                    for b in blocks
                )  # fmt: skip
            )
            setattr(self, f"layer{stage}", seq)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(spec.num_features, num_classes, dtype=dtype, rng=rng)
        self.spec = spec

    def _stages(self):
        return [self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2,
                self.layer3, self.layer4, self.avgpool, self.flatten, self.fc]  # fmt: skip

    def forward(self, x: np.ndarray) -> np.ndarray:
        for m in self._stages():
            x = m(x)
        return x

    def backward(self, dout: np.ndarray) -> np.ndarray:
        for m in reversed(self._stages()):
            dout = m.backward(dout)
        return dout

    def load_weights(self, weights) -> ResNet:
        """Load a path (.safetensors/.npz/.pt) or a state dict, after checking every key/shape."""
        sd = _read_weights(weights)
        check_state_dict(sd, self.spec)
        self.load_state_dict(sd, strict=True)
        return self


def _read_weights(weights) -> dict[str, np.ndarray]:
    return to_numpy_state_dict(weights)  # a path, a state dict or a model


def resnet50(weights=None, *, num_classes: int | None = None, folded: bool | None = None,
             dtype=np.float32, seed: int | None = 0) -> ResNet:  # fmt: skip
    """ResNet-50 (torchvision structure), in eval mode when weights are given.

    ``weights``: None (seeded random init), a path to .safetensors/.npz/.pt, a state dict, or a
    bnlab/PyTorch model. ``folded`` defaults to what the weights contain (conv biases and no BN
    keys = folded). Wrong files raise an error listing every missing/unexpected key and shape.
    """
    sd = None if weights is None else _read_weights(weights)
    if sd is not None:
        if num_classes is None:
            num_classes = spec_for(sd).num_classes
        if folded is None:
            folded = "conv1.bias" in sd and "bn1.running_mean" not in sd
    model = ResNet(RESNET50_LAYERS, num_classes or 1000, folded=bool(folded), dtype=dtype,
                   seed=seed)  # fmt: skip
    if sd is not None:
        model.load_weights(sd)
        model.eval()
    return model
