"""Fast CPU inference: a compiled NHWC engine for bottleneck ResNets with BN folded away.

    predict = bnlab.inference.compile(model_or_state_dict)     # ResNet-50 and deeper
    logits = predict(images)                                   # (N, 3, H, W) float32 -> (N, 1000)

See :mod:`bnlab.inference.engine` for what is fused and packed, ``docs/inference.md`` for numbers.
"""

from __future__ import annotations

from bnlab.inference.engine import CompiledResNet, compile_resnet

__all__ = ["CompiledResNet", "compile"]


def compile(  # noqa: A001
    model_or_state_dict,
    layout: str = "NHWC",
    fold_bn: bool = True,
    *,
    batch_chunk=None,
    gemm: str = "auto",
    threads: int | None = None,
) -> CompiledResNet:
    """Compile a bottleneck ResNet (bnlab model, PyTorch model or state dict) for inference.

    ``layout`` is the engine's activation layout; only "NHWC" is implemented (1x1 convs are then
    plain GEMMs). ``fold_bn=True`` folds every BN into its conv; ``False`` keeps BN as a fused
    per-channel scale and shift (slower by one multiply, useful to check the fold).
    ``batch_chunk``: run larger batches this many images at a time (activations then stay in
    cache; None = the whole batch in one pass). ``gemm="packed"`` runs the convs on bnlab's
    AVX-512 GEMM with fused epilogue (:mod:`bnlab.inference._gemm`); ``"blas"`` on ``np.matmul``
    plus a separate epilogue pass (the reference); ``"auto"`` (default) picks "packed" on CPUs
    with AVX-512, else "blas" (the packed kernel is correct everywhere, fast with zmm registers).
    ``threads``: worker threads of the packed GEMM (default: the CPUs this process may use).

    Returns a callable ``predict(x, layout="NCHW") -> logits (N, classes)``; the model may be a
    path to a .safetensors/.npz/.pt file, too.
    """
    if layout != "NHWC":
        raise ValueError(
            f"layout must be 'NHWC' (the only engine layout implemented), got {layout!r}"
        )
    if not isinstance(fold_bn, bool):
        raise TypeError(f"fold_bn must be True or False, got {fold_bn!r}")
    if batch_chunk is not None and (isinstance(batch_chunk, bool) or not isinstance(
        batch_chunk, int) or batch_chunk < 1):  # fmt: skip
        raise ValueError(f"batch_chunk must be a positive int or None, got {batch_chunk!r}")
    if gemm not in ("auto", "packed", "blas"):
        raise ValueError(f"gemm must be 'auto', 'packed' or 'blas', got {gemm!r}")
    if gemm == "auto":
        from bnlab.inference._gemm import host_has_avx512  # noqa: PLC0415

        gemm = "packed" if host_has_avx512() else "blas"
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):  # fmt: skip
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return compile_resnet(model_or_state_dict, fold_bn=fold_bn, batch_chunk=batch_chunk,
                          gemm=gemm, threads=threads)  # fmt: skip
