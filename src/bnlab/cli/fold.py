"""``bnlab fold``: fold every BN of a weight file into its conv and print the error certificate."""

from __future__ import annotations

HELP = "fold BN into the preceding conv/linear of a ResNet-50 or LeNet-BN weight file"
OUT_SUFFIXES = (".safetensors", ".npz")


def add_arguments(parser) -> None:
    parser.add_argument("--weights", required=True, help="input weights (.safetensors/.npz/.pt)")
    parser.add_argument("--out", required=True, help="output weights (.safetensors or .npz)")
    parser.add_argument(
        "--calibration", help="a .npy input batch for the certificate (default: seeded random)"
    )
    parser.add_argument("--certificate", help="also write the certificate as JSON to this path")
    parser.add_argument(
        "--no-certificate", action="store_true", help="skip the float64 check (faster)"
    )


def run(args) -> int:
    import sys
    from pathlib import Path

    import numpy as np

    from bnlab.errors import DataFormatError, DTypeError
    from bnlab.fold.files import fold_state_dict
    from bnlab.io import atomic_write_json, load_weights, save_npz, save_safetensors

    src, out = Path(args.weights), Path(args.out)
    try:
        if out.suffix.lower() not in OUT_SUFFIXES:
            raise ValueError(f"--out must end in {' or '.join(OUT_SUFFIXES)}, got {out.name!r}")
        if out.exists() and src.exists() and out.resolve() == src.resolve():
            raise ValueError("--out must differ from --weights (the input is never overwritten)")
        sd = load_weights(src)
        calib = None
        if args.calibration:
            calib = np.load(args.calibration, allow_pickle=False)
        folded, name, cert = fold_state_dict(sd, calib, certify=not args.no_certificate)
    except (FileNotFoundError, DataFormatError, DTypeError, KeyError, ValueError) as err:
        print(f"bnlab fold: error: {err}", file=sys.stderr)
        return 2
    save = save_safetensors if out.suffix.lower() == ".safetensors" else save_npz
    save(out, {k: np.ascontiguousarray(v) for k, v in folded.items()})  # atomic write
    print(f"{name}: folded {src} -> {out} ({len(sd)} arrays in, {len(folded)} out)")
    if cert is not None:
        print(cert)
        if args.certificate:
            atomic_write_json(args.certificate, cert.to_dict())
    return 0
