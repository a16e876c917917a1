"""bnlab.torch.ghost.GhostBatchNorm1d/2d: equals the NumPy ghost reference (outputs, gradients,
running statistics under both rules), equals nn.BatchNorm when the virtual batch is the batch,
float64 gradcheck, state_dict interchangeable with nn.BatchNorm2d, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bnlab.functional.ghost import ghost_batch_norm_backward, ghost_batch_norm_forward  # noqa: E402
from bnlab.torch.ghost import GhostBatchNorm1d, GhostBatchNorm2d  # noqa: E402


@pytest.mark.parametrize("running_update", ["mean", "sequential"])
@pytest.mark.parametrize("cls,shape,layout", [(GhostBatchNorm2d, (10, 3, 2, 3), "NCHW"),
                                              (GhostBatchNorm1d, (11, 4), "NC")])  # fmt: skip
def test_matches_the_numpy_reference(rng, running_update, cls, shape, layout):
    c = shape[1]
    x = rng.standard_normal(shape) * 2 + 1
    dy = rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    m = cls(c, 4, running_update=running_update).double()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(gamma))
        m.bias.copy_(torch.from_numpy(beta))
    tx = torch.tensor(x, requires_grad=True)
    ty = m(tx)
    ty.backward(torch.from_numpy(dy))
    rm, rv, nbt = np.zeros(c), np.ones(c), np.array(0)
    y, cache = ghost_batch_norm_forward(
        x, gamma, beta, training=True, virtual_batch_size=4, running_mean=rm, running_var=rv,
        num_batches_tracked=nbt, layout=layout, running_update=running_update,
    )  # fmt: skip
    dx, dgamma, dbeta = ghost_batch_norm_backward(dy, cache)
    np.testing.assert_allclose(ty.detach().numpy(), y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tx.grad.numpy(), dx, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(m.weight.grad.numpy(), dgamma, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(m.bias.grad.numpy(), dbeta, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(m.running_mean.numpy(), rm, rtol=1e-12)
    np.testing.assert_allclose(m.running_var.numpy(), rv, rtol=1e-12)
    assert int(m.num_batches_tracked) == int(nbt)


def test_whole_batch_is_torch_batchnorm_in_train_and_eval(rng):
    x = torch.from_numpy(rng.standard_normal((6, 3, 4, 4)).astype(np.float32))
    ref, gh = torch.nn.BatchNorm2d(3), GhostBatchNorm2d(3, 6)
    for _ in range(2):
        torch.testing.assert_close(gh(x), ref(x), rtol=1e-5, atol=1e-5)
    for key, val in ref.state_dict().items():
        torch.testing.assert_close(gh.state_dict()[key], val, rtol=1e-6, atol=1e-7)
    gh.eval(), ref.eval()
    torch.testing.assert_close(gh(x), ref(x), rtol=1e-5, atol=1e-5)
    fresh = torch.nn.BatchNorm2d(3).eval()
    fresh.load_state_dict(gh.state_dict())  # same keys: loads into plain BatchNorm2d


def test_gradcheck_float64(rng):
    m = GhostBatchNorm2d(2, 3).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.7, 1.3], dtype=torch.float64))
    x = torch.tensor(rng.standard_normal((7, 2, 2, 2)), requires_grad=True)  # 3 + 3 + 1
    assert torch.autograd.gradcheck(lambda t: m(t), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.reliability
def test_bad_input_leaves_buffers_untouched(rng):
    with pytest.raises(ValueError, match="virtual_batch_size must be >= 1"):
        GhostBatchNorm2d(3, 0)
    with pytest.raises(ValueError, match="running_update must be one of"):
        GhostBatchNorm1d(3, 2, running_update="x")
    m = GhostBatchNorm1d(3, 4)
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 .* sizes \[4, 1\]"):
        m(torch.randn(5, 3))
    x = torch.randn(8, 3)
    x[6, 0] = float("nan")
    with pytest.warns(RuntimeWarning):
        m(x)
    assert torch.equal(m.running_mean, torch.zeros(3)) and int(m.num_batches_tracked) == 0
