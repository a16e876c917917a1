"""cs231n's fully connected net, built from bnlab.nn, with a choice of normalization.

    x (N, 784) → [Linear → Norm → ReLU] × L−1 → Linear → logits (N, 10)

``norm``: "bn" (BatchNorm1d), "ln" (LayerNorm), "gn" (GroupNorm), "none".
``weight_scale``: weights ~ N(0, scale²) and zero biases (cs231n's ``weight_scale``);
``None`` keeps bnlab's PyTorch-default initialisation.
"""

from __future__ import annotations

import numpy as np

NORMS = ("bn", "ghost", "renorm", "ln", "gn", "none")
NORM_LABELS = {
    "bn": "BatchNorm",
    "ghost": "Ghost BN (vbs 16)",
    "renorm": "Batch Renorm",
    "ln": "LayerNorm",
    "gn": "GroupNorm",
    "none": "no norm",
}
GHOST_VIRTUAL_BATCH = 16
RENORM_LIMITS = {"rmax": 3.0, "dmax": 5.0}  # the paper's final values, without the warm-up


def norm_layer(norm: str, width: int, gn_groups: int = 4):
    """The normalization module for a hidden layer of ``width`` features, or None."""
    from bnlab import nn  # noqa: PLC0415

    if norm == "bn":
        return nn.BatchNorm1d(width)
    if norm == "ghost":
        return nn.GhostBatchNorm1d(width, GHOST_VIRTUAL_BATCH)
    if norm == "renorm":
        return nn.BatchRenorm1d(width, **RENORM_LIMITS)
    if norm == "ln":
        return nn.LayerNorm(width)
    if norm == "gn":
        return nn.GroupNorm(gn_groups, width)
    if norm == "none":
        return None
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def fc_net(
    norm: str,
    hidden: tuple[int, ...] = (100, 100, 100, 100, 100),
    *,
    in_features: int = 784,
    classes: int = 10,
    weight_scale: float | None = None,
    activation: str = "relu",
    seed: int = 0,
):
    """A ``Sequential`` of ``len(hidden) + 1`` Linear layers (6 with the default widths)."""
    from bnlab import nn  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
    layers, width_in = [], in_features
    for width in hidden:
        layers.append(nn.Linear(width_in, width, rng=rng))
        layer = norm_layer(norm, width)
        if layer is not None:
            layers.append(layer)
        layers.append(act())
        width_in = width
    layers.append(nn.Linear(width_in, classes, rng=rng))
    model = nn.Sequential(*layers)
    if weight_scale is not None:
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.data[...] = weight_scale * rng.standard_normal(m.weight.shape)
                m.bias.data[...] = 0.0
    return model
