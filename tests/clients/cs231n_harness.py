"""The parts of cs231n assignment 2 (2021) that call the normalization layers, written here from
the assignment's descriptions: the notebooks' ``rel_error``, the numeric gradient checkers, the
affine/ReLU/softmax layers, ``FullyConnectedNet`` with batch or layer norm, a small conv net with
spatial batch norm, and the ``Solver`` with Adam. Data: real Fashion-MNIST padded to 3x32x32.

The normalization layers come from a ``norm`` namespace (module or object) with cs231n's function
names, so the same net runs on bnlab's adapters (:mod:`bnlab.functional.cs231n`) or on the
textbook layers of :mod:`cs231n_textbook`.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# --------------------------------------------------------------------------- checks


def rel_error(x, y):
    """The notebooks' relative error: max |x − y| / max(1e-8, |x| + |y|), elementwise."""
    return np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y)))


def eval_numerical_gradient(f, x, h=1e-5):
    """Central differences of a scalar f(x) in every entry of x (x perturbed in place)."""
    grad = np.zeros_like(x)
    for ix in np.ndindex(x.shape):
        old = x[ix]
        x[ix] = old + h
        fxph = f(x)
        x[ix] = old - h
        fxmh = f(x)
        x[ix] = old
        grad[ix] = (fxph - fxmh) / (2 * h)
    return grad


def eval_numerical_gradient_array(f, x, df, h=1e-5):
    """Central differences of Σ df·f(x) in every entry of x (x perturbed in place)."""
    grad = np.zeros_like(x)
    for ix in np.ndindex(x.shape):
        old = x[ix]
        x[ix] = old + h
        pos = f(x).copy()
        x[ix] = old - h
        neg = f(x).copy()
        x[ix] = old
        grad[ix] = np.sum((pos - neg) * df) / (2 * h)
    return grad


# --------------------------------------------------------------------------- plain layers


def affine_forward(x, w, b):
    out = x.reshape(x.shape[0], -1) @ w + b
    return out, (x, w)


def affine_backward(dout, cache):
    x, w = cache
    dx = (dout @ w.T).reshape(x.shape)
    return dx, x.reshape(x.shape[0], -1).T @ dout, dout.sum(axis=0)


def relu_forward(x):
    return np.maximum(0, x), x


def relu_backward(dout, x):
    return dout * (x > 0)


def softmax_loss(scores, y):
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = scores.shape[0]
    loss = -log_probs[np.arange(n), y].mean()
    dscores = np.exp(log_probs)
    dscores[np.arange(n), y] -= 1
    return loss, dscores / n


def conv3x3_forward(x, w, b):
    """3x3 convolution, stride 1, zero padding 1: (N, C, H, W) -> (N, F, H, W)."""
    windows = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), (2, 3))
    out = np.einsum("nchwij,fcij->nfhw", windows, w, optimize=True) + b[None, :, None, None]
    return out, (windows, w)


def conv3x3_backward_params(dout, cache):
    """dw, db of the first layer (its input needs no gradient)."""
    windows, _ = cache
    return np.einsum("nchwij,nfhw->fcij", windows, dout, optimize=True), dout.sum(axis=(0, 2, 3))


