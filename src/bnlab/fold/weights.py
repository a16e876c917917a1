"""Folding inference-mode batch norm into a neighbouring convolution or linear layer.

At inference BN is a per-channel affine map with fixed statistics:

    BN(z)_c = γ_c · (z_c − μ_c) / sqrt(σ²_c + ε) + β_c  =  s_c · z_c + t_c,
    s = γ / sqrt(σ² + ε),   t = β − μ · s.

**BN after a conv/linear** (``fold_conv_bn``), s and t act on *output* channels o:

    w'[o, ...] = w[o, ...] · s[o]          b'[o] = (b[o] − μ[o]) · s[o] + β[o]

This is exact (up to rounding) for every conv: padding, stride, groups and dilation don't matter.

**BN before a conv** (``fold_bn_conv``), s and t act on *input* channels c:

    w'[o, c, ...] = w[o, c, ...] · s[c]    b'[o] = b[o] + Σ_{c,kh,kw} w[o, c, kh, kw] · t[c]

This is exact only when every window sees real input values. With zero padding the unfolded
network pads the *normalized* activations with 0, while the folded one pads the raw input with 0,
which the fold turns into t instead of 0: the border outputs differ by the part of the
Σ w·t term that falls on padded positions. ``fold_bn_conv`` therefore refuses a padded conv unless
``approximate=True``. ``fold_bn_linear`` is the same fold for ``BN1d -> Linear`` (always exact).

Grouped convs (``groups=g``): output channel o reads input channels of its group only, so
w[o, j] multiplies input channel ``(o // (C_out/g)) · (C_in/g) + j``. Depthwise is g = C_in.

All arithmetic is in float64; results are cast back to the weight's dtype. Shapes:

    conv weight (C_out, C_in/g, kh, kw)     linear weight (C_out, C_in)     bias (C_out,)
    γ, β, μ, σ² (C,) with C the channels BN normalizes.

The model pass :func:`bnlab.fold.fold` applies these to every ``conv -> BN`` pair of a bnlab model
in eval mode and returns a certificate of the numerical error it introduced.
"""

from __future__ import annotations

import numpy as np

from bnlab.errors import DTypeError, NonFiniteError, ShapeError
from bnlab.functional._validate import check_eps

__all__ = ["bn_scale_shift", "fold_bn_conv", "fold_bn_linear", "fold_conv_bn"]


# --------------------------------------------------------------------------- validation


