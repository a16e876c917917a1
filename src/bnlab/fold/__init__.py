"""Folding inference-mode batch norm away: pure weight functions, a model pass, a certificate.

    fold_conv_bn    BN after a conv/linear   (exact)
    fold_bn_conv    BN before a conv         (exact without zero padding; else refused/approximate)
    fold_bn_linear  BN1d before a linear     (exact)
    fold(model, calibration)  -> (folded_model, FoldCertificate)

Formulas in :mod:`bnlab.fold.weights`; ``docs/inference.md`` explains the certificate.
"""

from bnlab.fold.certificate import FoldCertificate, PairError
from bnlab.fold.model import find_pairs, fold
from bnlab.fold.weights import bn_scale_shift, fold_bn_conv, fold_bn_linear, fold_conv_bn

__all__ = [
    "FoldCertificate",
    "PairError",
    "bn_scale_shift",
    "find_pairs",
    "fold",
    "fold_bn_conv",
    "fold_bn_linear",
    "fold_conv_bn",
]
