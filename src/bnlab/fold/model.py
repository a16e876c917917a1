"""The model pass: fold every ``conv/linear -> BN`` pair of a bnlab model, with a certificate.

Which pairs are folded (BN directly after the layer it normalizes):

* inside a ``Sequential``: a ``Conv2d``/``Linear`` child immediately followed by a
  ``BatchNorm1d``/``BatchNorm2d`` child (LeNet-BN, ``downsample``);
* inside any other module: children named ``conv<k>`` and ``bn<k>`` with the same suffix
  (torchvision's ResNet and Bottleneck: ``conv1``/``bn1``...).

The folded model is a deep copy: each conv gets the folded weight and a bias (``fold_conv_bn``),
each BN becomes ``nn.Identity``. The input model is not modified.

Certificate (``calibration`` batch given): for every pair, the layer input is recorded while a
float64 copy of the unfolded model runs on the batch; the pair's float64 unfolded output is the
reference, and the folded conv and the unfolded conv+BN are evaluated in float32 on the same
input. The whole model is compared the same way (logits). The unfolded float32 error is the
rounding error one has anyway; the fold is harmless when its error is of the same size.
"""

from __future__ import annotations

import copy

import numpy as np

from bnlab.errors import DTypeError
from bnlab.fold.certificate import FoldCertificate, PairError, error_row
from bnlab.fold.weights import fold_conv_bn


def _nn():
    from bnlab import nn  # noqa: PLC0415  (bnlab.fold's pure functions don't need bnlab.nn)

    return nn


def find_pairs(model) -> list[tuple[str, object, str, str]]:
    """(qualified name, parent module, layer child name, BN child name) of every foldable pair."""
    nn = _nn()
    layers = (nn.Conv2d, nn.Linear)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d)
    pairs = []
    for pname, parent in model.named_modules():
        kids = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            candidates = zip(kids, kids[1:], strict=False)
        else:
            by_name = dict(kids)
            candidates = [
                ((n, m), (f"bn{n[4:]}", by_name[f"bn{n[4:]}"]))
                for n, m in kids
                if n.startswith("conv") and f"bn{n[4:]}" in by_name
            ]
        for (ln, lm), (bn_name, bm) in candidates:
            if isinstance(lm, layers) and isinstance(bm, norms) and bm.track_running_stats:
                qual = f"{pname}.{ln}" if pname else ln
                pairs.append((qual, parent, ln, bn_name))
    return pairs


def _check_eval_mode(model) -> None:
    nn = _nn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a bnlab.nn.Module, got {type(model).__name__}")
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            "fold needs a model in eval mode: BN in training mode normalizes with batch "
            f"statistics, which a folded conv cannot reproduce. Call model.eval() first "
            f"(in training mode: {', '.join(training[:5])}{', ...' if len(training) > 5 else ''})"
        )


def fold_pair_weights(layer, bn) -> tuple[np.ndarray, np.ndarray]:
    """The folded (weight, bias) of ``bn(layer(x))``, in the layer's dtype."""
    return fold_conv_bn(
        layer.weight.data,
        None if layer.bias is None else layer.bias.data,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        None if bn.weight is None else bn.weight.data,
        None if bn.bias is None else bn.bias.data,
    )


def _apply_fold(folded_model, pairs) -> None:
    nn = _nn()
    mods = dict(folded_model.named_modules())
    for qual, _, ln, bn_name in pairs:
        parent = mods[qual.rsplit(".", 1)[0]] if "." in qual else folded_model
        layer, bn = getattr(parent, ln), getattr(parent, bn_name)
        w, b = fold_pair_weights(layer, bn)
        layer.weight.data = w
        layer.register_parameter("bias", nn.Parameter(b))
        setattr(parent, bn_name, nn.Identity())


def fold(model, calibration=None):
    """Fold every ``conv/linear -> BN`` pair; returns ``(folded_model, FoldCertificate)``.

    ``model`` must be in eval mode (``ValueError`` otherwise, nothing changed). ``calibration``
    is an input batch (e.g. (N, C, H, W)); without it the certificate lists the folded pairs
    with NaN errors.
    """
    _check_eval_mode(model)
    pairs = find_pairs(model)
    folded = copy.deepcopy(model)
    _apply_fold(folded, pairs)
    if calibration is None:
        nan = float("nan")
        rows = [PairError(q, nan, nan, nan, nan) for q, *_ in pairs]
        return folded, FoldCertificate(rows, None)
    return folded, certify(model, folded, pairs, calibration)


def certify(model, folded, pairs, calibration) -> FoldCertificate:
    """Errors of every folded pair and of the whole model on ``calibration`` (see module doc)."""
    nn = _nn()
    x = np.asarray(calibration)
    if not np.issubdtype(x.dtype, np.floating):
        raise DTypeError(f"calibration must be a float array batch, got dtype {x.dtype}")
    model64 = copy.deepcopy(model).to(np.float64)
    mods64 = dict(model64.named_modules())
    inputs = _record_inputs(model64, [mods64[q] for q, *_ in pairs])
    mods32, folded32 = dict(model.named_modules()), dict(folded.named_modules())
    with nn.no_grad():
        ref64 = model64(x.astype(np.float64))
        rows = []
        for q, _, _, bn_name in pairs:
            bn_q = f"{q.rsplit('.', 1)[0]}.{bn_name}" if "." in q else bn_name
            xin = inputs[q]
            ref = mods64[bn_q](mods64[q](xin))
            x32 = xin.astype(np.float32)
            unf = mods32[bn_q](mods32[q](x32))
            rows.append(error_row(q, ref, folded32[q](x32), unf))
        x32 = x.astype(np.float32)
        whole = error_row("<whole model>", ref64, folded(x32), model(x32))
    return FoldCertificate(rows, whole)


def _record_inputs(model, layers) -> dict[str, np.ndarray]:
    """Run-time capture of each listed layer's input (by qualified name), via instance forwards."""
    names = {id(m): q for q, m in model.named_modules()}
    captured: dict[str, np.ndarray] = {}
    for layer in layers:
        cls_forward = type(layer).forward

        def recording(x, _layer=layer, _fwd=cls_forward):
            captured[names[id(_layer)]] = x
            return _fwd(_layer, x)

        object.__setattr__(layer, "forward", recording)
    return captured
