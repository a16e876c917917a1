"""cs231n assignment 2 run with bnlab's adapters in place of the student's layers.py functions:
every normalization cell of BatchNormalization.ipynb and ConvolutionalNetworks.ipynb with the
notebooks' seeds and printed tolerances, and the Solver on real Fashion-MNIST padded to 3x32x32,
step for step against the textbook layers."""

from __future__ import annotations

import contextlib

import cs231n_textbook as textbook
import numpy as np
import pytest
from cs231n_cells import CELLS
from cs231n_harness import FullyConnectedNet, Solver, SpatialBNConvNet, fashion_mnist_as_cifar

import bnlab
from bnlab.backend import numba_available
from bnlab.functional import cs231n as bnlab_layers

BACKENDS = ["numpy"] + (["numba"] if numba_available() else [])


@contextlib.contextmanager
def backend_set(name):
    before = bnlab.get_backend()
    bnlab.set_backend(name)
    try:
        yield
    finally:
        bnlab.set_backend(before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.__name__)
def test_notebook_cell(cell, backend):
    with backend_set(backend):
        rows = cell(bnlab_layers)
    failed = [
        f"{r.check}: {r.value:.3g} > {r.tolerance:.3g} ({r.stated})" for r in rows if not r.ok
    ]
    assert not failed, f"{rows[0].cell}: " + "; ".join(failed)


def test_cells_reproduce_the_notebooks_data():
    """The harness draws what the notebooks draw: cell 41's input statistics as published."""
    np.random.seed(231)
    x = 4 * np.random.randn(2, 3, 4, 5) + 10
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), [9.33463814, 8.90909116, 9.11056338])
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), [3.61447857, 3.19347686, 3.5168142])


@pytest.fixture(scope="module")
def small_data(fashion_mnist_session):
    return fashion_mnist_as_cifar(num_train=400, num_val=100)


def _solve(model_fn, layers, data, seed=231):
    np.random.seed(seed)
    solver = Solver(model_fn(layers), data, batch_size=50, num_epochs=2, num_train_samples=400)
    solver.train()
    return solver


MODELS = {
    "batchnorm": lambda layers: FullyConnectedNet(
        [100] * 5, layers, normalization="batchnorm", weight_scale=2e-2
    ),
    "layernorm": lambda layers: FullyConnectedNet(
        [100] * 5, layers, normalization="layernorm", weight_scale=2e-2
    ),
    "spatial-batchnorm": lambda layers: SpatialBNConvNet(layers, num_filters=8),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_solver_on_fashion_mnist_matches_the_textbook_step_for_step(small_data, model):
    """BatchNormalization.ipynb's deep-net Solver cell (6 layers, Adam 1e-3, batches of 50) and a
    conv net with spatial batch norm, 2 epochs on 400 real images: bnlab's adapters give the
    textbook layers' losses and accuracies at every step, and the nets learn."""
    ours = _solve(MODELS[model], bnlab_layers, small_data)
    theirs = _solve(MODELS[model], textbook, small_data)
    np.testing.assert_allclose(ours.loss_history, theirs.loss_history, rtol=1e-9)
    assert ours.train_acc_history == theirs.train_acc_history
    assert ours.val_acc_history == theirs.val_acc_history
    assert np.mean(ours.loss_history[-4:]) < 0.75 * np.mean(ours.loss_history[:4])
    assert ours.train_acc_history[-1] > 0.5 and ours.best_val_acc > 0.5
