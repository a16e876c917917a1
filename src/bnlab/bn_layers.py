"""The batch-norm layers of a model, bnlab's or PyTorch's, behind one interface.

``bn_layers(model)`` finds every BN layer and can run the model with them in a chosen mode while
recording the per-channel moments of each layer's input (float64, over every axis but the
channel's). Whatever a run does, it leaves the model as it found it: module modes, parameters and
every buffer (running statistics, batch counters) are restored afterwards. :mod:`bnlab.diagnose`
(eval pass + BN-only training pass) and :mod:`bnlab.recalibrate` (a training pass whose
statistics replace the running ones) are both built on it.

    layers = bn_layers(model)
    out = layers.run(x, train="bn", record=stats)   # stats[name] = (mean (C,), var (C,), m)
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import numpy as np

from bnlab.errors import DTypeError

TRAIN_MODES = ("none", "bn", "all")  # which modules run in training mode during :meth:`run`


@dataclass
class LayerInfo:
    """A BN layer's settings and state, as float64 NumPy arrays (None where absent)."""

    name: str
    kind: str
    gamma: np.ndarray | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    eps: float
    momentum: float | None
    num_batches_tracked: int | None
    num_features: int

    @property
    def tracks_running_stats(self) -> bool:
        return self.running_mean is not None and self.running_var is not None


