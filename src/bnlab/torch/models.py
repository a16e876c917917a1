"""d2l's LeNet-BN in PyTorch, with a choice of batch-norm implementation.

    Conv(1,6,5) BN2d(6) Sigmoid AvgPool(2,2) Conv(6,16,5) BN2d(16) Sigmoid AvgPool(2,2) Flatten
    Linear(256,120) BN1d(120) Sigmoid Linear(120,84) BN1d(84) Sigmoid Linear(84,10)

A ``Sequential``, so with ``norm="bnlab"`` or ``"torch"`` the state_dict keys ("0.weight",
"1.running_mean", ...) are those of :func:`bnlab.models.lenet_bn` and weights move between the
NumPy engine, PyTorch and bnlab.torch. Input (N, 1, 28, 28), output logits (N, 10).
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.torch.d2l import BatchNorm
from bnlab.torch.modules import BatchNorm1d, BatchNorm2d

NORMS = ("bnlab", "torch", "d2l")


def _norm_layers(norm: str):
    """(make_bn2d(c), make_bn1d(c)) for the chosen implementation."""
    if norm == "bnlab":
        return BatchNorm2d, BatchNorm1d
    if norm == "torch":
        return nn.BatchNorm2d, nn.BatchNorm1d
    if norm == "d2l":
        return (lambda c: BatchNorm(c, num_dims=4)), (lambda c: BatchNorm(c, num_dims=2))
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def init_xavier_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """d2l's ``init_cnn``: xavier_uniform on every Conv2d/Linear weight, in module order."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight, generator=generator)
    return model


def lenet_bn(norm: str = "bnlab", seed: int | None = 0) -> nn.Sequential:
    """d2l's LeNet-BN; ``norm``: ``"bnlab"`` (bnlab.torch.BatchNorm1d/2d), ``"torch"``
    (torch.nn's) or ``"d2l"`` (the from-scratch :class:`bnlab.torch.BatchNorm`). Seeded init."""
    bn2d, bn1d = _norm_layers(norm)
    if seed is not None:
        torch.manual_seed(seed)  # conv/linear biases use the global generator (PyTorch default)
    model = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5),
        bn2d(6),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        bn2d(16),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120),
        bn1d(120),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        bn1d(84),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return init_xavier_(model, gen)
