"""Packed layers of the compiled ResNet: BN folded (or kept as scale + shift), weights laid out
once for the GEMM (and, on demand, for Winograd)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab.fold.weights import bn_scale_shift, fold_conv_bn
from bnlab.inference import _gemm as G
from bnlab.inference import _winograd as WG
from bnlab.inference.spec import ConvSpec

EMPTY = np.zeros(0, np.float32)


@dataclass
class PackedConv:
    """A conv ready for GEMM: ``y = epilogue(im2col(x) @ w)``, epilogue y·scale + shift."""

    name: str
    w: np.ndarray  # (k·k·C_in, C_out) float32, contiguous
    shift: np.ndarray  # (C_out,) float32
    scale: np.ndarray  # (C_out,) float32, or empty when BN is folded into w
    k: int
    stride: int
    pad: int
    panels: np.ndarray | None = None  # w as (C_out/32, k·k·C_in, 32) for the packed GEMM
    wino: np.ndarray | None = None  # Winograd U panels (36, C_out/32, C_in, 32), made on demand

    @property
    def c_out(self) -> int:
        return self.w.shape[1]

    def winograd_panels(self) -> np.ndarray:
        """The F(4x4, 3x3) filter transform of the (folded, float32) weight, packed once."""
        if self.wino is None:
            c_in = self.w.shape[0] // 9
            w4 = self.w.reshape(3, 3, c_in, self.c_out).transpose(3, 2, 0, 1)  # (C_out, C_in, 3, 3)
            self.wino = WG.pack_filter(w4)
        return self.wino

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        return (h + 2 * self.pad - self.k) // self.stride + 1, (w + 2 * self.pad - self.k) // (
            self.stride
        ) + 1


def pack_weight(w: np.ndarray) -> np.ndarray:
    """(C_out, C_in, kh, kw) -> (kh·kw·C_in, C_out), rows ordered (i, j, c) like im2col."""
    c_out = w.shape[0]
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, c_out), dtype=np.float32)


def pack_conv(sd: dict, cv: ConvSpec, fold_bn: bool, eps: float) -> PackedConv:
    """Fold (or not) the BN of one conv, then pack. Accepts an already folded conv (bias, no BN)."""
    w = sd[f"{cv.conv}.weight"]
    b = sd.get(f"{cv.conv}.bias")
    scale = EMPTY
    if f"{cv.bn}.running_mean" in sd:
        bn = [sd[f"{cv.bn}.{p}"] for p in ("running_mean", "running_var", "weight", "bias")]
        if fold_bn:
            w, b = fold_conv_bn(w.astype(np.float64), b, bn[0], bn[1], eps, bn[2], bn[3])
        else:
            s, t = bn_scale_shift(bn[2], bn[3], bn[0], bn[1], eps)
            b0 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
            scale, b = s.astype(np.float32), b0 * s + t  # BN(conv + b0) = conv·s + (b0·s + t)
    shift = np.zeros(w.shape[0], np.float32) if b is None else np.asarray(b, np.float32)
    packed = pack_weight(w)
    panels = G.pack_panels(packed) if packed.shape[1] % G.NR == 0 else None
    return PackedConv(cv.conv, packed, shift, scale, cv.k, cv.stride, cv.pad, panels)


@dataclass
class PackedBlock:
    conv1: PackedConv
    conv2: PackedConv
    conv3: PackedConv
    downsample: PackedConv | None
