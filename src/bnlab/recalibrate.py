"""Population statistics for inference: recompute every BN's running mean and variance.

One pass over training batches with the network in training mode (each BN normalizes with its
batch statistics, as during training), recording for every BN layer and batch B the per-channel
mean μ_B, biased variance σ²_B and count m_B (= N·H·W values per channel). Then:

``method="population"`` (Ioffe & Szegedy 2015, Alg. 2, the textbook inference statistics):

    E[x]   = mean_B μ_B
    Var[x] = m/(m−1) · mean_B σ²_B        (each batch unbiased by its own m_B/(m_B−1) when
                                            batch sizes differ; identical for equal sizes)

``method="precise"`` (the exact statistics of every value seen in the pass, pooled by count):

    M      = Σ_B m_B
    E[x]   = Σ_B m_B μ_B / M
    Var[x] = Σ_B m_B (σ²_B + (μ_B − E[x])²) / (M − 1)      (unbiased, as PyTorch stores it)

Batches containing NaN/Inf (in the input, or in any BN's statistics) are skipped and counted.
Works on bnlab models and on PyTorch models (any ``torch.nn.BatchNorm*d``, including
:mod:`bnlab.torch`'s drop-ins, which subclass them, and d2l's module
:class:`bnlab.torch.BatchNorm`, whose ``moving_mean``/``moving_var`` get the same statistics).
On any error the model is left untouched; on success only the running (moving) statistics change
(and the training flags are restored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

METHODS = ("population", "precise")


@dataclass
class RecalibrationSummary:
    method: str
    batches_used: int
    batches_skipped: int
    skipped_batches: list[int] = field(default_factory=list)  # 0-based indices in the pass
    layers: list[str] = field(default_factory=list)  # BN layers recalibrated, by name


# --------------------------------------------------------------------------- the formulas


def population_statistics(means, variances, counts) -> tuple[np.ndarray, np.ndarray]:
    """mean_B μ_B and mean_B [m_B/(m_B−1) · σ²_B]; inputs are per-batch (C,) arrays and ints."""
    mu = np.mean(np.stack(means), axis=0)
    unbiased = [v * (m / (m - 1)) for v, m in zip(variances, counts, strict=True)]
    return mu, np.mean(np.stack(unbiased), axis=0)


def pooled_statistics(means, variances, counts) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and unbiased variance of all Σ m_B values from per-batch (μ_B, σ²_B, m_B)."""
    m = np.asarray(counts, np.float64)[:, None]
    mu_b, var_b = np.stack(means), np.stack(variances)
    total = m.sum()
    mu = (m * mu_b).sum(axis=0) / total
    return mu, (m * (var_b + (mu_b - mu) ** 2)).sum(axis=0) / (total - 1)


COMBINE = {"population": population_statistics, "precise": pooled_statistics}


# --------------------------------------------------------------------------- the pass


def recalibrate(model, batches, *, method: str = "population") -> RecalibrationSummary:
    """Recompute the running statistics of every BN in ``model`` from ``batches`` (one pass).

    ``batches``: an iterable of input arrays (or of tuples whose first item is the input, as a
    data loader yields). Returns a :class:`RecalibrationSummary`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if _is_torch_module(model):
        backend = _TorchBackend(model)
    else:
        backend = _BnlabBackend(model)
    if not backend.layers:
        raise ValueError("model has no batch-norm layer with running statistics to recalibrate")
    if isinstance(batches, np.ndarray) or not hasattr(batches, "__iter__"):
        raise TypeError("batches must be an iterable of input batches (e.g. a list or a loader)")
    stats, skipped = backend.collect(batches)
    used = len(stats)
    if used == 0:
        raise ValueError(
            f"no usable batch: {len(skipped)} batches were given and every one had non-finite "
            "values"
            if skipped
            else "batches is empty: recalibration needs at least one batch"
        )
    results = {}
    for name in backend.layers:
        means = [s[name][0] for s in stats]
        variances = [s[name][1] for s in stats]
        counts = [s[name][2] for s in stats]
        if min(counts) < 2:
            raise ValueError(
                f"BN layer {name!r} saw a batch with {min(counts)} value per channel: the "
                "unbiased variance needs at least 2 (use larger batches)"
            )
        results[name] = COMBINE[method](means, variances, counts)
    backend.write(results)
    return RecalibrationSummary(method, used, len(skipped), skipped, list(backend.layers))


def _first(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _is_torch_module(model) -> bool:
    return type(model).__module__.startswith("torch") or any(
        c.__module__.startswith("torch.nn") for c in type(model).__mro__
    )


class _BnlabBackend:
    """Records BN input statistics of a bnlab model by wrapping each BN's forward."""

    def __init__(self, model):
        from bnlab import nn  # noqa: PLC0415
        from bnlab.nn.norm import _BatchNorm  # noqa: PLC0415

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a bnlab.nn.Module or a torch.nn.Module, got {model!r}")
        self.model = model
        self.layers = {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats
        }

    def collect(self, batches):
        from bnlab import nn  # noqa: PLC0415

        snapshot = {n: (m.running_mean.copy(), m.running_var.copy(),
                        m.num_batches_tracked.copy()) for n, m in self.layers.items()}  # fmt: skip
        modes = {id(m): m.training for m in self.model.modules()}
        current: dict = {}
        try:
            for name, bn in self.layers.items():
                object.__setattr__(bn, "forward", _recording_forward(bn, name, current))
            self.model.train()
            stats, skipped = [], []
            with nn.no_grad():
                for i, batch in enumerate(batches):
                    x = _first(batch)
                    current.clear()
                    if not np.all(np.isfinite(x)):
                        skipped.append(i)
                        continue
                    self.model(x)
                    if all(np.isfinite(v[0]).all() and np.isfinite(v[1]).all()
                           for v in current.values()):  # fmt: skip
                        stats.append(dict(current))
                    else:
                        skipped.append(i)
        finally:
            for bn in self.layers.values():
                bn.__dict__.pop("forward", None)
            for m in self.model.modules():
                object.__setattr__(m, "training", modes[id(m)])
            for n, m in self.layers.items():  # the pass itself must leave no trace
                m.running_mean[...], m.running_var[...], m.num_batches_tracked[...] = snapshot[n]
        return stats, skipped

    def write(self, results) -> None:
        for name, (mu, var) in results.items():
            bn = self.layers[name]
            bn.running_mean[...] = mu
            bn.running_var[...] = var


