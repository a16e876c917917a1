"""LeNet and LeNet-BN exactly as in d2l (chapters "LeNet" and "Batch Normalization").

LeNet (28×28×1 input):
    Conv(1,6,5,pad=2) Sigmoid AvgPool(2,2) Conv(6,16,5) Sigmoid AvgPool(2,2) Flatten
    Linear(400,120) Sigmoid Linear(120,84) Sigmoid Linear(84,10)
LeNet-BN (BN after every conv and linear layer but the last; no padding):
    Conv(1,6,5) BN2d(6) Sigmoid AvgPool(2,2) Conv(6,16,5) BN2d(16) Sigmoid AvgPool(2,2) Flatten
    Linear(256,120) BN1d(120) Sigmoid Linear(120,84) BN1d(84) Sigmoid Linear(84,10)

Both are ``Sequential``s, so state_dict keys ("0.weight", "1.running_mean", ...) are those of
the same ``torch.nn.Sequential`` and weights load both ways. d2l initialises every Conv2d and
Linear weight with ``xavier_uniform``; biases keep PyTorch's default U(±1/sqrt(fan_in)).
"""

from __future__ import annotations

import numpy as np

from bnlab import init, nn


def init_xavier_(model: nn.Module, rng: np.random.Generator | None = None) -> nn.Module:
    """d2l's ``init_cnn``: xavier_uniform on every Conv2d/Linear weight, in module order."""
    rng = init.get_rng(rng)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            init.xavier_uniform_(m.weight.data, rng=rng)
    return model


def _rng(seed: int | None, rng: np.random.Generator | None) -> np.random.Generator:
    if rng is not None:
        return init.get_rng(rng)
    return init.get_rng() if seed is None else np.random.default_rng(seed)


def lenet(seed: int | None = 0, *, rng=None, dtype=np.float32) -> nn.Sequential:
    """d2l's LeNet-5 (sigmoid, average pooling); seeded xavier_uniform init."""
    r = _rng(seed, rng)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2, dtype=dtype, rng=r),
        nn.Sigmoid(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, 5, dtype=dtype, rng=r),
        nn.Sigmoid(),
        nn.AvgPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120, dtype=dtype, rng=r),
        nn.Sigmoid(),
        nn.Linear(120, 84, dtype=dtype, rng=r),
        nn.Sigmoid(),
        nn.Linear(84, 10, dtype=dtype, rng=r),
    )
    return init_xavier_(model, r)


def lenet_bn(seed: int | None = 0, *, rng=None, dtype=np.float32) -> nn.Sequential:
    """d2l's LeNet with batch norm after every conv and hidden linear layer."""
    r = _rng(seed, rng)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, dtype=dtype, rng=r),
        nn.BatchNorm2d(6, dtype=dtype),
        nn.Sigmoid(),
        nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, 5, dtype=dtype, rng=r),
        nn.BatchNorm2d(16, dtype=dtype),
        nn.Sigmoid(),
        nn.AvgPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120, dtype=dtype, rng=r),
        nn.BatchNorm1d(120, dtype=dtype),
        nn.Sigmoid(),
        nn.Linear(120, 84, dtype=dtype, rng=r),
        nn.BatchNorm1d(84, dtype=dtype),
        nn.Sigmoid(),
        nn.Linear(84, 10, dtype=dtype, rng=r),
    )
    return init_xavier_(model, r)


MODELS = {"lenet": lenet, "lenet-bn": lenet_bn}


def build_model(name: str, seed: int | None = 0, **kwargs) -> nn.Sequential:
    """A model by its CLI name (``lenet`` | ``lenet-bn``)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](seed, **kwargs)
