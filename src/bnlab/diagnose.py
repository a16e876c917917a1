"""Train/eval mismatch diagnostics for the batch-norm layers of a model.

``diagnose(model, batches)`` runs a bnlab model (or a PyTorch one) on real batches in eval mode,
records the input of every batch-norm layer, and compares what training would normalize with (the
statistics of each batch) against what inference normalizes with (the running statistics).
Per layer and channel c, with the layer's batches b = 1..B of m_b values per channel each:

    pooled data statistics   μ = Σ_b m_b·μ_b / Σ m_b,   σ² = Σ_b m_b·(σ²_b + (μ_b − μ)²) / Σ m_b
    mean shift               (μ − running_mean) / sqrt(σ² + ε)        in units of the data's σ
    variance ratio           σ² / running_var                          1 is a perfect match
    train-vs-eval            rms over values of  x̂_batch − x̂_running     (the normalized outputs)
    batch noise              rms over values of  x̂_batch − x̂_pooled      (sampling noise alone)

where x̂_s = (x − μ_s)/sqrt(σ²_s + ε). Both rms values are exact closed forms of the batch moments
(no second pass over the data): for one batch and one channel

    mean((x̂_b − x̂_r)²) = σ²_b·(1/s_b − 1/s_r)² + ((μ_b − μ_r)/s_r)²,    s = sqrt(σ² + ε)

and they are averaged over batches (weights m_b) and channels (equal weights), before the root.
Also reported: dead channels (|γ| < tol: the output is the constant β), channels whose running
statistics are not finite, the momentum and its convention, and at model level the relative
difference of the model's output when only the batch-norm layers are switched to training mode
(the running statistics are restored afterwards: ``diagnose`` leaves the model as it found it).

Each layer gets a verdict (``ok`` / ``warn`` / ``bad``) with advice: recalibrate, a larger batch,
Ghost BN / Batch Renorm or GroupNorm / LayerNorm, and whether folding into the previous layer is
safe. Output: :meth:`Diagnosis.format_table` (terminal), :meth:`Diagnosis.to_dict` /
:meth:`Diagnosis.save_json` and :meth:`Diagnosis.plot` (PNG, matplotlib Agg).
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np

from bnlab.errors import DTypeError, ShapeError

__all__ = ["Diagnosis", "LayerDiagnosis", "Thresholds", "diagnose", "rms_normalized_difference"]

_LAYOUT_BY_NDIM = {2: "NC", 3: "NCL", 4: "NCHW"}
_REDUCE = {"NC": (0,), "NCL": (0, 2), "NCHW": (0, 2, 3), "NHWC": (0, 1, 2), "NLC": (0, 1)}
_CHANNEL = {"NC": 1, "NCL": 1, "NCHW": 1, "NHWC": 3, "NLC": 2}


@dataclass(frozen=True)
class Thresholds:
    """Where a number becomes a problem. ``bad`` is twice as far out as ``warn``."""

    shift_sigma: float = 0.5  # |mean shift| in units of the data's σ
    var_ratio: float = 2.0  # σ²/running_var outside [1/var_ratio, var_ratio]
    batch_noise: float = 0.3  # rms of x̂_batch − x̂_pooled: batch statistics too noisy
    dead_gamma: float = 1e-3  # |γ| below this: a dead channel

    def __post_init__(self):
        for name in ("shift_sigma", "batch_noise", "dead_gamma"):
            val = getattr(self, name)
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                raise ValueError(f"Thresholds.{name} must be a finite number > 0, got {val!r}")
        if not (isinstance(self.var_ratio, (int, float)) and 1 < self.var_ratio < math.inf):
            raise ValueError(
                f"Thresholds.var_ratio must be a finite number > 1, got {self.var_ratio!r}"
            )


# --------------------------------------------------------------------------- the math


def rms_normalized_difference(var_b, mean_b, var_r, mean_r, eps: float) -> np.ndarray:
    """Per batch and channel: sqrt(mean over values of (x̂_b − x̂_r)²), exactly, from moments.

    x̂_s = (x − μ_s)/s_s with s_s = sqrt(σ²_s + ε); the batch has mean μ_b and biased variance σ²_b:

        mean((x̂_b − x̂_r)²) = σ²_b·(1/s_b − 1/s_r)² + ((μ_b − μ_r)/s_r)²

    Arrays broadcast (e.g. batches (B, C) against a reference (C,)).
    """
    s_b = np.sqrt(var_b + eps)
    s_r = np.sqrt(var_r + eps)
    return np.sqrt(var_b * (1.0 / s_b - 1.0 / s_r) ** 2 + ((mean_b - mean_r) / s_r) ** 2)


def pooled_moments(means: np.ndarray, variances: np.ndarray, counts: np.ndarray):
    """Mean and biased variance of the union of batches, from their (B, C) moments, (B,) sizes."""
    w = counts[:, None] / counts.sum()
    mean = (w * means).sum(axis=0)
    var = (w * (variances + (means - mean) ** 2)).sum(axis=0)
    return mean, var


@dataclass
class _LayerRecord:
    """Batch moments seen at one layer's input (float64), accumulated during the eval pass."""

    means: list = field(default_factory=list)
    variances: list = field(default_factory=list)
    counts: list = field(default_factory=list)

    def add(self, x: np.ndarray, layout: str) -> None:
        from bnlab.functional.stats import moments

        axes = _REDUCE[layout]
        mean, var = moments(np.asarray(x, np.float64), axes)
        self.means.append(mean.ravel())
        self.variances.append(var.ravel())
        self.counts.append(int(np.prod([x.shape[a] for a in axes])))


