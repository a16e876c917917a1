"""bnlab's NumPy CNN engine: modules with explicit forward/backward and PyTorch state_dict keys.

    from bnlab import nn
    net = nn.Sequential(nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.Sigmoid(), nn.AvgPool2d(2, 2))
    y = net(x); dx = net.backward(dy)   # dparams land in p.grad

Files: ``module`` (Module, Sequential, no_grad), ``parameter``, ``conv``, ``linear`` (Linear,
Flatten, Identity), ``norm`` (BatchNorm1d/2d, LayerNorm, GroupNorm), ``activation``, ``pooling``,
``loss``.
"""

from bnlab.nn.activation import ReLU, Sigmoid
from bnlab.nn.conv import Conv2d
from bnlab.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from bnlab.nn.linear import Flatten, Identity, Linear
from bnlab.nn.loss import CrossEntropyLoss
from bnlab.nn.module import IncompatibleKeys, Module, Parameter, Sequential, no_grad
from bnlab.nn.norm import BatchNorm1d, BatchNorm2d, GroupNorm, LayerNorm
from bnlab.nn.pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from bnlab.nn.renorm import BatchRenorm1d, BatchRenorm2d

__all__ = [
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "Conv2d",
    "CrossEntropyLoss",
    "Flatten",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GroupNorm",
    "Identity",
    "IncompatibleKeys",
    "LayerNorm",
    "Linear",
    "MaxPool2d",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "no_grad",
]