def max_pool2x2_forward(x):
    n, c, h, w = x.shape
    blocks = x.reshape(n, c, h // 2, 2, w // 2, 2)
    out = blocks.max(axis=(3, 5))
    return out, (blocks, out)


def max_pool2x2_backward(dout, cache):
    blocks, out = cache
    mask = blocks == out[:, :, :, None, :, None]
    mask = mask / mask.sum(axis=(3, 5), keepdims=True)  # ties share the gradient
    n, c, h2, _, w2, _ = blocks.shape
    return (mask * dout[:, :, :, None, :, None]).reshape(n, c, 2 * h2, 2 * w2)


# --------------------------------------------------------------------------- the nets


class FullyConnectedNet:
    """{affine - [batch/layer norm] - relu} x (L - 1) - affine - softmax, cs231n's weight init
    (N(0, weight_scale²) weights, zero biases, γ = 1, β = 0) and L2 regularization 0.5·reg·ΣW²."""

    def __init__(
        self,
        hidden_dims,
        norm,
        input_dim=3 * 32 * 32,
        num_classes=10,
        normalization=None,
        reg=0.0,
        weight_scale=1e-2,
        dtype=np.float32,
    ):
        self.norm, self.normalization, self.reg = norm, normalization, reg
        self.num_layers = len(hidden_dims) + 1
        dims = [input_dim, *hidden_dims, num_classes]
        self.params = {}
        for i in range(self.num_layers):
            self.params[f"W{i + 1}"] = weight_scale * np.random.randn(dims[i], dims[i + 1])
            self.params[f"b{i + 1}"] = np.zeros(dims[i + 1])
            if normalization and i < self.num_layers - 1:
                self.params[f"gamma{i + 1}"] = np.ones(dims[i + 1])
                self.params[f"beta{i + 1}"] = np.zeros(dims[i + 1])
        for k, v in self.params.items():
            self.params[k] = v.astype(dtype)
        self.bn_params = [
            {"mode": "train"} if normalization == "batchnorm" else {}
            for _ in range(self.num_layers - 1)
        ]

    def _norm_forward(self, a, i):
        g, b = self.params[f"gamma{i + 1}"], self.params[f"beta{i + 1}"]
        if self.normalization == "batchnorm":
            return self.norm.batchnorm_forward(a, g, b, self.bn_params[i])
        return self.norm.layernorm_forward(a, g, b, self.bn_params[i])

    def _norm_backward(self, d, cache):
        if self.normalization == "batchnorm":
            return self.norm.batchnorm_backward_alt(d, cache)
        return self.norm.layernorm_backward(d, cache)

    def loss(self, X, y=None):
        mode = "test" if y is None else "train"
        if self.normalization == "batchnorm":
            for bn_param in self.bn_params:
                bn_param["mode"] = mode
        h, caches = X, []
        for i in range(self.num_layers - 1):
            h, c_aff = affine_forward(h, self.params[f"W{i + 1}"], self.params[f"b{i + 1}"])
            c_norm = None
            if self.normalization:
                h, c_norm = self._norm_forward(h, i)
            h, c_relu = relu_forward(h)
            caches.append((c_aff, c_norm, c_relu))
        L = self.num_layers
        scores, c_last = affine_forward(h, self.params[f"W{L}"], self.params[f"b{L}"])
        if y is None:
            return scores
        loss, d = softmax_loss(scores, y)
        loss += 0.5 * self.reg * sum(np.sum(self.params[f"W{i + 1}"] ** 2) for i in range(L))
        grads = {}
        d, grads[f"W{L}"], grads[f"b{L}"] = affine_backward(d, c_last)
        for i in reversed(range(L - 1)):
            c_aff, c_norm, c_relu = caches[i]
            d = relu_backward(d, c_relu)
            if self.normalization:
                d, grads[f"gamma{i + 1}"], grads[f"beta{i + 1}"] = self._norm_backward(d, c_norm)
            d, grads[f"W{i + 1}"], grads[f"b{i + 1}"] = affine_backward(d, c_aff)
        for i in range(L):
            grads[f"W{i + 1}"] += self.reg * self.params[f"W{i + 1}"]
        return loss, grads


class SpatialBNConvNet:
    """conv 3x3 (F filters) - spatial batch norm - relu - 2x2 max pool - affine - softmax."""

    def __init__(
        self, norm, num_filters=8, input_dim=(3, 32, 32), num_classes=10, weight_scale=1e-2
    ):
        c, h, w = input_dim
        self.norm, self.bn_param = norm, {"mode": "train"}
        self.params = {
            "W1": weight_scale * np.random.randn(num_filters, c, 3, 3),
            "b1": np.zeros(num_filters),
            "gamma1": np.ones(num_filters),
            "beta1": np.zeros(num_filters),
            "W2": weight_scale * np.random.randn(num_filters * h * w // 4, num_classes),
            "b2": np.zeros(num_classes),
        }

    def loss(self, X, y=None):
        p = self.params
        self.bn_param["mode"] = "test" if y is None else "train"
        a, c_conv = conv3x3_forward(X, p["W1"], p["b1"])
        a, c_bn = self.norm.spatial_batchnorm_forward(a, p["gamma1"], p["beta1"], self.bn_param)
        a, c_relu = relu_forward(a)
        a, c_pool = max_pool2x2_forward(a)
        scores, c_aff = affine_forward(a, p["W2"], p["b2"])
        if y is None:
            return scores
        loss, d = softmax_loss(scores, y)
        grads = {}
        d, grads["W2"], grads["b2"] = affine_backward(d, c_aff)
        d = relu_backward(max_pool2x2_backward(d, c_pool), c_relu)
        d, grads["gamma1"], grads["beta1"] = self.norm.spatial_batchnorm_backward(d, c_bn)
        grads["W1"], grads["b1"] = conv3x3_backward_params(d, c_conv)
        return loss, grads


# --------------------------------------------------------------------------- the Solver


def adam(w, dw, config):
    """Adam with bias correction; ``config`` holds the learning rate and the moments."""
    config.setdefault("learning_rate", 1e-3)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.999)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("m", np.zeros_like(w))
    config.setdefault("v", np.zeros_like(w))
    config.setdefault("t", 0)
    config["t"] += 1
    config["m"] = config["beta1"] * config["m"] + (1 - config["beta1"]) * dw
    config["v"] = config["beta2"] * config["v"] + (1 - config["beta2"]) * dw**2
    m_hat = config["m"] / (1 - config["beta1"] ** config["t"])
    v_hat = config["v"] / (1 - config["beta2"] ** config["t"])
    return w - config["learning_rate"] * m_hat / (np.sqrt(v_hat) + config["epsilon"]), config


class Solver:
    """cs231n's Solver: random minibatches, one Adam config per parameter, train/val accuracy on
    up to ``num_train_samples`` examples at every epoch end, the best parameters kept."""

    def __init__(
        self,
        model,
        data,
        *,
        batch_size=50,
        num_epochs=2,
        learning_rate=1e-3,
        num_train_samples=1000,
        print_every=None,
    ):
        self.model, self.data = model, data
        self.batch_size, self.num_epochs = batch_size, num_epochs
        self.num_train_samples = num_train_samples
        self.configs = {k: {"learning_rate": learning_rate} for k in model.params}
        self.loss_history, self.train_acc_history, self.val_acc_history = [], [], []
        self.best_val_acc, self.best_params = 0.0, {}
        self.print_every = print_every

    def _step(self):
        n = self.data["X_train"].shape[0]
        idx = np.random.choice(n, self.batch_size)
        loss, grads = self.model.loss(self.data["X_train"][idx], self.data["y_train"][idx])
        self.loss_history.append(loss)
        for k, w in self.model.params.items():
            self.model.params[k], self.configs[k] = adam(w, grads[k], self.configs[k])

    def check_accuracy(self, X, y, num_samples=None, batch_size=100):
        if num_samples is not None and X.shape[0] > num_samples:
            idx = np.random.choice(X.shape[0], num_samples)
            X, y = X[idx], y[idx]
        preds = [
            np.argmax(self.model.loss(X[i : i + batch_size]), axis=1)
            for i in range(0, X.shape[0], batch_size)
        ]
        return float(np.mean(np.concatenate(preds) == y))

    def train(self):
        n = self.data["X_train"].shape[0]
        per_epoch = max(n // self.batch_size, 1)
        total = self.num_epochs * per_epoch
        for t in range(total):
            self._step()
            if self.print_every and t % self.print_every == 0:
                print(f"(Iteration {t + 1} / {total}) loss: {self.loss_history[-1]:f}")
            if t == 0 or t == total - 1 or (t + 1) % per_epoch == 0:
                self._record_accuracy()
        self.model.params = self.best_params

    def _record_accuracy(self):
        d = self.data
        train_acc = self.check_accuracy(d["X_train"], d["y_train"], self.num_train_samples)
        val_acc = self.check_accuracy(d["X_val"], d["y_val"])
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        if val_acc > self.best_val_acc:
            self.best_val_acc = val_acc
            self.best_params = {k: v.copy() for k, v in self.model.params.items()}


# --------------------------------------------------------------------------- data


def fashion_mnist_as_cifar(num_train=500, num_val=200, seed=0):
    """Real Fashion-MNIST as cs231n's CIFAR-10 arrays: 28x28 padded to 32x32, the gray channel
    repeated to 3, the mean training image subtracted, (N, 3, 32, 32) float64."""
    from bnlab.data import load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    rng = np.random.default_rng(seed)
    pick = rng.choice(images.shape[0], num_train + num_val, replace=False)
    x = np.pad(images[pick].astype(np.float64), ((0, 0), (2, 2), (2, 2)))
    x = np.repeat(x[:, None], 3, axis=1)
    y = labels[pick].astype(np.int64)
    mean_image = x[:num_train].mean(axis=0)
    x -= mean_image
    return {
        "X_train": x[:num_train],
        "y_train": y[:num_train],
        "X_val": x[num_train:],
        "y_val": y[num_train:],
    }
