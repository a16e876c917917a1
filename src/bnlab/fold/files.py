"""Folding a weight file: recognise the architecture, fold, certify (what ``bnlab fold`` runs)."""

from __future__ import annotations

import numpy as np

from bnlab.errors import DataFormatError
from bnlab.fold.model import fold

# default calibration batch per architecture: small, seeded (the certificate is about rounding,
# which random inputs of the right scale exercise as well as real images do)
CALIBRATION_SHAPES = {"resnet50": (2, 3, 64, 64), "lenet-bn": (8, 1, 28, 28)}


def model_for_weights(sd: dict[str, np.ndarray]):
    """(name, bnlab model with ``sd`` loaded, in eval mode) for a ResNet-50 or LeNet-BN file."""
    if "layer1.0.conv1.weight" in sd:
        from bnlab.models.resnet import resnet50  # noqa: PLC0415

        return "resnet50", resnet50(sd)
    if "1.running_mean" in sd:
        from bnlab.models import lenet_bn  # noqa: PLC0415

        model = lenet_bn(seed=0)
        model.load_state_dict(sd, strict=True)
        return "lenet-bn", model.eval()
    raise DataFormatError(
        "weights are neither a ResNet-50 (torchvision names, e.g. 'layer1.0.conv1.weight') nor "
        f"a LeNet-BN ('1.running_mean'); first keys: {sorted(sd)[:5]}"
    )


def fold_state_dict(sd: dict[str, np.ndarray], calibration: np.ndarray | None = None, *,
                    certify: bool = True, seed: int = 0):  # fmt: skip
    """Fold every conv/linear -> BN pair of a weight dict: ``(folded_sd, name, certificate)``.

    Without ``calibration`` a seeded standard-normal batch of the architecture's input shape is
    used; ``certify=False`` skips the certificate (then None).
    """
    name, model = model_for_weights(sd)
    if certify and calibration is None:
        shape = CALIBRATION_SHAPES[name]
        calibration = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    folded, cert = fold(model, calibration if certify else None)
    return folded.state_dict(), name, (cert if certify else None)