# --------------------------------------------------------------------------- results


@dataclass
class LayerDiagnosis:
    """Everything measured at one batch-norm layer (per-channel lists are JSON-friendly)."""

    name: str
    kind: str
    num_features: int
    momentum: float | None
    convention: str
    eps: float
    num_batches_tracked: int | None
    values_per_channel: float  # mean m per batch
    has_running_stats: bool
    mean_shift_sigma: list[float]
    var_ratio: list[float]
    max_abs_shift_sigma: float
    worst_var_ratio: float  # the channel's ratio farthest from 1 (in log scale)
    train_eval_rms: float
    batch_noise_rms: float
    dead_channels: list[int]
    nonfinite_channels: list[int]
    verdict: str = "ok"
    problems: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    fold: str = ""


@dataclass
class Diagnosis:
    """The per-layer results plus the model-level train-vs-eval difference."""

    layers: list[LayerDiagnosis]
    num_batches: int
    num_samples: int
    output_rel_diff: float  # rms(y_train − y_eval) / rms(y_eval), BN layers alone in train mode
    prediction_agreement: float | None  # fraction of equal argmax (classifier outputs)
    thresholds: Thresholds
    framework: str

    @property
    def verdict(self) -> str:
        order = {"ok": 0, "warn": 1, "bad": 2}
        return max((lay.verdict for lay in self.layers), key=order.__getitem__, default="ok")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict
        return _json_safe(d)

    def save_json(self, path) -> None:
        """Write :meth:`to_dict` atomically (NaN/Inf become null: the file is strict JSON)."""
        from bnlab.io import atomic_write_json

        atomic_write_json(path, self.to_dict())

    def format_table(self) -> str:
        return format_table(self)

    def plot(self, path) -> None:
        plot_diagnosis(self, path)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --------------------------------------------------------------------------- model adapters


@dataclass
class _LayerInfo:
    name: str
    kind: str
    gamma: np.ndarray | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    eps: float
    momentum: float | None
    num_batches_tracked: int | None
    num_features: int


