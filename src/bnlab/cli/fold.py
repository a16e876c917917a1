"""``bnlab fold``: fold every BN of a network into its conv and print the error certificate."""

from __future__ import annotations

HELP = "fold BN into the preceding conv/linear of an ONNX file, weight file or training run"
WEIGHT_SUFFIXES = (".safetensors", ".npz")


def add_arguments(parser) -> None:
    from bnlab.cli._args import input_file, output_file
    from bnlab.cli._model import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument(
        "--out",
        required=True,
        type=output_file,
        help="the folded model: .onnx for an ONNX input, else .safetensors or .npz",
    )
    parser.add_argument(
        "--calibration",
        type=input_file,
        help="a .npy input batch (N, C, H, W) for the certificate (default: seeded random)",
    )
    parser.add_argument(
        "--certificate", type=output_file, help="also write the certificate as JSON to this path"
    )
    parser.add_argument(
        "--no-certificate", action="store_true", help="skip the float64 check (faster)"
    )


def run(args) -> int:
    from pathlib import Path

    from bnlab.cli._model import model_argument
    from bnlab.errors import UsageError

    src = Path(args.model or args.weights or "")
    out = Path(args.out)
    onnx_in = src.suffix.lower() == ".onnx"
    want = (".onnx",) if onnx_in else WEIGHT_SUFFIXES
    if out.suffix.lower() not in want:
        raise UsageError(f"--out must end in {' or '.join(want)}, got {out.name!r}")
    src = model_argument(args, "fold")
    if out.exists() and out.resolve() == src.resolve():
        raise UsageError("--out must differ from the model (the input is never overwritten)")
    if args.no_certificate and args.calibration:
        raise UsageError("--calibration and --no-certificate contradict each other")
    calibration = None if args.calibration is None else read_calibration(Path(args.calibration))
    if onnx_in:
        name, n_in, cert = _fold_onnx(src, out, calibration, not args.no_certificate)
    else:
        name, n_in, cert = _fold_weights(src, out, calibration, not args.no_certificate)
    print(f"{name}: folded {src} -> {out} ({n_in})")
    if cert is not None:
        print(cert)
        if args.certificate:
            from bnlab.io import atomic_write_json

            atomic_write_json(args.certificate, cert.to_dict())
    return 0


def read_calibration(path):
    """A finite float (N, C, H, W) batch from a .npy file (pickles refused)."""
    import numpy as np

    from bnlab.errors import DataFormatError, DTypeError, NonFiniteError, ShapeError

    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as err:
        raise DataFormatError(
            f"{path}: not a readable .npy array (pickles refused): {err}"
        ) from err
    if not np.issubdtype(x.dtype, np.floating):
        raise DTypeError(f"{path}: the calibration batch must be float, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or 0 in x.shape:
        raise ShapeError(f"{path}: the calibration batch must be (N, C, H, W), got {x.shape}")
    if not np.isfinite(x).all():
        raise NonFiniteError(f"{path}: the calibration batch contains NaN or Inf")
    return x


def _default_calibration(graph, shape_hw):
    import numpy as np

    h, w = shape_hw
    n = 2 if h * w <= 64 * 64 else 1
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, graph.in_channels, h, w)).astype(np.float32)


def _check_certificate(cert) -> None:
    import math

    from bnlab.errors import NonFiniteError

    rows = cert.pairs + ([cert.model] if cert.model else [])
    if not all(math.isfinite(v) for r in rows for v in (r.folded_max_abs, r.unfolded_max_abs)):
        raise NonFiniteError(
            "the certificate came out non-finite: the network overflows on "
            "the calibration batch (nothing written)"
        )


def _check_channels(graph, x, path) -> None:
    from bnlab.errors import ShapeError

    if x is not None and x.shape[1] != graph.in_channels:
        raise ShapeError(
            f"--calibration {path}: the model takes {graph.in_channels} channels, "
            f"the batch has shape {x.shape}"
        )


def _fold_onnx(src, out, calibration, certify: bool):
    from bnlab.inference import passes
    from bnlab.inference.export_onnx import fold_onnx
    from bnlab.inference.import_onnx import from_model, from_onnx
    from bnlab.io import atomic_write_bytes

    graph = from_onnx(src)
    _check_channels(graph, calibration, src)
    model, folded_layers, affine = fold_onnx(src)
    cert = None
    if certify:
        x = calibration if calibration is not None else _default_calibration(graph, _onnx_hw(model))
        folded_graph, pairs = passes.fold_batch_norms(graph)
        written = from_model(model, str(out))  # the file as written: its whole-model error
        cert = passes.certify(graph, folded_graph, pairs, x, whole_model=written)
        _check_certificate(cert)
    atomic_write_bytes(out, model.SerializeToString())
    note = f"{len(folded_layers)} BN folded" + (f", {len(affine)} as Mul + Add" if affine else "")
    return "onnx", note, cert


def _onnx_hw(model) -> tuple[int, int]:
    """The input's H and W when the file fixes them, else 64 x 64."""
    inits = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = inp.type.tensor_type.shape.dim
    hw = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 64 for d in dims[2:4]]
    return (hw[0], hw[1]) if len(hw) == 2 else (64, 64)


def _fold_weights(src, out, calibration, certify: bool):
    import numpy as np

    from bnlab.errors import ShapeError
    from bnlab.fold.files import fold_state_dict
    from bnlab.inference.import_bnlab import is_checkpoint
    from bnlab.io import load_weights, save_npz, save_safetensors

    if is_checkpoint(src):
        from bnlab.checkpoint import load_checkpoint

        sd = load_checkpoint(src).model_state
    else:
        sd = load_weights(src)
    first = next((v for v in sd.values() if getattr(v, "ndim", 0) == 4), None)  # the first conv
    if calibration is not None and first is not None and calibration.shape[1] != first.shape[1]:
        raise ShapeError(
            f"--calibration: the model takes {first.shape[1]} channels, the batch "
            f"has shape {calibration.shape}"
        )
    folded, name, cert = fold_state_dict(sd, calibration, certify=certify)
    if cert is not None:
        _check_certificate(cert)
    save = save_safetensors if out.suffix.lower() == ".safetensors" else save_npz
    save(out, {k: np.ascontiguousarray(v) for k, v in folded.items()})  # atomic write
    return name, f"{len(sd)} arrays in, {len(folded)} out", cert
