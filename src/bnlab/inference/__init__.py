"""Fast CPU inference: any BN CNN from bnlab, PyTorch or ONNX, BN folded, on an NHWC engine.

    predict = bnlab.inference.compile(model_or_path)   # a torch/bnlab model, .onnx, weights
    logits = predict(images)                            # (N, C, H, W) float32 -> (N, classes)

:mod:`bnlab.inference.load` reads the network into a graph (:mod:`.graph`), :mod:`.passes`
folds BN and fuses activations and residual adds, :mod:`.engine` runs it;
:mod:`.reference` is the slow NumPy evaluation everything is checked against.
``docs/inference.md`` has the supported operators and the measured speed.
"""

from __future__ import annotations

from bnlab.inference.engine import CompiledNet
from bnlab.inference.graph import Graph, UnsupportedOperatorError

__all__ = ["CompiledNet", "Graph", "UnsupportedOperatorError", "compile", "fold_graph"]


def fold_graph(model_or_path, calibration=None, *, input_shape=None):
    """``(graph, folded_graph, certificate)``: the network as a graph, the same with every BN
    folded into its conv/linear (BN-free), and the fold's error certificate on ``calibration``
    (an input batch; None skips the certificate)."""
    from bnlab.inference import passes  # noqa: PLC0415
    from bnlab.inference.load import to_graph  # noqa: PLC0415

    graph = to_graph(model_or_path, input_shape)
    folded, pairs = passes.fold_batch_norms(graph)
    cert = None if calibration is None else passes.certify(graph, folded, pairs, calibration)
    return graph, folded, cert


def compile(  # noqa: A001
    model_or_path,
    layout: str = "NHWC",
    fold_bn: bool = True,
    *,
    threads: int | None = None,
    batch_chunk: int | None = None,
    input_shape=None,
    calibration=None,
    winograd: bool = True,
) -> CompiledNet:
    """Compile a CNN for inference on this CPU; returns ``predict(x, layout="NCHW")``.

    ``model_or_path``: a ``torch.nn.Module`` in eval mode (captured with ``torch.export``;
    ``input_shape=(C, H, W)`` sets the example input, default the first conv's channels at
    224x224), a path to an ``.onnx`` file, a bnlab model, a weight file or state dict of a
    bottleneck ResNet or LeNet(-BN), or a training run folder (``bnlab train``).
    ``layout`` is the engine's activation layout; only "NHWC" is implemented. ``fold_bn=True``
    folds every BN into its conv; ``False`` keeps it as a per-channel scale + shift in the conv's
    epilogue (for checking the fold). ``threads``: worker threads (default: the CPUs this
    process may use). ``batch_chunk``: run larger batches this many images at a time.
    ``calibration``: an input batch; then ``predict.certificate`` holds the fold's measured
    error (:class:`bnlab.fold.FoldCertificate`). ``winograd=False`` runs 3x3 convs directly.
    An operator the engine does not implement raises :class:`UnsupportedOperatorError`
    naming it and its node.
    """
    from bnlab.inference import passes  # noqa: PLC0415
    from bnlab.inference.load import to_graph  # noqa: PLC0415

    if layout != "NHWC":
        raise ValueError(
            f"layout must be 'NHWC' (the only engine layout implemented), got {layout!r}"
        )
    if not isinstance(fold_bn, bool):
        raise TypeError(f"fold_bn must be True or False, got {fold_bn!r}")
    for name, v in (("batch_chunk", batch_chunk), ("threads", threads)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int or None, got {v!r}")
    graph = to_graph(model_or_path, input_shape)
    folded, pairs = passes.fold_batch_norms(graph, fold=fold_bn)
    cert = None
    if calibration is not None:
        cert = passes.certify(graph, folded, pairs, calibration) if fold_bn else None
    return CompiledNet(
        passes.fuse(folded),
        threads=threads,
        batch_chunk=batch_chunk,
        winograd=winograd,
        certificate=cert,
        folded_pairs=pairs,
    )
