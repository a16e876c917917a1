"""Drop-in ``torch.nn.BatchNorm1d/2d`` whose math is bnlab's (:mod:`bnlab.torch.functional`).

The classes *are* ``nn.BatchNorm1d/2d`` subclasses: same constructor arguments, parameters,
buffers, ``state_dict`` keys (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), input-dimension checks, ``extra_repr`` and state-dict versioning; only
``forward`` differs. So weights load both ways and code that checks
``isinstance(m, nn.BatchNorm2d)`` keeps working. The mode is ``self.training`` (``model.train()`` /
``model.eval()``), as in PyTorch:

* training, ``track_running_stats=True``: batch statistics; buffers updated with ``momentum``
  (weight of the new batch) or, for ``momentum=None``, the cumulative average over
  ``num_batches_tracked`` batches;
* training, ``track_running_stats=False``: batch statistics, buffers never touched;
* eval: the running statistics, or batch statistics when the module has no buffers.

Differences from PyTorch (bnlab's safer rules, see docs/torch.md): a batch that raises, is empty or
is not finite leaves ``running_mean``, ``running_var`` *and* ``num_batches_tracked`` unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.torch import functional as BF


class _BnlabBatchNorm:
    """The forward shared by BatchNorm1d and BatchNorm2d (a mixin over ``nn`` BatchNorm classes)."""

    backend: str | None = None  # bnlab backend for the fast path; None: bnlab.get_backend()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # PyTorch's rule: batch statistics in training, and in eval when there are no buffers
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # buffers are passed only when they are read (eval) or updated (training + tracking)
        pass_buffers = not self.training or self.track_running_stats
        updating = self.training and self.track_running_stats
        return BF.batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            num_batches_tracked=self.num_batches_tracked if updating else None,
            backend=self.backend,
        )


class BatchNorm1d(_BnlabBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` computed by bnlab. Input (N, C) or (N, C, L); output the same.

    y = γ·(x − μ)/sqrt(σ² + ε) + β per channel, μ and σ² over N (and L).
    """


class BatchNorm2d(_BnlabBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` computed by bnlab. Input (N, C, H, W), NCHW or channels_last; output
    in the same memory format.

    y = γ·(x − μ)/sqrt(σ² + ε) + β per channel, μ and σ² over N, H and W.
    """


# --------------------------------------------------------------------------- model passes

_TO_BNLAB = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d}
_TO_TORCH = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d}


def _rebuild(module: nn.Module, cls: type) -> nn.Module:
    """A ``cls`` with ``module``'s hyper-parameters, parameters, buffers and mode."""
    ref = module.weight if module.weight is not None else module.running_mean
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        bias=module.bias is not None or not module.affine,
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
    )
    new.load_state_dict(module.state_dict())
    if module.weight is not None:
        new.weight.requires_grad_(module.weight.requires_grad)
    if module.bias is not None:
        new.bias.requires_grad_(module.bias.requires_grad)
    new.train(module.training)
    return new


def _swap(model: nn.Module, table: dict[type, type]) -> nn.Module:
    cls = table.get(type(model))  # exact type: subclasses of nn.BatchNorm2d are left alone
    if cls is not None:
        return _rebuild(model, cls)
    for name, child in model.named_children():
        new = _swap(child, table)
        if new is not child:
            setattr(model, name, new)
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d`` in ``model`` by bnlab's, keeping weights, statistics,
    ``requires_grad`` and train/eval mode. Modifies ``model`` in place and returns it (a bare
    BatchNorm module is returned converted)."""
    return _swap(model, _TO_BNLAB)


def revert(model: nn.Module) -> nn.Module:
    """Inverse of :func:`convert`: bnlab's BatchNorm1d/2d back to ``torch.nn``'s."""
    return _swap(model, _TO_TORCH)
