"""Drop-in ``torch.nn.BatchNorm1d/2d/3d`` whose math is bnlab's (:mod:`bnlab.torch.functional`).

The classes *are* ``nn.BatchNorm1d/2d/3d`` subclasses: same constructor arguments, parameters,
buffers, ``state_dict`` keys (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), input-dimension checks, ``extra_repr`` and state-dict versioning; only
``forward`` differs. So weights load both ways and code that checks
``isinstance(m, nn.BatchNorm2d)`` keeps working. The mode is ``self.training``, as in PyTorch:

* training, ``track_running_stats=True``: batch statistics; buffers updated with ``momentum``
  (weight of the new batch) or, for ``momentum=None``, the cumulative average over
  ``num_batches_tracked`` batches;
* training, ``track_running_stats=False``: batch statistics, buffers never touched;
* eval: the running statistics, or batch statistics when the module has no buffers.

Under transforms: ``torch.compile``/``torch.export`` see the custom ops ``torch.ops.bnlab.*``;
``torch.fx.symbolic_trace`` records one ``call_function`` of :func:`bnlab_batch_norm` per module
call (the mode at trace time is recorded, as for any traced module); ``torch.jit.script``
compiles a forward that calls PyTorch's ``batch_norm`` (TorchScript cannot call NumPy).

Differences from PyTorch (bnlab's safer rules, see docs/torch.md): a batch that raises, is empty or
is not finite leaves ``running_mean``, ``running_var`` *and* ``num_batches_tracked`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.torch import functional as BF


def _dims_text(dims: tuple[int, ...]) -> str:
    return " or ".join(f"{d}D" for d in dims)


def bnlab_batch_norm(
    input,
    input_dims,
    running_mean,
    running_var,
    weight,
    bias,
    use_batch_stats,
    momentum,
    eps,
    num_batches_tracked,
    backend,
) -> Tensor:
    """One call of a bnlab BatchNorm module: PyTorch's input-dimension check (``input_dims``, the
    numbers of dims the class takes), then :func:`bnlab.torch.functional.batch_norm`. A leaf for
    ``torch.fx`` (``torch.fx.wrap``): a traced module is one node calling this function."""
    if input.dim() not in input_dims:
        raise ValueError(f"expected {_dims_text(input_dims)} input (got {input.dim()}D input)")
    return BF.batch_norm(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        use_batch_stats,
        momentum,
        eps,
        num_batches_tracked=num_batches_tracked,
        backend=backend,
    )


torch.fx.wrap("bnlab_batch_norm")


class _BnlabBatchNorm:
    """The forward shared by BatchNorm1d/2d/3d (a mixin over the ``nn`` BatchNorm classes)."""

    backend: str | None = None  # bnlab backend of the kernel route; None: bnlab.get_backend()
    _input_dims: tuple[int, ...] = ()

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._torchscript_forward(input)
        return self._bnlab_forward(input)

    @torch.jit.unused
    def _bnlab_forward(self, input: Tensor) -> Tensor:
        training = self.training
        running_mean, running_var = self.running_mean, self.running_var
        # PyTorch's rule: batch statistics in training, and in eval when there are no buffers;
        # buffers are passed only when they are read (eval) or updated (training + tracking)
        tracking = training and self.track_running_stats
        if training and not tracking:
            running_mean = running_var = None
        use_batch_stats = training or (running_mean is None and running_var is None)
        return bnlab_batch_norm(
            input,
            self._input_dims,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
            self.num_batches_tracked if tracking else None,
            self.backend,
        )

    def _torchscript_forward(self, input: Tensor) -> Tensor:
        """What a scripted module runs: the same three rules, computed by ``F.batch_norm`` (so
        the running statistics follow PyTorch's own bookkeeping there)."""
        self._check_input_dim(input)
        factor = 0.0
        if self.momentum is not None:
            factor = self.momentum
        updating = self.training and self.track_running_stats
        if updating and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )


class BatchNorm1d(_BnlabBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` computed by bnlab. Input (N, C) or (N, C, L); output the same.

    y = γ·(x − μ)/sqrt(σ² + ε) + β per channel, μ and σ² over N (and L).
    """

    _input_dims = (2, 3)


class BatchNorm2d(_BnlabBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` computed by bnlab. Input (N, C, H, W), NCHW or channels_last; output
    in the same memory format.

    y = γ·(x − μ)/sqrt(σ² + ε) + β per channel, μ and σ² over N, H and W.
    """

    _input_dims = (4,)


class BatchNorm3d(_BnlabBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` computed by bnlab. Input (N, C, D, H, W), contiguous or
    channels_last_3d; output in the same memory format.

    y = γ·(x − μ)/sqrt(σ² + ε) + β per channel, μ and σ² over N, D, H and W.
    """

    _input_dims = (5,)


# --------------------------------------------------------------------------- model passes

_TO_BNLAB = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_TO_TORCH = {v: k for k, v in _TO_BNLAB.items()}


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
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``model`` by bnlab's, keeping weights,
    statistics, ``requires_grad`` and train/eval mode. Modifies ``model`` in place and returns
    it (a bare BatchNorm module is returned converted)."""
    return _swap(model, _TO_BNLAB)


def revert(model: nn.Module) -> nn.Module:
    """Inverse of :func:`convert`: bnlab's BatchNorm1d/2d/3d back to ``torch.nn``'s."""
    return _swap(model, _TO_TORCH)
