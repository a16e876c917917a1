"""Reference math of the batch-norm family, in plain NumPy.

Every function returns ``(out, cache)`` and has a ``*_backward(dout, cache)`` twin returning
``(dx, dgamma, dbeta)`` (cs231n's contract). This is what every fast path is checked against.
"""

from bnlab.functional.batch_norm import (
    BatchNormCache,
    batch_norm,
    batch_norm_backward,
    batch_norm_backward_graph,
    batch_norm_forward,
)
from bnlab.functional.ghost import ghost_batch_norm_backward, ghost_batch_norm_forward
from bnlab.functional.group_norm import (
    group_norm_backward,
    group_norm_forward,
    instance_norm_backward,
    instance_norm_forward,
)
from bnlab.functional.layer_norm import NormCache, layer_norm_backward, layer_norm_forward
from bnlab.functional.renorm import RenormSchedule, batch_renorm_backward, batch_renorm_forward
from bnlab.functional.stats import moments, standardize, standardize_backward

__all__ = [
    "BatchNormCache",
    "RenormSchedule",
    "NormCache",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_backward_graph",
    "batch_norm_forward",
    "batch_renorm_backward",
    "batch_renorm_forward",
    "ghost_batch_norm_backward",
    "ghost_batch_norm_forward",
    "group_norm_backward",
    "group_norm_forward",
    "instance_norm_backward",
    "instance_norm_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "moments",
    "standardize",
    "standardize_backward",
]
