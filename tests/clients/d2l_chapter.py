"""d2l's "Batch Normalization" chapter (PyTorch), written here from the published chapter: its
``batch_norm`` function in both published versions, its ``BatchNorm`` class (moving statistics as
plain attributes, the function called with eps and momentum keywords), LeNet-BN, ``init_cnn``
and a ``train_ch6``-style loop (SGD, cross-entropy; accuracy in eval mode under no_grad).

``chapter_batchnorm(batch_norm, momentum)`` builds the chapter's class around any ``batch_norm``
with d2l's signature: the chapter's own function, or bnlab's drop-in.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn


def _moments(X):
    if X.dim() == 2:
        mean = X.mean(dim=0)
        return mean, ((X - mean) ** 2).mean(dim=0)
    mean = X.mean(dim=(0, 2, 3), keepdim=True)
    return mean, ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)


def d2l_batch_norm_v017(X, gamma, beta, moving_mean, moving_var, eps, momentum):
    """The chapter's function up to release 0.17: momentum weighs the old moving value."""
    if not torch.is_grad_enabled():
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        mean, var = _moments(X)
        X_hat = (X - mean) / torch.sqrt(var + eps)
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    return gamma * X_hat + beta, moving_mean.data, moving_var.data


def d2l_batch_norm_v1(X, gamma, beta, moving_mean, moving_var, eps, momentum):
    """The chapter's function from d2l 1.0 on: momentum weighs the new batch."""
    if not torch.is_grad_enabled():
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        mean, var = _moments(X)
        X_hat = (X - mean) / torch.sqrt(var + eps)
        moving_mean = (1.0 - momentum) * moving_mean + momentum * mean
        moving_var = (1.0 - momentum) * moving_var + momentum * var
    return gamma * X_hat + beta, moving_mean.data, moving_var.data


def chapter_batchnorm(batch_norm, momentum):
    """The chapter's ``BatchNorm`` class calling ``batch_norm`` (0.9 in the older text, 0.1 in
    d2l 1.0)."""

    class BatchNorm(nn.Module):
        def __init__(self, num_features, num_dims):
            super().__init__()
            shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
            self.gamma = nn.Parameter(torch.ones(shape))
            self.beta = nn.Parameter(torch.zeros(shape))
            self.moving_mean = torch.zeros(shape)  # plain attributes, as in d2l
            self.moving_var = torch.ones(shape)

        def forward(self, X):
            if self.moving_mean.device != X.device:
                self.moving_mean = self.moving_mean.to(X.device)
                self.moving_var = self.moving_var.to(X.device)
            Y, self.moving_mean, self.moving_var = batch_norm(
                X, self.gamma, self.beta, self.moving_mean, self.moving_var,
                eps=1e-5, momentum=momentum,
            )  # fmt: skip
            return Y

    return BatchNorm


def lenet_bn(bn2d, bn1d, seed=0):
    """The chapter's LeNet-BN with d2l's ``init_cnn`` (xavier_uniform on conv/linear weights)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), bn2d(6), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), bn2d(16), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), bn1d(120), nn.Sigmoid(),
        nn.Linear(120, 84), bn1d(84), nn.Sigmoid(),
        nn.Linear(84, 10),
    )  # fmt: skip
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
    return net


def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """Conv/Linear weights and every BN's γ/β of ``src`` into ``dst`` (d2l's gamma/beta and
    torch's weight/bias line up by position): the variants start from the same point."""
    with torch.no_grad():
        for a, b in zip(dst, src, strict=True):
            for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
                pa.copy_(pb.reshape(pa.shape))


def fashion_mnist_subset(num_train, num_test, seed=0):
    """Real Fashion-MNIST as d2l's loader gives it: float32 (N, 1, 28, 28) in [0, 1], int64 labels;
    a seeded random subset of the training split, the first ``num_test`` test images."""
    from bnlab.data import load_fashion_mnist

    xs, ys = load_fashion_mnist("train")
    pick = np.random.default_rng(seed).choice(xs.shape[0], num_train, replace=False)
    xt, yt = load_fashion_mnist("test")

    def tensors(x, y):
        return (torch.from_numpy(x.astype(np.float32) / 255.0)[:, None],
                torch.from_numpy(y.astype(np.int64)))  # fmt: skip

    return tensors(xs[pick], ys[pick]), tensors(xt[:num_test], yt[:num_test])


def batches(x, y, batch_size, epoch, seed=0):
    """Shuffled minibatches of one epoch (the same order for every model in a run)."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
    for i in range(0, x.shape[0], batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def evaluate_accuracy(net, x, y, batch_size=512):
    """Accuracy in eval mode under no_grad, as d2l evaluates."""
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            correct += (net(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
    return correct / x.shape[0]


def train_step(net, optimizer, X, y):
    net.train()
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(net(X), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_lockstep(nets: dict, train, test, *, epochs=2, lr=1.0, batch_size=256, seed=0):
    """Train every net on the same batches, step by step in a rotating order (load from other
    processes hits all alike). Returns per net: losses, seconds per step, test accuracy."""
    opts = {k: torch.optim.SGD(n.parameters(), lr=lr) for k, n in nets.items()}
    losses = {k: [] for k in nets}
    times = {k: [] for k in nets}
    names = list(nets)
    step = 0
    for epoch in range(epochs):
        for X, y in batches(*train, batch_size, epoch, seed):
            for k in names[step % len(names) :] + names[: step % len(names)]:
                t0 = time.perf_counter()
                losses[k].append(train_step(nets[k], opts[k], X, y))
                times[k].append(time.perf_counter() - t0)
            step += 1
    return {
        k: {
            "losses": losses[k],
            "step_seconds": times[k],
            "test_accuracy": evaluate_accuracy(nets[k], *test),
        }
        for k in names
    }