def _as_float_array(a, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor: accepted, converted without importing torch
        a = a.detach().cpu().numpy()
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    if not np.issubdtype(a.dtype, np.floating):
        raise DTypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    return a


def _check_vector(a, name: str, size: int) -> np.ndarray:
    a = _as_float_array(a, name)
    if a.shape != (size,):
        raise ShapeError(f"{name} must have shape ({size},), got {a.shape}")
    return a


def _check_weight(w, name: str = "weight") -> np.ndarray:
    w = _as_float_array(w, name)
    if w.ndim < 2:
        raise ShapeError(
            f"{name} must be a conv weight (C_out, C_in/groups, *kernel) or a linear weight "
            f"(C_out, C_in), got shape {w.shape}"
        )
    return w


def _check_finite(a: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(a).all():
        raise NonFiniteError(
            f"{name} contains NaN or Inf: a fold of it would give non-finite weights"
        )
    return a


def bn_scale_shift(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The inference BN as an affine map y = s·z + t, in float64.

        s = γ / sqrt(σ² + ε)        t = β − μ · s             all (C,)

    ``gamma``/``beta`` may be None (affine=False): taken as 1 and 0.
    """
    mean = _as_float_array(mean, "running_mean")
    if mean.ndim != 1:
        raise ShapeError(f"running_mean must be a vector (C,), got shape {mean.shape}")
    c = mean.shape[0]
    _check_finite(mean, "running_mean")
    var = _check_finite(_check_vector(var, "running_var", c), "running_var")
    if np.any(var < 0):
        raise ValueError("running_var must be >= 0 everywhere (a variance)")
    g = np.ones(c) if gamma is None else _check_vector(gamma, "gamma (BN weight)", c)
    b = np.zeros(c) if beta is None else _check_vector(beta, "beta (BN bias)", c)
    _check_finite(g, "gamma (BN weight)")
    _check_finite(b, "beta (BN bias)")
    s = g.astype(np.float64) / np.sqrt(var.astype(np.float64) + check_eps(eps))
    t = b.astype(np.float64) - mean.astype(np.float64) * s
    return s, t


def _broadcast_out(v: np.ndarray, ndim: int) -> np.ndarray:
    """(C_out,) -> (C_out, 1, ..., 1) to scale a weight's output channels."""
    return v.reshape((-1,) + (1,) * (ndim - 1))


def _bias_or_zeros(bias, c_out: int, dtype) -> np.ndarray:
    if bias is None:
        return np.zeros(c_out, dtype)
    return _check_vector(bias, "bias", c_out)


# --------------------------------------------------------------------------- pure weight folds


def fold_conv_bn(
    weight, bias, running_mean, running_var, eps: float = 1e-5, gamma=None, beta=None
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``BN(conv(x))`` (or ``BN(linear(x))``) into one conv/linear: returns ``(w', b')``.

        w'[o, ...] = w[o, ...] · s[o]        b' = (b − μ) · s + β,    s = γ / sqrt(σ² + ε)

    weight (C_out, C_in/g, *k) or (C_out, C_in); bias (C_out,) or None; BN vectors (C_out,).
    Argument order follows ``torch.nn.utils.fusion.fuse_conv_bn_weights``. Exact for any
    padding, stride, dilation and groups (depthwise included): BN only rescales output channels.
    """
    w = _check_weight(weight)
    c_out = w.shape[0]
    mean = _check_vector(running_mean, "running_mean", c_out)
    b = _bias_or_zeros(bias, c_out, w.dtype)
    s, t = bn_scale_shift(gamma, beta, mean, running_var, eps)
    w_new = w.astype(np.float64) * _broadcast_out(s, w.ndim)
    b_new = b.astype(np.float64) * s + t  # (b − μ)·s + β  ==  b·s + (β − μ·s)
    return w_new.astype(w.dtype), b_new.astype(w.dtype)


def _normalize_padding(padding, n_spatial: int) -> tuple[int, ...]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * n_spatial
        raise ValueError(
            f"padding={padding!r}: only integer paddings or 'valid' can be checked for an exact "
            "BN-before-conv fold"
        )
    if isinstance(padding, (int, np.integer)):
        return (int(padding),) * n_spatial
    pads = tuple(int(p) for p in padding)
    if len(pads) != n_spatial:
        raise ValueError(f"padding must have {n_spatial} entries, got {padding!r}")
    return pads


def fold_bn_conv(
    running_mean,
    running_var,
    eps: float,
    gamma,
    beta,
    weight,
    bias=None,
    *,
    padding=0,
    groups: int = 1,
    approximate: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``conv(BN(x))`` into one conv: returns ``(w', b')``.

        w'[o, j, ...] = w[o, j, ...] · s[c(o, j)]
        b'[o]         = b[o] + Σ_{j, kernel} w[o, j, ...] · t[c(o, j)]
        c(o, j)       = (o // (C_out/g)) · (C_in/g) + j     (input channel of column j)

    weight (C_out, C_in/g, *k); BN vectors (C_in,); bias (C_out,) or None.

    Exact only without zero padding: with padding the unfolded conv sees 0 at the border where the
    folded one effectively sees t = β − μ·s. Raises ``ValueError`` for a padded conv unless
    ``approximate=True`` (then the border outputs are off by that missing t-term).
    """
    w = _check_weight(weight)
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c_out, c_in_per_group = w.shape[0], w.shape[1]
    if c_out % groups:
        raise ShapeError(f"weight has {c_out} output channels, not divisible by groups={groups}")
    c_in = c_in_per_group * groups
    mean = _check_vector(running_mean, f"running_mean (C_in={c_in} for this conv)", c_in)
    pads = _normalize_padding(padding, w.ndim - 2)
    if any(pads) and not approximate:
        raise ValueError(
            f"cannot fold BN into the conv that follows it exactly: the conv zero-pads its input "
            f"(padding={padding!r}), and the unfolded network pads the *normalized* activations "
            "with 0 where the folded one would see β − μ·γ/σ. Pass approximate=True to fold "
            "anyway (border outputs then differ), or keep this BN unfolded."
        )
    b = _bias_or_zeros(bias, c_out, w.dtype)
    s, t = bn_scale_shift(gamma, beta, mean, running_var, eps)
    # Per (o, j): the input channel it reads, shape (C_out, C_in/g).
    group_of_out = np.arange(c_out) // (c_out // groups)
    channel = group_of_out[:, None] * c_in_per_group + np.arange(c_in_per_group)[None, :]
    spatial = (1,) * (w.ndim - 2)
    w64 = w.astype(np.float64)
    w_new = w64 * s[channel].reshape(channel.shape + spatial)
    shift = (w64 * t[channel].reshape(channel.shape + spatial)).reshape(c_out, -1).sum(axis=1)
    b_new = b.astype(np.float64) + shift
    return w_new.astype(w.dtype), b_new.astype(w.dtype)


def fold_bn_linear(
    running_mean, running_var, eps: float, gamma, beta, weight, bias=None
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``linear(BN1d(x))`` into one linear layer (always exact): returns ``(w', b')``.

        w'[o, c] = w[o, c] · s[c]          b' = b + w @ t

    weight (C_out, C_in); BN vectors (C_in,); bias (C_out,) or None.
    """
    w = _check_weight(weight)
    if w.ndim != 2:
        raise ShapeError(f"weight must be a linear weight (C_out, C_in), got shape {w.shape}")
    return fold_bn_conv(running_mean, running_var, eps, gamma, beta, w, bias)
