"""Fused multi-core numba kernels for batch norm (the ``"numba"`` backend of bnlab.functional),
and layer norm (M, D) and group norm (N, C, S) through the same reduction core.

See ``docs/kernels.md`` for the pass structure and the measured speed.
"""

from .batch_norm import bn_backward, bn_eval_backward, bn_eval_forward, bn_train_forward
from .core import channel_moments
from .group_norm import gn_backward, gn_forward
from .layer_norm import ln_backward, ln_forward

__all__ = [
    "bn_backward",
    "bn_eval_backward",
    "bn_eval_forward",
    "bn_train_forward",
    "channel_moments",
    "gn_backward",
    "gn_forward",
    "ln_backward",
    "ln_forward",
]
