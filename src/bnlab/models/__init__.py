"""Model definitions with PyTorch-compatible state_dict keys."""

from bnlab.models.lenet import MODELS, build_model, init_xavier_, lenet, lenet_bn
from bnlab.models.resnet import ResNet, resnet50

__all__ = ["MODELS", "ResNet", "build_model", "init_xavier_", "lenet", "lenet_bn", "resnet50"]
