"""The graph layer: torch.export import of every supported operator, the passes (BN fold, fusion)
and the float64 reference evaluation, each checked against PyTorch; unsupported operators.

Tolerances: the reference evaluation in float64 vs PyTorch in float64: 1e-12 relative; the
engine (float32) vs PyTorch (float32) on these shallow networks: 1e-5 of the largest output.
"""

from __future__ import annotations

import numpy as np
import pytest

import bnlab.inference
from bnlab.inference import UnsupportedOperatorError, passes, reference
from bnlab.inference.import_torch import from_torch

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


class Everything(nn.Module):
    """One of each operator the engine supports, in the shapes torchvision does not cover."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=(1, 2), dilation=(1, 2), bias=True)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16)
        self.grp = nn.Conv2d(16, 32, 3, padding=1, groups=4)  # 4 in, 8 out per group: dense
        self.bn_after_add = nn.BatchNorm2d(32)  # cannot be folded
        self.side = nn.Conv2d(16, 32, 1, stride=1)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.mpool = nn.MaxPool2d(2, stride=1, dilation=2)
        self.fc = nn.Linear(48 * 2 * 2, 20)
        self.bn1d = nn.BatchNorm1d(20)
        self.out = nn.Linear(20, 7)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        x = F.relu6(self.bn(self.conv(x)))
        x = F.hardswish(self.dw(x))
        y = self.grp(x) + self.side(x)
        y = F.silu(self.bn_after_add(y))
        y = y * torch.sigmoid(F.adaptive_avg_pool2d(y, 1))  # squeeze-excitation style gate
        y = torch.cat([self.pool(y), self.pool(x)], dim=1)
        y = self.mpool(F.hardsigmoid(y) * 2.0 - 0.5)
        y = F.adaptive_avg_pool2d(y, (2, 2))
        y = self.drop(torch.flatten(y, 1))  # flatten of a 2x2 map: PyTorch's channel order
        y = torch.sigmoid(self.bn1d(self.fc(y)))
        return F.softmax(self.out(y) / 3.0, dim=1)


@pytest.fixture(scope="module")
def everything():
    torch.manual_seed(0)
    return randomize_bn(Everything())


def test_every_operator_through_torch_export(everything):
    x = np.random.default_rng(0).standard_normal((3, 3, 17, 15)).astype(np.float32)
    with torch.no_grad():
        ref32 = everything(torch.from_numpy(x)).numpy()
        ref64 = everything.double()(torch.from_numpy(x).double()).numpy()
        everything.float()
    graph = from_torch(everything, input_shape=(3, 17, 15))
    np.testing.assert_allclose(reference.run(graph, x), ref64, rtol=1e-12, atol=1e-14)
    predict = bnlab.inference.compile(everything, input_shape=(3, 17, 15), threads=2)
    np.testing.assert_allclose(predict(x), ref32, rtol=0, atol=1e-5 * np.abs(ref32).max())
    ops = {nd.op for nd in predict.graph.nodes}
    assert {"affine", "concat", "softmax", "mul", "maxpool", "avgpool"} <= ops
    assert "bn" not in ops and len(predict.folded_pairs) == 2  # conv+bn, fc+bn1d


def test_unfolded_engine_equals_folded(everything):
    """fold_bn=False keeps each BN as the conv's scale + shift: same outputs."""
    x = np.random.default_rng(1).standard_normal((2, 3, 17, 15)).astype(np.float32)
    a = bnlab.inference.compile(everything, input_shape=(3, 17, 15))(x)
    b = bnlab.inference.compile(everything, input_shape=(3, 17, 15), fold_bn=False)(x)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(a).max())


def test_passes_fold_and_fuse_a_residual_block():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)

        def forward(self, x):
            return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x)

    model = randomize_bn(Block())
    graph = from_torch(model, input_shape=(8, 6, 6))
    folded, pairs = passes.fold_batch_norms(graph)
    fused = passes.fuse(folded)
    assert len(pairs) == 2 and [nd.op for nd in fused.nodes] == ["conv", "conv"]
    last = fused.nodes[-1]
    assert len(last.inputs) == 2 and last.attrs["act"][0] == 1  # residual and ReLU fused
    x = np.random.default_rng(2).standard_normal((2, 8, 6, 6))
    with torch.no_grad():
        ref = model.double()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(reference.run(graph, x), ref, rtol=1e-12, atol=1e-14)
    for g in (folded, fused):  # folded weights are stored in the weights' float32
        np.testing.assert_allclose(reference.run(g, x), ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_gated_activations_become_silu_and_hardswish():
    class Gates(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x) + x * F.hardsigmoid(x)

    graph = passes.fuse(from_torch(Gates().eval(), input_shape=(3, 4, 4)))
    assert sorted(nd.attrs["act"][0] for nd in graph.nodes if nd.op == "act") == [3, 5]


@pytest.mark.parametrize(
    ("module", "needles"),
    [(nn.GELU(), ["gelu"]), (nn.LayerNorm([3, 8, 8]), ["layer_norm"]),
     (nn.Upsample(scale_factor=2), ["upsample"]), (nn.LeakyReLU(), ["leaky_relu"])],
    ids=["gelu", "layernorm", "upsample", "leakyrelu"],
)  # fmt: skip
def test_unsupported_torch_operators_name_the_operator_and_the_node(module, needles):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), module).eval()
    with pytest.raises(UnsupportedOperatorError) as info:
        bnlab.inference.compile(model, input_shape=(3, 8, 8))
    msg = str(info.value)
    assert all(n in msg for n in needles) and "node" in msg, msg


def test_training_mode_and_bad_models_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="eval"):
        bnlab.inference.compile(model)
    with pytest.raises(ValueError, match="input_shape"):
        bnlab.inference.compile(nn.Sequential(nn.Linear(3, 4)).eval())
    with pytest.raises(TypeError, match="state_dict"):
        bnlab.inference.compile(3.5)


def test_lenet_bn_of_bnlab_runs_on_the_engine():
    """bnlab's own LeNet-BN (sigmoid, average pooling, BN1d after linear layers)."""
    from bnlab import nn as bnn
    from bnlab.models import lenet_bn

    model = lenet_bn(seed=3)
    for m in model.modules():
        if hasattr(m, "running_var"):
            m.running_mean[...] = np.linspace(-1, 1, m.num_features)
            m.running_var[...] = np.linspace(0.5, 2, m.num_features)
    model.eval()
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
    with bnn.no_grad():
        ref = model(x)
    predict = bnlab.inference.compile(model, threads=2)
    np.testing.assert_allclose(predict(x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert len(predict.folded_pairs) == 4
