"""Experiments that check the textbooks' claims about batch normalization, one command each.

``bnlab experiment NAME [--quick] [--seeds 3] [--out reports/NAME]`` runs one (``all`` runs every
one); :func:`run_experiment` is the Python entry point. Each experiment is a module of this
package exposing the small protocol documented in :mod:`bnlab.experiments._runner`; the runner
does the bookkeeping (seeds, results.json, PNGs, the report section) so the modules only hold
the science.
"""

from bnlab.experiments._registry import EXPERIMENTS, UnknownExperimentError, load_experiment
from bnlab.experiments._runner import BUDGETS, Verdict, run_experiment

__all__ = [
    "BUDGETS",
    "EXPERIMENTS",
    "UnknownExperimentError",
    "Verdict",
    "load_experiment",
    "run_experiment",
]
