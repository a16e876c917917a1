"""Fused multi-core numba kernels for batch norm (the ``"numba"`` backend of bnlab.functional).

See ``docs/kernels.md`` for the pass structure and the measured speed.
"""

from .batch_norm import bn_backward, bn_eval_backward, bn_eval_forward, bn_train_forward

__all__ = ["bn_backward", "bn_eval_backward", "bn_eval_forward", "bn_train_forward"]
