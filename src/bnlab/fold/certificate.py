"""The error certificate of a fold: float32 folded/unfolded vs a float64 unfolded evaluation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class PairError:
    """Errors of one folded ``conv -> BN`` pair on the calibration batch.

    ``*_f32`` compare a float32 evaluation to the float64 evaluation of the *unfolded* pair:
    ``folded_*`` is the folded conv in float32, ``unfolded_*`` the original conv+BN in float32
    (the rounding error one would have had anyway). Relative errors divide by max |reference|.
    """

    name: str
    folded_max_abs: float
    folded_max_rel: float
    unfolded_max_abs: float
    unfolded_max_rel: float


@dataclass
class FoldCertificate:
    """Per-pair errors plus the same four numbers for the whole model's output."""

    pairs: list[PairError] = field(default_factory=list)
    model: PairError | None = None

    def max_rel(self) -> float:
        rows = self.pairs + ([self.model] if self.model else [])
        return max((p.folded_max_rel for p in rows), default=0.0)

    def to_dict(self) -> dict:
        return {
            "pairs": [asdict(p) for p in self.pairs],
            "model": asdict(self.model) if self.model else None,
        }

    def __str__(self) -> str:
        cols = ("folded abs", "folded rel", "f32 abs", "f32 rel")
        head = f"{'pair':40s} " + " ".join(f"{c:>11s}" for c in cols)
        rows = self.pairs + ([self.model] if self.model else [])
        lines = [head] + [
            f"{p.name:40s} {p.folded_max_abs:11.3e} {p.folded_max_rel:11.3e} "
            f"{p.unfolded_max_abs:11.3e} {p.unfolded_max_rel:11.3e}"
            for p in rows
        ]
        return "\n".join(lines)


def error_row(name: str, ref64: np.ndarray, folded32, unfolded32) -> PairError:
    """Max abs and relative (to max |ref|) error of two float32 results vs a float64 reference."""
    scale = max(float(np.max(np.abs(ref64))), np.finfo(np.float32).tiny)
    fa = float(np.max(np.abs(np.asarray(folded32, np.float64) - ref64)))
    ua = float(np.max(np.abs(np.asarray(unfolded32, np.float64) - ref64)))
    return PairError(name, fa, fa / scale, ua, ua / scale)
