"""cs231n's normalization layers as the assignment specifies them, in plain NumPy (written here
from the assignment's docstrings and the notebook's derivation): the peer bnlab's adapters are
compared with, step by step, inside the same nets and Solver runs. Caches are tuples.
"""

from __future__ import annotations

import numpy as np


def batchnorm_forward(x, gamma, beta, bn_param):
    mode = bn_param["mode"]
    eps, momentum = bn_param.get("eps", 1e-5), bn_param.get("momentum", 0.9)
    D = x.shape[1]
    running_mean = bn_param.get("running_mean", np.zeros(D, dtype=x.dtype))
    running_var = bn_param.get("running_var", np.zeros(D, dtype=x.dtype))
    if mode == "train":
        mu, var = x.mean(axis=0), x.var(axis=0)
        x_hat = (x - mu) / np.sqrt(var + eps)
        out = gamma * x_hat + beta
        cache = (x_hat, gamma, var, eps, x - mu)
        running_mean = momentum * running_mean + (1 - momentum) * mu
        running_var = momentum * running_var + (1 - momentum) * var
    elif mode == "test":
        out = gamma * (x - running_mean) / np.sqrt(running_var + eps) + beta
        cache = None
    else:
        raise ValueError(f'Invalid forward batchnorm mode "{mode}"')
    bn_param["running_mean"], bn_param["running_var"] = running_mean, running_var
    return out, cache


def batchnorm_backward(dout, cache):
    """Through the graph: x̂ = xmu·ivar, ivar = 1/sqrt(var + eps), var = mean(xmu²), xmu = x − μ."""
    x_hat, gamma, var, eps, xmu = cache
    m = dout.shape[0]
    dbeta, dgamma = dout.sum(axis=0), (dout * x_hat).sum(axis=0)
    dx_hat = dout * gamma
    sqrtvar = np.sqrt(var + eps)
    divar = (dx_hat * xmu).sum(axis=0)
    dvar = -0.5 / sqrtvar**3 * divar
    dxmu = dx_hat / sqrtvar + 2 * xmu * dvar / m
    dx = dxmu - dxmu.sum(axis=0) / m
    return dx, dgamma, dbeta


def batchnorm_backward_alt(dout, cache):
    """Closed form: dx = γ/(m·σ) · (m·dy − Σdy − x̂·Σ(dy·x̂))."""
    x_hat, gamma, var, eps, _ = cache
    m = dout.shape[0]
    dbeta, dgamma = dout.sum(axis=0), (dout * x_hat).sum(axis=0)
    dx = gamma / (m * np.sqrt(var + eps)) * (m * dout - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


def layernorm_forward(x, gamma, beta, ln_param):
    eps = ln_param.get("eps", 1e-5)
    mu, var = x.mean(axis=1, keepdims=True), x.var(axis=1, keepdims=True)
    x_hat = (x - mu) / np.sqrt(var + eps)
    return gamma * x_hat + beta, (x_hat, gamma, var, eps)


def layernorm_backward(dout, cache):
    x_hat, gamma, var, eps = cache
    d = x_hat.shape[1]
    dx_hat = dout * gamma
    dx = (
        d * dx_hat - dx_hat.sum(1, keepdims=True) - x_hat * (dx_hat * x_hat).sum(1, keepdims=True)
    ) / (d * np.sqrt(var + eps))
    return dx, (dout * x_hat).sum(axis=0), dout.sum(axis=0)


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    N, C, H, W = x.shape
    rows, cache = batchnorm_forward(x.transpose(0, 2, 3, 1).reshape(-1, C), gamma, beta, bn_param)
    return rows.reshape(N, H, W, C).transpose(0, 3, 1, 2), cache


def spatial_batchnorm_backward(dout, cache):
    N, C, H, W = dout.shape
    rows = dout.transpose(0, 2, 3, 1).reshape(-1, C)
    dx, dgamma, dbeta = batchnorm_backward_alt(rows, cache)
    return dx.reshape(N, H, W, C).transpose(0, 3, 1, 2), dgamma, dbeta


def spatial_groupnorm_forward(x, gamma, beta, G, gn_param):
    eps = gn_param.get("eps", 1e-5)
    N, C, H, W = x.shape
    xg = x.reshape(N, G, -1)
    mu, var = xg.mean(axis=2, keepdims=True), xg.var(axis=2, keepdims=True)
    x_hat = ((xg - mu) / np.sqrt(var + eps)).reshape(x.shape)
    return gamma * x_hat + beta, (x_hat, gamma, var, eps, G)


def spatial_groupnorm_backward(dout, cache):
    x_hat, gamma, var, eps, G = cache
    N, C, H, W = dout.shape
    dgamma = (dout * x_hat).sum(axis=(0, 2, 3), keepdims=True)
    dbeta = dout.sum(axis=(0, 2, 3), keepdims=True)
    dxh, xh = (dout * gamma).reshape(N, G, -1), x_hat.reshape(N, G, -1)
    m = xh.shape[2]
    dx = (m * dxh - dxh.sum(2, keepdims=True) - xh * (dxh * xh).sum(2, keepdims=True)) / (
        m * np.sqrt(var + eps)
    )
    return dx.reshape(dout.shape), dgamma, dbeta