class _BnlabAdapter:
    framework = "bnlab"

    def __init__(self, model):
        from bnlab.nn import BatchNorm1d, BatchNorm2d

        self.model = model
        self.bn = [
            (n, m) for n, m in model.named_modules() if isinstance(m, (BatchNorm1d, BatchNorm2d))
        ]

    def info(self, name, m) -> _LayerInfo:
        kind = type(m).__name__
        if hasattr(m, "virtual_batch_size"):
            kind += f"(vbs={m.virtual_batch_size})"
        if hasattr(m, "rmax"):
            kind += f"(rmax={m.rmax:g},dmax={m.dmax:g})"
        nbt = m.num_batches_tracked
        return _LayerInfo(
            name, kind, None if m.weight is None else np.asarray(m.weight.data, np.float64),
            _f64(m.running_mean), _f64(m.running_var), m.eps, m.momentum,
            None if nbt is None else int(nbt), m.num_features,
        )  # fmt: skip

    @staticmethod
    def layout(m, x) -> str:
        return getattr(m, "layout", None) or _LAYOUT_BY_NDIM[x.ndim]

    def run_eval(self, x, records: dict) -> np.ndarray:
        from bnlab.nn.module import no_grad

        modes = [(m, m.training) for m in self.model.modules()]
        originals = []
        try:
            self.model.eval()
            for name, m in self.bn:
                originals.append(m)
                object.__setattr__(m, "forward", self._recording(m, records[name]))
            with no_grad():
                return np.asarray(self.model(x))
        finally:
            for m in originals:
                m.__dict__.pop("forward", None)
            for m, mode in modes:
                object.__setattr__(m, "training", mode)

    def _recording(self, m, record: _LayerRecord):
        bound = type(m).forward.__get__(m)

        def forward(x):
            record.add(x, self.layout(m, x))
            return bound(x)

        return forward

    def run_bn_train(self, x) -> np.ndarray:
        """The model with only its BN layers in training mode; every buffer restored after."""
        from bnlab.nn.module import no_grad

        modes = [(m, m.training) for m in self.model.modules()]
        saved = [(b, b.copy()) for _, b in self.model.named_buffers()]
        try:
            self.model.eval()
            for _, m in self.bn:
                object.__setattr__(m, "training", True)
            with no_grad():
                return np.asarray(self.model(x))
        finally:
            for b, copy in saved:
                np.copyto(b, copy)
            for m, mode in modes:
                object.__setattr__(m, "training", mode)


class _TorchAdapter:
    framework = "torch"

    def __init__(self, model):
        import torch

        self.torch = torch
        self.model = model
        base = torch.nn.modules.batchnorm._BatchNorm
        self.bn = [(n, m) for n, m in model.named_modules() if isinstance(m, base)]
        p = next(model.parameters(), None)
        self.dtype = p.dtype if p is not None else torch.float32

    def info(self, name, m) -> _LayerInfo:
        def np64(t):
            return None if t is None else t.detach().cpu().double().numpy()

        nbt = getattr(m, "num_batches_tracked", None)
        return _LayerInfo(
            name, type(m).__name__, np64(m.weight), np64(m.running_mean), np64(m.running_var),
            float(m.eps), m.momentum, None if nbt is None else int(nbt), int(m.num_features),
        )  # fmt: skip

    def _tensor(self, x):
        t = x if isinstance(x, self.torch.Tensor) else self.torch.from_numpy(np.asarray(x))
        return t.to(self.dtype)

    def run_eval(self, x, records: dict) -> np.ndarray:
        torch = self.torch
        modes = [(m, m.training) for m in self.model.modules()]
        handles = []

        def hook_for(record):
            def hook(_module, inputs):
                t = inputs[0].detach().cpu().double().numpy()
                record.add(t, _LAYOUT_BY_NDIM.get(t.ndim, "NCHW"))

            return hook

        try:
            self.model.eval()
            for name, m in self.bn:
                handles.append(m.register_forward_pre_hook(hook_for(records[name])))
            with torch.no_grad():
                return self.model(self._tensor(x)).detach().cpu().double().numpy()
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes:
                m.training = mode

    def run_bn_train(self, x) -> np.ndarray:
        torch = self.torch
        modes = [(m, m.training) for m in self.model.modules()]
        saved = [(b, b.detach().clone()) for _, b in self.model.named_buffers()]
        try:
            self.model.eval()
            for _, m in self.bn:
                m.training = True
            with torch.no_grad():
                return self.model(self._tensor(x)).detach().cpu().double().numpy()
        finally:
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)
            for m, mode in modes:
                m.training = mode


def _f64(a):
    return None if a is None else np.asarray(a, np.float64)


def _adapter(model):
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return _TorchAdapter(model)
    from bnlab.nn import Module

    if isinstance(model, Module):
        return _BnlabAdapter(model)
    raise TypeError(
        f"model must be a bnlab.nn.Module or a torch.nn.Module, got {type(model).__name__}"
    )


def _batch_input(batch, index: int):
    """A batch is an input array/tensor, or a tuple whose first element is (x, labels, ...)."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fu" or x.ndim < 2:
        what = getattr(x, "shape", type(x).__name__)
        raise DTypeError(
            f"batches[{index}] must be a numeric array of shape (N, ...) (or a tuple (x, y)), "
            f"got {what}"
        )
    return x.astype(np.float32) if x.dtype.kind == "u" else x


# --------------------------------------------------------------------------- diagnose


def diagnose(
    model,
    batches: Iterable,
    *,
    thresholds: Thresholds | None = None,
    max_batches: int | None = None,
) -> Diagnosis:
    """Compare batch and running statistics at every batch-norm layer of ``model``.

    Args:
        model: a ``bnlab.nn.Module`` or a ``torch.nn.Module``; it is left exactly as found
            (mode, parameters and buffers).
        batches: an iterable of inputs ``x`` (ndarray or torch tensor, N first) or of tuples
            ``(x, y, ...)``; use the batch size you train with, since batch noise depends on it.
        thresholds: where numbers become warnings (:class:`Thresholds`).
        max_batches: stop after this many batches.
    """
    th = thresholds if thresholds is not None else Thresholds()
    if not isinstance(th, Thresholds):
        raise TypeError(f"thresholds must be a Thresholds or None, got {thresholds!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    ad = _adapter(model)
    if not ad.bn:
        raise ValueError(f"model {type(model).__name__} has no batch-norm layers to diagnose")
    records = {name: _LayerRecord() for name, _ in ad.bn}
    sq_diff = sq_ref = 0.0
    agree, n_pred, n_batches, n_samples = 0, 0, 0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x = _batch_input(batch, i)
        y_eval = ad.run_eval(x, records)
        y_train = ad.run_bn_train(x)
        sq_diff += float(((y_train - y_eval) ** 2).sum())
        sq_ref += float((y_eval**2).sum())
        if y_eval.ndim == 2 and y_eval.shape[1] > 1:
            agree += int((y_eval.argmax(1) == y_train.argmax(1)).sum())
            n_pred += y_eval.shape[0]
        n_batches += 1
        n_samples += int(x.shape[0])
    if n_batches == 0:
        raise ValueError("batches is empty: diagnose needs at least one batch")
    layers = [_layer_diagnosis(ad.info(name, m), records[name], th) for name, m in ad.bn]
    _advise_first_layer(layers)
    return Diagnosis(
        layers=layers,
        num_batches=n_batches,
        num_samples=n_samples,
        output_rel_diff=math.sqrt(sq_diff / sq_ref) if sq_ref > 0 else math.nan,
        prediction_agreement=agree / n_pred if n_pred else None,
        thresholds=th,
        framework=ad.framework,
    )


def _layer_diagnosis(info: _LayerInfo, rec: _LayerRecord, th: Thresholds) -> LayerDiagnosis:
    if not rec.counts:
        raise ShapeError(f"layer {info.name!r} was never reached by the model's forward pass")
    means, variances = np.array(rec.means), np.array(rec.variances)
    counts = np.array(rec.counts, np.float64)
    mean, var = pooled_moments(means, variances, counts)
    w = (counts / counts.sum())[:, None]
    noise = np.sqrt(
        (w * rms_normalized_difference(variances, means, var, mean, info.eps) ** 2).sum(0).mean()
    )
    dead = [] if info.gamma is None else np.flatnonzero(np.abs(info.gamma) < th.dead_gamma).tolist()
    has_running = info.running_mean is not None and info.running_var is not None
    if has_running:
        rm, rv = info.running_mean, info.running_var
        finite = np.isfinite(rm) & np.isfinite(rv) & (rv >= 0)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            shift = (mean - rm) / np.sqrt(var + info.eps)
            ratio = var / rv
            per_batch = rms_normalized_difference(variances, means, rv, rm, info.eps) ** 2
        shift[~finite], ratio[~finite] = np.nan, np.nan
        ok = finite[None, :]
        te = (
            math.sqrt((w * np.where(ok, per_batch, 0)).sum(0)[finite].mean())
            if finite.any()
            else math.nan
        )
        nonfinite = np.flatnonzero(~finite).tolist()
    else:
        shift, ratio = np.zeros_like(mean), np.ones_like(var)
        te, nonfinite = 0.0, []
    max_shift = float(np.nanmax(np.abs(shift))) if np.isfinite(shift).any() else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.abs(np.log(ratio))
    worst = (
        float(ratio[np.nanargmax(logs)])
        if np.isfinite(logs).any()
        else (math.inf if np.isinf(logs).any() else math.nan)
    )
    lay = LayerDiagnosis(
        name=info.name, kind=info.kind, num_features=info.num_features, momentum=info.momentum,
        convention="pytorch (momentum = weight of the new batch; running_var unbiased)",
        eps=info.eps, num_batches_tracked=info.num_batches_tracked,
        values_per_channel=float(counts.mean()), has_running_stats=has_running,
        mean_shift_sigma=shift.tolist(), var_ratio=ratio.tolist(),
        max_abs_shift_sigma=max_shift, worst_var_ratio=worst,
        train_eval_rms=te, batch_noise_rms=float(noise),
        dead_channels=dead, nonfinite_channels=nonfinite,
    )  # fmt: skip
    _verdict(lay, info, th)
    return lay


def _never_updated(lay: LayerDiagnosis, info: _LayerInfo) -> bool:
    return (
        info.num_batches_tracked == 0
        and np.all(info.running_mean == 0)
        and np.all(info.running_var == 1)
    )


def _verdict(lay: LayerDiagnosis, info: _LayerInfo, th: Thresholds) -> None:
    """Fill ``verdict``, ``problems``, ``advice`` and ``fold`` from the numbers."""
    level = {"ok": 0, "warn": 1, "bad": 2}
    worst = 0

    def flag(severity: str, problem: str, advice: str) -> None:
        nonlocal worst
        worst = max(worst, level[severity])
        lay.problems.append(problem)
        if advice not in lay.advice:
            lay.advice.append(advice)

    recalibrate = (
        "recalibrate: re-estimate the running statistics on data like the evaluation data "
        "(bnlab.recalibrate), with the model in its final weights"
    )
    if not lay.has_running_stats:
        lay.verdict, lay.fold = "ok", "no: no running statistics (eval uses batch statistics)"
        lay.advice.append("no running statistics are tracked: eval behaves like training")
        return
    if lay.nonfinite_channels:
        flag(
            "bad",
            f"running statistics are NaN/Inf in {len(lay.nonfinite_channels)} channel(s) "
            f"{_short(lay.nonfinite_channels)}",
            "find the batch that produced NaN/Inf (bnlab keeps such batches out of the buffers, "
            "not all code does), then " + recalibrate,
        )
    elif _never_updated(lay, info):
        flag(
            "bad",
            "running statistics were never updated (num_batches_tracked=0, mean 0, var 1)",
            "the layer never ran in training mode or its buffers were not saved: " + recalibrate,
        )
    shift, ratio = lay.max_abs_shift_sigma, lay.worst_var_ratio
    ratio_out = abs(math.log(ratio)) if ratio > 0 and math.isfinite(ratio) else math.inf
    lim = math.log(th.var_ratio)
    if math.isfinite(shift) and shift > th.shift_sigma:
        flag(
            "bad" if shift > 2 * th.shift_sigma else "warn",
            f"batch mean is {shift:.2f} σ away from running_mean (limit {th.shift_sigma:g})",
            recalibrate,
        )
    if ratio_out > lim:
        flag(
            "bad" if ratio_out > 2 * lim else "warn",
            f"batch/running variance ratio {ratio:.3g} "
            f"(limit {1 / th.var_ratio:g}..{th.var_ratio:g})",
            recalibrate,
        )
    if lay.batch_noise_rms > th.batch_noise:
        flag(
            "bad" if lay.batch_noise_rms > 2 * th.batch_noise else "warn",
            f"batch statistics are noisy: rms(x̂_batch − x̂_pooled) = {lay.batch_noise_rms:.3f} "
            f"with {lay.values_per_channel:.0f} values per channel per batch",
            "use a larger batch, or Ghost BN / Batch Renorm (bnlab.nn.ghost, bnlab.nn.renorm), "
            "or GroupNorm / LayerNorm, which need no batch statistics",
        )
    if lay.dead_channels:
        frac = len(lay.dead_channels) / lay.num_features
        flag(
            "warn" if frac > 0.5 else "ok",
            f"{len(lay.dead_channels)} dead channel(s) (|γ| < {th.dead_gamma:g}) "
            f"{_short(lay.dead_channels)}: their output is the constant β",
            "dead channels are harmless to fold and could be pruned",
        )
    lay.verdict = {0: "ok", 1: "warn", 2: "bad"}[worst]
    if lay.nonfinite_channels:
        lay.fold = "unsafe: non-finite running statistics would make the folded weights NaN"
    elif worst == 0 or not any("running" in p for p in lay.problems):
        lay.fold = "safe: folding with these running statistics is exact in eval mode"
    else:
        lay.fold = "exact but not advised: folding bakes in the mismatch; recalibrate first"


def _advise_first_layer(layers: list[LayerDiagnosis]) -> None:
    first = layers[0]
    if (
        first.has_running_stats
        and not first.nonfinite_channels
        and any("away from running_mean" in p or "variance ratio" in p for p in first.problems)
    ):
        first.advice.append(
            "this is the first batch-norm layer, the closest to the model input: unless its "
            "running statistics were modified, the evaluation inputs are distributed differently "
            "from the training inputs (data shift): check the preprocessing, or recalibrate on "
            "the new data"
        )


def _short(items: list[int], k: int = 6) -> str:
    return "[" + ", ".join(map(str, items[:k])) + (", ..." if len(items) > k else "") + "]"


# --------------------------------------------------------------------------- output


def _fmt(v, spec=".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else "inf"
    return format(v, spec)


def format_table(d: Diagnosis) -> str:
    """A fixed-width table, one row per layer, then the problems and advice of flagged layers."""
    head = ("layer", "type", "C", "m/batch", "momentum", "|shift|σ", "var ratio", "train-eval",
            "noise", "dead", "nonfin", "verdict")  # fmt: skip
    rows = [head]
    for lay in d.layers:
        rows.append((
            lay.name, lay.kind, str(lay.num_features), f"{lay.values_per_channel:.0f}",
            "None (cumulative)" if lay.momentum is None else _fmt(lay.momentum, "g"),
            _fmt(lay.max_abs_shift_sigma), _fmt(lay.worst_var_ratio, ".3g"),
            _fmt(lay.train_eval_rms, ".3f"), _fmt(lay.batch_noise_rms, ".3f"),
            str(len(lay.dead_channels)), str(len(lay.nonfinite_channels)), lay.verdict.upper(),
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    agree = (
        ""
        if d.prediction_agreement is None
        else (f", predictions agree on {100 * d.prediction_agreement:.1f}%")
    )
    lines.append("")
    lines.append(
        f"model ({d.framework}): {d.num_batches} batches, {d.num_samples} samples; output with BN "
        f"in train vs eval mode differs by {_fmt(d.output_rel_diff, '.3f')} (relative rms){agree}"
    )
    lines.append("momentum convention: pytorch (weight of the new batch); running_var unbiased")
    for lay in d.layers:
        if lay.verdict == "ok" and not lay.problems:
            continue
        lines.append(f"\n[{lay.verdict.upper()}] {lay.name} ({lay.kind})")
        lines += [f"  problem: {p}" for p in lay.problems]
        lines += [f"  advice:  {a}" for a in lay.advice]
        lines.append(f"  fold:    {lay.fold}")
    lines.append(f"\nverdict: {d.verdict.upper()}")
    return "\n".join(lines)


def _bar_colors(values: np.ndarray, limit: float | None) -> list[str]:
    """Green below the warning limit, orange above, red above twice the limit or non-finite."""
    if limit is None:
        return ["tab:blue" if np.isfinite(v) else "tab:red" for v in values]
    return [
        "tab:red" if not np.isfinite(v) or v > 2 * limit else "tab:orange" if v > limit else
        "tab:green"
        for v in values
    ]  # fmt: skip


def plot_diagnosis(d: Diagnosis, path) -> None:
    """Per-layer divergence (|shift|, |log2 var ratio|, rms differences) as a PNG, atomically.

    Bars are coloured by their own threshold; a layer with non-finite running statistics gets a
    full-width red bar labelled "non-finite" in the first panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bnlab.io import atomic_write_bytes

    names = [lay.name or "(root)" for lay in d.layers]
    th = d.thresholds
    nonfinite = np.array([bool(lay.nonfinite_channels) for lay in d.layers])

    def log2_ratio(r):
        return abs(math.log2(r)) if r > 0 and math.isfinite(r) else math.inf

    panels = [
        ("max |mean shift| (σ of the data)", [lay.max_abs_shift_sigma for lay in d.layers],
         th.shift_sigma),
        ("worst |log2 variance ratio|", [log2_ratio(lay.worst_var_ratio) for lay in d.layers],
         math.log2(th.var_ratio)),
        ("train-vs-eval rms of x̂", [lay.train_eval_rms for lay in d.layers], None),
        ("batch-noise rms of x̂", [lay.batch_noise_rms for lay in d.layers], th.batch_noise),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 2.5 + 0.3 * len(names)))
    pos = np.arange(len(names))
    for k, (ax, (title, values, limit)) in enumerate(zip(axes, panels, strict=True)):
        vals = np.array(values, np.float64)
        missing = ~np.isfinite(vals) | (nonfinite if k == 0 else False)
        finite_top = np.max(vals[~missing]) if (~missing).any() else 0.0
        full = max(finite_top, limit or 0.0) * 1.15 or 1.0
        shown = np.where(missing, full, vals)
        ax.barh(pos, shown, color=_bar_colors(np.where(missing, np.inf, vals), limit))
        for p in pos[missing]:
            ax.text(full, p, "non-finite ", va="center", ha="right", fontsize=7, color="w")
        if limit is not None:
            ax.axvline(limit, color="k", linestyle="--", linewidth=1)
        ax.set_yticks(pos, names if k == 0 else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"bnlab diagnose: verdict {d.verdict.upper()} (dashed line: warning threshold)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
