"""Train/eval mismatch diagnostics for the batch-norm layers of a model.

``diagnose(model, batches)`` runs a bnlab model (or a PyTorch one) on real batches in eval mode,
records the input of every batch-norm layer, and compares what training would normalize with (the
statistics of each batch) against what inference normalizes with (the running statistics): mean
shift, variance ratio, train-vs-eval and batch-noise rms of the normalized values
(:mod:`.measure` has the formulas), dead channels, non-finite running statistics, the momentum, and
at model level the relative difference of the output when only the batch-norm layers are switched
to training mode. The model is left exactly as found (modes, parameters, buffers).

Each layer gets a verdict (``ok`` / ``warn`` / ``bad``) with advice (:mod:`.verdict`): recalibrate,
a larger batch, Ghost BN / Batch Renorm or GroupNorm / LayerNorm, and whether folding into the
previous layer is safe. Output: :meth:`Diagnosis.format_table` (terminal, :mod:`.report`),
:meth:`Diagnosis.to_dict` / :meth:`Diagnosis.save_json` and :meth:`Diagnosis.plot` (PNG).

    measure.py   the numbers, from per-batch moments   verdict.py  the rules and the advice
    results.py   Thresholds, LayerDiagnosis, Diagnosis  report.py   table and plot
    (the model side, bnlab or PyTorch, is :mod:`bnlab.bn_layers`, shared with recalibration)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from bnlab.diagnose.measure import layer_numbers, rms_normalized_difference
from bnlab.diagnose.results import Diagnosis, LayerDiagnosis, Thresholds
from bnlab.diagnose.verdict import advise_first_layer, apply_verdict

__all__ = ["Diagnosis", "LayerDiagnosis", "Thresholds", "diagnose", "rms_normalized_difference"]


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
    from bnlab.bn_layers import bn_layers, first_item

    th = thresholds if thresholds is not None else Thresholds()
    if not isinstance(th, Thresholds):
        raise TypeError(f"thresholds must be a Thresholds or None, got {thresholds!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    layers = bn_layers(model)
    if not layers.layers:
        raise ValueError(f"model {type(model).__name__} has no batch-norm layers to diagnose")
    seen = {name: [] for name in layers.layers}
    sq_diff = sq_ref = 0.0
    agree, n_pred, n_batches, n_samples = 0, 0, 0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x = layers.as_input(first_item(batch), i)
        record: dict = {}
        y_eval = layers.run(x, train="none", record=record)
        y_train = layers.run(x, train="bn")
        for name, moments in record.items():
            seen[name].append(moments)
        sq_diff += float(((y_train - y_eval) ** 2).sum())
        sq_ref += float((y_eval**2).sum())
        if y_eval.ndim == 2 and y_eval.shape[1] > 1:
            agree += int((y_eval.argmax(1) == y_train.argmax(1)).sum())
            n_pred += y_eval.shape[0]
        n_batches += 1
        n_samples += int(x.shape[0])
    if n_batches == 0:
        raise ValueError("batches is empty: diagnose needs at least one batch")
    results = []
    for name in layers.layers:
        info = layers.info(name)
        lay = layer_numbers(info, seen[name], th)
        apply_verdict(lay, info, th)
        results.append(lay)
    advise_first_layer(results)
    return Diagnosis(
        layers=results,
        num_batches=n_batches,
        num_samples=n_samples,
        output_rel_diff=math.sqrt(sq_diff / sq_ref) if sq_ref > 0 else math.nan,
        prediction_agreement=agree / n_pred if n_pred else None,
        thresholds=th,
        framework=layers.framework,
    )