def _recording_forward(bn, name: str, sink: dict):
    from bnlab.functional import moments  # noqa: PLC0415
    from bnlab.functional._layout import get_layout  # noqa: PLC0415

    cls_forward = type(bn).forward

    def forward(x):
        axes = get_layout(bn._layout_for(x)).reduce_axes
        mean, var = moments(np.asarray(x, np.float64), axes)
        count = int(np.prod([x.shape[a] for a in axes]))
        sink[name] = (mean.reshape(-1), var.reshape(-1), count)
        return cls_forward(bn, x)

    return forward


class _TorchBackend:
    """The same for a PyTorch model, with forward pre-hooks (float64 statistics)."""

    def __init__(self, model):
        import torch  # noqa: PLC0415

        from bnlab.torch.d2l import BatchNorm as D2LBatchNorm  # noqa: PLC0415

        self.torch = torch
        self.model = model
        bn_types = torch.nn.modules.batchnorm._BatchNorm
        self.layers = {
            name: m
            for name, m in model.named_modules()
            if (isinstance(m, bn_types) and m.track_running_stats) or isinstance(m, D2LBatchNorm)
        }

    @staticmethod
    def _buffers(m) -> list:
        """running_mean, running_var, num_batches_tracked; d2l's module: moving_mean, moving_var."""
        if hasattr(m, "running_mean"):
            return [m.running_mean, m.running_var, m.num_batches_tracked]
        return [m.moving_mean, m.moving_var]

    def collect(self, batches):
        torch = self.torch
        snapshot = {n: [b.clone() for b in self._buffers(m)] for n, m in self.layers.items()}
        modes = {id(m): m.training for m in self.model.modules()}
        current: dict = {}
        hooks = [bn.register_forward_pre_hook(_torch_hook(name, current))
                 for name, bn in self.layers.items()]  # fmt: skip
        try:
            self.model.train()
            stats, skipped = [], []
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    x = _first(batch)
                    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
                    current.clear()
                    if not torch.isfinite(x).all():
                        skipped.append(i)
                        continue
                    self.model(x)
                    if all(np.isfinite(v[0]).all() and np.isfinite(v[1]).all()
                           for v in current.values()):  # fmt: skip
                        stats.append(dict(current))
                    else:
                        skipped.append(i)
        finally:
            for h in hooks:
                h.remove()
            for m in self.model.modules():
                m.training = modes[id(m)]
            with torch.no_grad():
                for n, m in self.layers.items():
                    for buf, old in zip(self._buffers(m), snapshot[n], strict=True):
                        buf.copy_(old)
        return stats, skipped

    def write(self, results) -> None:
        with self.torch.no_grad():
            for name, (mu, var) in results.items():
                mean_buf, var_buf = self._buffers(self.layers[name])[:2]
                mean_buf.copy_(self.torch.from_numpy(mu).reshape(mean_buf.shape))
                var_buf.copy_(self.torch.from_numpy(var).reshape(var_buf.shape))


def _torch_hook(name: str, sink: dict):
    def hook(module, args):
        x = args[0].detach().double()
        axes = [a for a in range(x.ndim) if a != 1]  # torch BN: channels on dim 1
        mean = x.mean(dim=axes)
        var = x.var(dim=axes, unbiased=False)
        count = x.numel() // x.shape[1]
        sink[name] = (mean.numpy(), var.numpy(), count)

    return hook
