"""The end-to-end case of ``bench_torch.py --resnet18``: one SGD training step of a CIFAR-style
ResNet-18 (batch 64, 32×32×3, 10 classes), four ways in the same run:

* stock eager     — the plain PyTorch model below;
* stock compiled  — ``torch.compile`` of it (inductor, default mode);
* converted eager — ``bnlab.torch.convert`` of a copy (same weights);
* converted compiled — ``torch.compile`` of the converted copy (bnlab's custom ops in the graph).

The model is the usual CIFAR adaptation (He et al. 2016, as in many public CIFAR training
scripts): a 3×3 stem without max-pooling, four stages of two basic blocks (64, 128, 256, 512
channels, stride 2 from the second stage on, 1×1 projection shortcuts), global average pooling
and a linear classifier. Twenty BatchNorm2d layers see from (64, 64, 32, 32) to (64, 512, 4, 4).
"""

from __future__ import annotations

import copy

import torch
from _bench_common import time_interleaved
from _torch_sweep import paired_speedup
from torch import nn

import bnlab.torch as bt


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        out = self.blocks(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def _trainer(model: nn.Module, x, labels, compiled: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    forward = torch.compile(model) if compiled else model
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(forward(x), labels)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def resnet18_case(batch: int = 64, repeat: int = 7, log=print) -> dict:
    """Median ms per training step of the four variants, and their ratios."""
    torch.manual_seed(0)
    stock = ResNet18()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    models = {
        "stock eager": copy.deepcopy(stock),
        "stock compiled": copy.deepcopy(stock),
        "converted eager": bt.convert(copy.deepcopy(stock)),
        "converted compiled": bt.convert(copy.deepcopy(stock)),
    }
    steps = {
        name: _trainer(m, x, labels, compiled="compiled" in name) for name, m in models.items()
    }
    first = {}
    for name, step in steps.items():  # compiles here, and checks the first losses agree
        first[name] = float(step())
        log(f"  first step of {name}: loss {first[name]:.6f}")
    base = first["stock eager"]
    for name, loss in first.items():
        if abs(loss - base) > 1e-3 * max(1.0, abs(base)):
            raise AssertionError(f"{name} loss {loss} differs from stock eager {base}")
    times = time_interleaved(steps, repeat=repeat, warmup=2)
    ms = {name: t["median_ms"] for name, t in times.items()}

    def speedup(base, peer):  # median over rounds of base/peer in the same round
        return paired_speedup(times, base, peer)

    return {
        "batch": batch,
        "median_ms": ms,
        "runs_ms": {name: t["runs_ms"] for name, t in times.items()},
        "first_loss": first,
        "converted_eager_vs_stock_eager": speedup("stock eager", "converted eager"),
        "converted_compiled_vs_stock_compiled": speedup("stock compiled", "converted compiled"),
        "stock_compiled_vs_stock_eager": speedup("stock eager", "stock compiled"),
        "converted_compiled_vs_stock_eager": speedup("stock eager", "converted compiled"),
    }
