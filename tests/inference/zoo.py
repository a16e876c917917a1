"""torchvision's classification CNNs with seeded random weights and non-trivial BN statistics.

The torchvision wheel on the package index is built against the CUDA torch, so its C extension
does not load next to this project's CPU torch and ``import torchvision`` fails in its meta
registrations ("operator torchvision::nms does not exist"). The model definitions are plain
Python: :func:`torchvision_models` imports them with the registration module replaced by an
empty one (nothing of it is needed to build or run the classification models).
"""

from __future__ import annotations

import sys
import types

ZOO = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnext50_32x4d",
    "vgg11_bn",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
)


def torchvision_models():
    """``torchvision.models``, or None when torchvision is not installed."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return None
    except RuntimeError:  # its C ops are missing: skip the registrations that need them
        for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[mod]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType(
            "torchvision._meta_registrations"
        )
        import torchvision  # noqa: F401
    from torchvision import models

    return models


def branch_end_norms(model) -> set[str]:
    """Names of the BatchNorm2d modules whose output feeds a residual add (directly or through
    torchvision's stochastic depth), found with torch.fx."""
    import operator

    import torch

    graph = torch.fx.symbolic_trace(model).graph
    adds = {operator.add, operator.iadd, torch.add, "add", "add_"}

    def feeds_add(node, depth=0):
        return any(
            u.target in adds
            or (depth < 2 and "stochastic_depth" in str(u.target) and feeds_add(u, depth + 1))
            for u in node.users
        )

    return {
        n.target
        for n in graph.nodes
        if n.op == "call_module"
        and isinstance(model.get_submodule(n.target), torch.nn.BatchNorm2d)
        and feeds_add(n)
    }


def build(name: str, seed: int = 0, calibration_size: int = 64):
    """torchvision's ``name`` in eval mode with seeded random weights (torchvision's own init)
    and non-trivial BN state: γ ~ U(0.4, 0.8) (x 0.1 on the last BN of each residual branch, as
    trained networks have it), β ~ N(0, 0.3²); statistics measured on one random batch with
    those γ, β (so activations stay O(1) through 100 layers), then perturbed per channel
    (μ by 0.1 σ, σ² by a factor in [0.8, 1.2]).

    Why these values: random deep networks amplify float32 rounding. With γ ~ U(0.6, 1.4)
    everywhere, PyTorch's own float32 logits of ResNet-101 or EfficientNet-B0 were 3e-5 to 3e-3
    (relative) away from its float64 logits, so no float32 engine could be checked against them
    at 1e-4. With these, PyTorch float32 vs float64 is <= 1e-5 on every network while the
    logits still differ between images by 3-97 % of their largest value."""
    import torch

    models = torchvision_models()
    torch.manual_seed(seed)
    model = getattr(models, name)()
    ends = branch_end_norms(model)
    g = torch.Generator().manual_seed(seed + 1)
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for n, m in bns:
            c = m.num_features
            m.reset_running_stats()
            m.momentum = None  # cumulative: one batch gives that batch's statistics
            m.weight.copy_((torch.rand(c, generator=g) * 0.4 + 0.4) * (0.1 if n in ends else 1))
            m.bias.copy_(torch.randn(c, generator=g) * 0.3)
        model.train()
        model(torch.randn(4, 3, calibration_size, calibration_size, generator=g))
        for _, m in bns:
            c = m.num_features
            m.running_mean.add_(torch.randn(c, generator=g) * 0.1 * m.running_var.sqrt())
            m.running_var.mul_(torch.rand(c, generator=g) * 0.4 + 0.8)
    return model.eval()


def export_onnx(model, path, size: int) -> None:
    """``model`` as an ONNX file (opset 17, BN kept as BatchNormalization, batch size dynamic),
    the file the tests and ``benchmarks/bench_zoo.py`` give to bnlab and ONNX Runtime alike."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, size, size),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
        )
