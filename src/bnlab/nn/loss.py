"""``CrossEntropyLoss`` on logits, with a stable log-softmax.

log p[n, k] = z[n, k] − max_j z[n, j] − log Σ_j exp(z[n, j] − max_j z[n, j])
L = −(1/N) Σ_n log p[n, yₙ]                    (reduction="mean"; "sum" drops the 1/N)
dL/dz = (softmax(z) − onehot(y)) / N
"""

from __future__ import annotations

import numpy as np

from bnlab.errors import DTypeError, ShapeError
from bnlab.nn._util import check_x
from bnlab.nn.module import Module


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (N, K) logits, stable for large |z|."""
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class CrossEntropyLoss(Module):
    """``forward(logits (N, K), labels (N,) ints in [0, K)) -> float``;
    ``backward() -> dlogits``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"

    def _check(self, logits, labels) -> np.ndarray:
        check_x(logits, 2, "CrossEntropyLoss", "2-D logits (N, K)")
        if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
            raise DTypeError(
                f"CrossEntropyLoss: labels must be an integer ndarray, "
                f"got {getattr(labels, 'dtype', type(labels).__name__)}"
            )
        n, k = logits.shape
        if labels.shape != (n,):
            raise ShapeError(
                f"CrossEntropyLoss: labels must have shape ({n},) to match logits {logits.shape}, "
                f"got {labels.shape}"
            )
        if n == 0:
            raise ShapeError("CrossEntropyLoss: empty batch")
        if labels.min() < 0 or labels.max() >= k:
            raise ValueError(
                f"CrossEntropyLoss: labels must be in [0, {k}), got min {labels.min()} "
                f"max {labels.max()}"
            )
        return labels.astype(np.intp, copy=False)

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> float:
        labels = self._check(logits, labels)
        logp = log_softmax(logits)
        picked = logp[np.arange(len(labels)), labels]
        loss = -picked.sum(dtype=np.float64)
        if self.reduction == "mean":
            loss /= len(labels)
        self._cache = (logp, labels)
        return float(loss)

    def backward(self, dout: float = 1.0) -> np.ndarray:
        """dL/dlogits, times the scalar upstream gradient ``dout`` (1 for a plain loss)."""
        logp, labels = self._cached()
        grad = np.exp(logp)
        grad[np.arange(len(labels)), labels] -= 1
        scale = float(dout) / (len(labels) if self.reduction == "mean" else 1)
        grad *= grad.dtype.type(scale)
        return grad
