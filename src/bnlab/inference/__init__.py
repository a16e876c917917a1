"""Fast CPU inference: a compiled NHWC engine for bottleneck ResNets with BN folded away.

    predict = bnlab.inference.compile(model_or_state_dict)     # ResNet-50 and deeper
    logits = predict(images)                                   # (N, 3, H, W) float32 -> (N, 1000)

See :mod:`bnlab.inference.engine` for what is fused and packed, ``docs/inference.md`` for numbers.
"""

from __future__ import annotations

from bnlab.inference.engine import CompiledResNet, compile_resnet

__all__ = ["CompiledResNet", "compile"]


def compile(model_or_state_dict, layout: str = "NHWC", fold_bn: bool = True) -> CompiledResNet:  # noqa: A001
    """Compile a bottleneck ResNet (bnlab model, PyTorch model or state dict) for inference.

    ``layout`` is the engine's activation layout; only "NHWC" is implemented (1x1 convs are then
    plain GEMMs). ``fold_bn=True`` folds every BN into its conv; ``False`` keeps BN as a fused
    per-channel scale and shift (slower by one multiply, useful to check the fold).
    Returns a callable ``predict(x, layout="NCHW") -> logits (N, classes)``.
    """
    if layout != "NHWC":
        raise ValueError(
            f"layout must be 'NHWC' (the only engine layout implemented), got {layout!r}"
        )
    if not isinstance(fold_bn, bool):
        raise TypeError(f"fold_bn must be True or False, got {fold_bn!r}")
    return compile_resnet(model_or_state_dict, fold_bn=fold_bn)
