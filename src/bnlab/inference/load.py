"""Any supported network description -> :class:`~bnlab.inference.graph.Graph`.

=====================================  =================================================
what                                   read by
=====================================  =================================================
a ``Graph``                            (as is)
a path to an ``.onnx`` file            :mod:`bnlab.inference.import_onnx` (``onnx`` extra)
a training run folder or checkpoint    :func:`bnlab.inference.import_bnlab.from_checkpoint`
a weight file (.safetensors/.npz/.pt)  a bottleneck ResNet or LeNet(-BN) state dict
a ``torch.nn.Module`` (eval mode)      :mod:`bnlab.inference.import_torch` (torch.export)
a ``bnlab.nn`` model (eval mode)       :func:`bnlab.inference.import_bnlab.from_bnlab_module`
a mapping name -> array                a bottleneck ResNet or LeNet(-BN) state dict
=====================================  =================================================
"""

from __future__ import annotations

from pathlib import Path

from bnlab.inference.graph import Graph


def to_graph(obj, input_shape=None) -> Graph:
    """The graph of ``obj`` (see the module table); ``input_shape`` (C, H, W) is the example
    input torch.export traces a torch model with (default: the first conv's channels, 224²)."""
    from bnlab.inference import import_bnlab as B  # noqa: PLC0415

    if isinstance(obj, Graph):
        return obj.validate()
    if isinstance(obj, (str, Path)) or hasattr(obj, "__fspath__"):
        return _from_path(Path(obj))
    if _is_torch_module(obj):
        from bnlab.inference.import_torch import from_torch  # noqa: PLC0415

        return from_torch(obj, input_shape)
    if _is_bnlab_module(obj):
        return B.from_bnlab_module(obj)
    if hasattr(obj, "items"):
        from bnlab.inference.spec import to_numpy_state_dict  # noqa: PLC0415

        return B.from_state_dict(to_numpy_state_dict(obj))
    raise TypeError(
        "expected an .onnx path, a weight file or run folder, a torch or bnlab model, or a "
        f"state_dict mapping name -> array, got {type(obj).__name__}"
    )


def _from_path(path: Path) -> Graph:
    from bnlab.inference import import_bnlab as B  # noqa: PLC0415

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".onnx":
        from bnlab.inference.import_onnx import from_onnx  # noqa: PLC0415

        return from_onnx(path)
    if B.is_checkpoint(path):
        return B.from_checkpoint(path)
    from bnlab.io import load_weights  # noqa: PLC0415

    graph = B.from_state_dict(load_weights(path))
    graph.source = str(path)
    return graph


def _is_torch_module(obj) -> bool:
    return any(
        c.__module__.startswith("torch.nn") and c.__name__ == "Module" for c in type(obj).__mro__
    )


def _is_bnlab_module(obj) -> bool:
    return any(
        c.__module__ == "bnlab.nn.module" and c.__name__ == "Module" for c in type(obj).__mro__
    )
