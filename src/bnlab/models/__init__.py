"""Model definitions with PyTorch-compatible state_dict keys."""

from bnlab.models.lenet import MODELS, build_model, init_xavier_, lenet, lenet_bn

__all__ = ["MODELS", "build_model", "init_xavier_", "lenet", "lenet_bn"]
