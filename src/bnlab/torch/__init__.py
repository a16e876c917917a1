"""bnlab for PyTorch: d2l's batch norm done right, a drop-in CPU BatchNorm, SyncBatchNorm on CPU.

Optional: ``import bnlab`` never imports torch; only ``import bnlab.torch`` does.

=========================== =====================================================================
``batch_norm``, ``BatchNorm``  d2l's from-scratch function (d2l's positional signature; its
                             momentum is the weight of the old value, 0.9) and module, with a
                             ``training=`` flag (d2l's ``torch.is_grad_enabled()`` guess, with a
                             one-time warning, when it is not given) and the moving statistics
                             registered as buffers
``batch_norm_v1``            the same for d2l 1.0's text (momentum = weight of the new batch, 0.1)
``BatchNorm1d/2d/3d``        drop-in ``torch.nn.BatchNorm1d/2d/3d`` whose math is bnlab's kernels
``convert`` / ``revert``     swap every ``nn.BatchNorm1d/2d/3d`` of a model for bnlab's and back
``SyncBatchNorm``            batch statistics over a ``torch.distributed`` group (gloo on CPU)
``functional``               the stateless math (``functional.batch_norm`` mirrors ``F.batch_norm``)
``ops``                      the custom ops ``torch.ops.bnlab.*`` that compile and export see
``dispatch``                 which calls run bnlab's kernels and which PyTorch's op
``set_buffer_cache_limit``   bytes of freed fast-path outputs kept for reuse (``bnlab.buffers``)
``empty_buffer_cache``       release the idle ones
=========================== =====================================================================
"""

from __future__ import annotations

import os as _os

# PyTorch's OpenMP threads and numba's (bnlab's kernels) are two runtimes on the same cores. With
# the default wait policy the idle threads of each spin after every parallel region and steal the
# cores from the other: alternating PyTorch and bnlab calls ran both 15-100x slower on 2 cores
# (docs/torch.md). The policy is read when a runtime starts, i.e. at the first parallel op, so
# importing bnlab.torch before running PyTorch ops sets it (unless you chose one yourself).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import torch as _torch  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "bnlab.torch needs PyTorch, which is an optional extra: pip install bnlab[torch]"
    ) from err

from bnlab.buffers import empty_buffer_cache, set_buffer_cache_limit
from bnlab.torch import dispatch, functional, ops
from bnlab.torch.d2l import BatchNorm, batch_norm, batch_norm_v1
from bnlab.torch.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from bnlab.torch.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert, revert
from bnlab.torch.sync import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "SyncBatchNorm",
    "batch_norm",
    "batch_norm_v1",
    "convert",
    "convert_sync_batchnorm",
    "dispatch",
    "empty_buffer_cache",
    "functional",
    "ops",
    "revert",
    "set_buffer_cache_limit",
]
