"""Experiment names -> modules (imported lazily: experiments import matplotlib/torch in use)."""

from __future__ import annotations

import importlib
from types import ModuleType

# Name on the command line -> module of this package; the order is the report's order.
EXPERIMENTS: dict[str, str] = {
    "bn-vs-none": "bn_vs_none",
    "init-scale": "init_scale",
    "batch-size": "batch_size",
    "population-stats": "population_stats",
    "from-scratch": "from_scratch",
    "gamma-beta": "gamma_beta",
    "covariate-shift": "covariate_shift",
}


class UnknownExperimentError(ValueError):
    """The experiment name is not one of :data:`EXPERIMENTS`."""


def load_experiment(name: str) -> ModuleType:
    """The module implementing experiment ``name``; a clear error listing valid names if none."""
    if name not in EXPERIMENTS:
        valid = ", ".join(EXPERIMENTS)
        raise UnknownExperimentError(
            f"unknown experiment {name!r}; valid experiment names are: {valid} (or 'all')"
        )
    return importlib.import_module(f"bnlab.experiments.{EXPERIMENTS[name]}")
