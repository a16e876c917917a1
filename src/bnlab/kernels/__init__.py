"""Fused multi-core numba kernels for batch norm (the ``"numba"`` backend of bnlab.functional),
and layer norm on a (M, D) view through the same reduction core.

See ``docs/kernels.md`` for the pass structure and the measured speed.
"""

from .batch_norm import bn_backward, bn_eval_backward, bn_eval_forward, bn_train_forward
from .layer_norm import ln_backward, ln_forward

__all__ = [
    "bn_backward",
    "bn_eval_backward",
    "bn_eval_forward",
    "bn_train_forward",
    "ln_backward",
    "ln_forward",
]