def input_moments(x: np.ndarray, channel_axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean (C,), biased variance (C,), values per channel) of a layer input, in float64."""
    from bnlab.functional.stats import moments, reduction_size

    axes = tuple(a for a in range(x.ndim) if a != channel_axis)
    mean, var = moments(np.asarray(x, np.float64), axes)
    return mean.reshape(-1), var.reshape(-1), reduction_size(x.shape, axes)


class _Layers:
    """What both frameworks share: the run protocol around framework-specific hooks."""

    framework = ""

    def __init__(self, model, layers: dict):
        self.model = model
        self.layers = layers  # name -> BN module, in model order

    def run(self, x, *, train: str = "none", record: dict | None = None) -> np.ndarray:
        """The model's output (float64 NumPy) on ``x`` with ``train`` modules in training mode
        ("none", "bn": only the BN layers, "all"); ``record[name]`` gets each BN input's
        moments. Modes, parameters and buffers are restored afterwards."""
        if train not in TRAIN_MODES:
            raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
        modes = [(m, m.training) for m in self.model.modules()]
        saved = self._save_buffers()
        try:
            self._set_training(self.model, train == "all")
            if train == "bn":
                for m in self.layers.values():
                    self._set_training(m, True, recurse=False)
            with self._recording(record):
                return self._forward(x)
        finally:
            self._restore_buffers(saved)
            for m, mode in modes:
                self._set_training(m, mode, recurse=False)


class _BnlabLayers(_Layers):
    framework = "bnlab"

    def __init__(self, model):
        from bnlab.nn.norm import _BatchNorm

        super().__init__(
            model, {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
        )

    def info(self, name: str) -> LayerInfo:
        m = self.layers[name]
        kind = type(m).__name__
        if hasattr(m, "virtual_batch_size"):
            kind += f"(vbs={m.virtual_batch_size})"
        if hasattr(m, "rmax"):
            kind += f"(rmax={m.rmax:g},dmax={m.dmax:g})"
        nbt = m.num_batches_tracked
        return LayerInfo(
            name, kind, _f64(None if m.weight is None else m.weight.data), _f64(m.running_mean),
            _f64(m.running_var), m.eps, m.momentum, None if nbt is None else int(nbt),
            m.num_features,
        )  # fmt: skip

    def as_input(self, x, index: int) -> np.ndarray:
        return _array_input(x, index)

    def write_running(self, name: str, mean: np.ndarray, var: np.ndarray) -> None:
        bn = self.layers[name]
        bn.running_mean[...] = mean
        bn.running_var[...] = var

    @staticmethod
    def _set_training(m, mode: bool, recurse: bool = True) -> None:
        if recurse:
            m.train(mode)
        else:
            object.__setattr__(m, "training", mode)

    def _save_buffers(self):
        return [(b, b.copy()) for _, b in self.model.named_buffers()]

    @staticmethod
    def _restore_buffers(saved) -> None:
        for b, copy in saved:
            np.copyto(b, copy)

    @contextlib.contextmanager
    def _recording(self, record: dict | None):
        from bnlab.functional._layout import get_layout

        if record is None:
            yield
            return
        for name, bn in self.layers.items():
            bound = type(bn).forward.__get__(bn)

            def forward(x, bn=bn, name=name, bound=bound):
                channel = get_layout(bn._layout_for(x)).channel_axis
                record[name] = input_moments(x, channel)
                return bound(x)

            object.__setattr__(bn, "forward", forward)
        try:
            yield
        finally:
            for bn in self.layers.values():
                bn.__dict__.pop("forward", None)

    def _forward(self, x) -> np.ndarray:
        from bnlab.nn.module import no_grad

        with no_grad():
            return np.asarray(self.model(x), np.float64)


class _TorchLayers(_Layers):
    """``torch.nn.BatchNorm*d`` (bnlab.torch's drop-ins subclass them) and d2l's module
    :class:`bnlab.torch.BatchNorm`, whose ``gamma``/``moving_mean``/``moving_var`` are shaped
    (1, C) or (1, C, 1, 1)."""

    framework = "torch"

    def __init__(self, model):
        import torch

        from bnlab.torch.d2l import BatchNorm as D2LBatchNorm

        self.torch = torch
        kinds = (torch.nn.modules.batchnorm._BatchNorm, D2LBatchNorm)
        super().__init__(model, {n: m for n, m in model.named_modules() if isinstance(m, kinds)})
        p = next(model.parameters(), None)
        self.dtype = p.dtype if p is not None else torch.float32

    @staticmethod
    def _state(m) -> tuple:
        """(γ, running mean, running var, batch counter) under either module's names."""
        if hasattr(m, "moving_mean"):
            return m.gamma, m.moving_mean, m.moving_var, None
        return m.weight, m.running_mean, m.running_var, getattr(m, "num_batches_tracked", None)

    def info(self, name: str) -> LayerInfo:
        m = self.layers[name]
        gamma, mean, var, nbt = self._state(m)

        def np64(t):
            return None if t is None else t.detach().cpu().double().numpy().reshape(-1)

        return LayerInfo(
            name, type(m).__name__, np64(gamma), np64(mean), np64(var), float(m.eps), m.momentum,
            None if nbt is None else int(nbt), int(m.num_features),
        )  # fmt: skip

    def as_input(self, x, index: int):
        if isinstance(x, self.torch.Tensor):
            return x.to(self.dtype)
        return self.torch.from_numpy(_array_input(x, index)).to(self.dtype)

    def write_running(self, name: str, mean: np.ndarray, var: np.ndarray) -> None:
        _, mean_buf, var_buf, _ = self._state(self.layers[name])
        with self.torch.no_grad():
            mean_buf.copy_(self.torch.from_numpy(mean).reshape(mean_buf.shape))
            var_buf.copy_(self.torch.from_numpy(var).reshape(var_buf.shape))

    @staticmethod
    def _set_training(m, mode: bool, recurse: bool = True) -> None:
        if recurse:
            m.train(mode)
        else:
            m.training = mode

    def _save_buffers(self):
        return [(b, b.detach().clone()) for _, b in self.model.named_buffers()]

    def _restore_buffers(self, saved) -> None:
        with self.torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)

    @contextlib.contextmanager
    def _recording(self, record: dict | None):
        if record is None:
            yield
            return

        def hook_for(name):
            def hook(_module, inputs):
                record[name] = input_moments(inputs[0].detach().cpu().double().numpy(), 1)

            return hook

        handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in self.layers.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _forward(self, x) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(x).detach().cpu().double().numpy()


def _f64(a):
    return None if a is None else np.asarray(a, np.float64)


def _array_input(x, index: int) -> np.ndarray:
    """``batches[index]`` as a float array (N, ...); integers (uint8 images) become float32."""
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fu" or x.ndim < 2:
        what = getattr(x, "shape", type(x).__name__)
        raise DTypeError(
            f"batches[{index}] must be a numeric array of shape (N, ...) (or a tuple (x, y)), "
            f"got {what}"
        )
    return x.astype(np.float32) if x.dtype.kind == "u" else x


def bn_layers(model) -> _Layers:
    """The BN layers of a ``bnlab.nn.Module`` or a ``torch.nn.Module``."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return _TorchLayers(model)
    from bnlab.nn import Module

    if isinstance(model, Module):
        return _BnlabLayers(model)
    raise TypeError(
        f"model must be a bnlab.nn.Module or a torch.nn.Module, got {type(model).__name__}"
    )


def first_item(batch):
    """A batch is an input, or a tuple/list whose first item is the input (x, labels, ...)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch
