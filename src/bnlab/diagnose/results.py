"""What a diagnosis is: thresholds, the per-layer numbers and verdicts, the model-level result."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


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
        from bnlab.diagnose.report import format_table

        return format_table(self)

    def plot(self, path) -> None:
        from bnlab.diagnose.report import plot_diagnosis

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
