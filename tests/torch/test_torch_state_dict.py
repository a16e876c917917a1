"""The state-dict behaviours PyTorch's ``test/nn/test_load_state_dict.py`` checks with batch-norm
layers, checked with bnlab's (written for bnlab): strict and non-strict loading, wrong sizes,
version-1 state dicts without ``num_batches_tracked``, ``assign=True`` onto meta-device modules
(alone and with an optimizer), different strides — each with PyTorch's parameter swapping on and
off (``torch.__future__.set_swap_module_params_on_conversion``)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import bnlab.torch as bt  # noqa: E402


@pytest.fixture(params=[False, True], ids=["assign-params", "swap-params"])
def swap(request):
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(request.param)
    yield request.param
    torch.__future__.set_swap_module_params_on_conversion(before)


def _net():
    net = nn.Module()
    net.linear = nn.Linear(5, 5)
    net.bn = bt.BatchNorm2d(2)
    net.block = nn.Sequential(nn.Conv2d(3, 3, 3))
    return net


def test_strict_and_partial_loading(swap):
    net = _net()
    sd = net.state_dict()
    sd.update({"linear.weight": torch.ones(5, 5), "bn.running_mean": torch.randn(2)})
    result = net.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(net.bn.running_mean, sd["bn.running_mean"])
    extra = net.state_dict() | {"bn.extra": torch.ones(1)}
    with pytest.raises(RuntimeError, match="Unexpected key"):
        net.load_state_dict(extra)
    assert net.load_state_dict(extra, strict=False).unexpected_keys == ["bn.extra"]
    missing = net.state_dict()
    del missing["bn.running_var"]
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict(missing)
    assert net.load_state_dict(missing, strict=False).missing_keys == ["bn.running_var"]
    wrong = net.state_dict() | {"bn.running_mean": torch.rand(14, 4)}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="size mismatch for bn.running_mean"):
            net.load_state_dict(wrong, strict=strict)
    partial = {"bn.running_mean": torch.randn(2), "nonexistent": torch.rand(3)}
    before = copy.deepcopy(net.state_dict())
    net.load_state_dict(partial, strict=False)
    for k, v in net.state_dict().items():
        assert torch.equal(v, partial.get(k, before[k])), k


def test_version_1_state_dict_without_counter(swap):
    """num_batches_tracked came with state-dict version 2: a dict of version 1 (or none) loads
    without it, the counter staying the module's own (0 for a fresh one), as in torch.nn."""
    for counter in (0, 7):
        counters = []
        for cls in (nn.BatchNorm2d, bt.BatchNorm2d):
            bn = cls(3)
            bn.num_batches_tracked.fill_(counter)
            sd = bn.state_dict()
            del sd["num_batches_tracked"]
            for version in (1, None):
                if version is None:
                    del sd._metadata[""]["version"]
                else:
                    sd._metadata[""]["version"] = version
                bn.load_state_dict(sd)
                assert bn.num_batches_tracked.dtype == torch.long
                counters.append(bn.num_batches_tracked.item())
        assert counters == [counter] * 4


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.bn = bt.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc1(x))


@pytest.mark.parametrize("keep_vars", [False, True])
def test_assign_onto_a_meta_module(swap, keep_vars):
    net = _Model()
    net(torch.randn(8, 3))  # non-trivial statistics
    sd = net.state_dict(keep_vars=keep_vars)
    with torch.device("meta"):
        meta = _Model()
    meta.load_state_dict(sd, assign=True)
    for name, t in meta.state_dict(keep_vars=True).items():
        assert not t.is_meta, name
        assert torch.equal(t, sd[name]), name
    assert [n for n, _ in meta.named_buffers()] == [n for n, _ in net.named_buffers()]
    x = torch.randn(4, 3)
    net.eval(), meta.eval()
    torch.testing.assert_close(meta(x), net(x))


def test_assign_then_train_with_an_optimizer(swap):
    net = _Model()
    opt = torch.optim.Adam(net.parameters(), lr=1000)
    x = torch.randn(4, 3)
    for _ in range(3):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    opt_sd, net_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    with torch.device("meta"):
        meta = _Model()
    meta.load_state_dict(net_sd, assign=True)
    opt2 = torch.optim.Adam(meta.parameters(), lr=1000)  # after assign, as PyTorch requires
    opt2.load_state_dict(opt_sd)
    for _ in range(3):
        for model, optim in ((net, opt), (meta, opt2)):
            optim.zero_grad()
            model(x.clone()).sum().backward()
            optim.step()
    torch.testing.assert_close(opt.state_dict(), opt2.state_dict())
    torch.testing.assert_close(net.state_dict(), meta.state_dict())


def test_assign_accepts_other_strides_not_other_shapes(swap):
    net = _Model()
    sd = net.state_dict()
    sd["fc1.weight"] = torch.randn(3, 5).transpose(0, 1)
    _Model().load_state_dict(sd, strict=False, assign=True)
    sd["bn.running_var"] = torch.rand(4)
    with pytest.raises(RuntimeError, match="size mismatch for bn.running_var"):
        _Model().load_state_dict(sd, strict=False, assign=True)
