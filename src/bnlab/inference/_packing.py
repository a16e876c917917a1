"""Conv and linear layers packed for the engine's kernels, once, at compile time.

A graph conv (BN already folded, or kept as a per-channel scale) becomes a :class:`PackedConv`:

* dense and grouped convs: the weight (C_out, C_in/g, kh, kw) as GEMM panels
  (ceil(C_out/32), kh·kw·chn, 32) whose rows (i, j, q) match the im2col columns of an input
  channel window [ch0, ch0 + chn). For groups = 1 the window is every channel; for a grouped
  conv each 32-column panel reads the window of the groups its output channels belong to, and
  the panel is block-diagonal in it (zeros where an output channel does not read an input
  channel): exact, and one GEMM kernel for every group size (ResNeXt's groups of 4-32
  channels would otherwise be GEMMs 4-32 columns wide);
* depthwise convs (groups = C_in = C_out): taps (kh·kw, C) for :mod:`._depthwise`;
* grouped convs with 2-16 channels per group: taps (kh·kw, cg, C) for :mod:`._grouped`;
* 3x3 convs: the Winograd transform of the weight, made on first use (:mod:`._winograd`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnlab.inference import _act
from bnlab.inference import _depthwise as DW
from bnlab.inference import _gemm as G
from bnlab.inference import _grouped as GR
from bnlab.inference import _winograd as WG
from bnlab.inference.graph import Node

EMPTY = np.zeros(0, np.float32)


@dataclass(eq=False)
class PackedConv:
    """``y = act(conv(x)·scale + shift [+ residual])`` with its weights laid out for the kernels."""

    name: str
    weight: np.ndarray  # (C_out, C_in/g, kh, kw) float32, BN folded
    shift: np.ndarray  # (C_out,) float32
    scale: np.ndarray  # (C_out,) float32, or empty when BN is folded into the weight
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int
    act: tuple = _act.IDENTITY
    panels: np.ndarray | None = None  # GEMM panels (ceil(C_out/32), kh·kw·chn, 32)
    ch0: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # window per panel
    chn: int = 0  # input channels of each panel's window
    taps: np.ndarray | None = None  # depthwise (kh·kw, C), or grouped (kh·kw, cg, C)
    wino: np.ndarray | None = None  # Winograd U panels, made on demand

    @property
    def c_out(self) -> int:
        return self.weight.shape[0]

    @property
    def c_in(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weight.shape[2], self.weight.shape[3]

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.c_in == self.c_out

    @property
    def pointwise(self) -> bool:
        """A 1x1 conv without padding and groups: a GEMM on the (subsampled) input matrix."""
        return self.kernel == (1, 1) and self.pads == (0, 0, 0, 0) and self.groups == 1

    def winograd_panels(self) -> np.ndarray:
        if self.wino is None:
            self.wino = WG.pack_filter(self.weight)
        return self.wino


def pack_conv(nd: Node) -> PackedConv:
    """The kernels' layouts of a conv node's weight (float32)."""
    p, a = nd.params, nd.attrs
    w = np.asarray(p["weight"], np.float32)
    c_out = w.shape[0]
    shift = np.asarray(p["bias"], np.float32) if "bias" in p else np.zeros(c_out, np.float32)
    scale = np.asarray(p["scale"], np.float32) if "scale" in p else EMPTY
    pc = PackedConv(
        nd.name, w, shift, scale, a["stride"], a["pads"], a["dilation"], a["groups"], a["act"]
    )
    if pc.depthwise:
        pc.taps = DW.pack_weight(w)
    elif GR.supported(pc.c_in, pc.c_out, pc.groups):
        pc.taps = GR.pack_weight(w)
    else:
        pc.panels, pc.ch0, pc.chn = pack_grouped(w, pc.groups)
    return pc


def pack_weight(w: np.ndarray) -> np.ndarray:
    """(C_out, C_in, kh, kw) -> (kh·kw·C_in, C_out), rows ordered (i, j, c) like im2col."""
    c_out = w.shape[0]
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, c_out), dtype=np.float32)


def pack_grouped(w: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(panels, ch0 per panel, chn) of a (grouped) conv weight (C_out, C_in/g, kh, kw)."""
    c_out, cg_in, kh, kw = w.shape
    if groups == 1:
        panels = G.pack_panels(pack_weight(w))
        return panels, np.zeros(panels.shape[0], np.int64), cg_in
    cg_out, c_in = c_out // groups, cg_in * groups
    n_pan = -(-c_out // G.NR)
    first = [(p * G.NR) // cg_out for p in range(n_pan)]
    last = [(min(p * G.NR + G.NR, c_out) - 1) // cg_out for p in range(n_pan)]
    chn = max((l1 - g0 + 1) * cg_in for g0, l1 in zip(first, last, strict=True))
    ch0 = np.array([min(g0 * cg_in, c_in - chn) for g0 in first], np.int64)
    panels = np.zeros((n_pan, kh * kw * chn, G.NR), np.float32)
    for p in range(n_pan):
        for col, o in enumerate(range(p * G.NR, min(p * G.NR + G.NR, c_out))):
            q0 = (o // cg_out) * cg_in - ch0[p]  # where the group's channels sit in the window
            block = np.zeros((kh, kw, chn), np.float32)
            block[:, :, q0 : q0 + cg_in] = w[o].transpose(1, 2, 0)
            panels[p, :, col] = block.reshape(-1)
    return panels, ch0, int(chn)


@dataclass(eq=False)
class PackedLinear:
    """``y = act(x @ W^T + b)`` with W packed as GEMM panels."""

    name: str
    panels: np.ndarray
    shift: np.ndarray
    c_in: int
    c_out: int
    act: tuple = _act.IDENTITY
    scale: np.ndarray = field(default_factory=lambda: EMPTY)


def pack_linear(nd: Node) -> PackedLinear:
    w = np.asarray(nd.params["weight"], np.float32)
    b = nd.params.get("bias")
    shift = np.zeros(w.shape[0], np.float32) if b is None else np.asarray(b, np.float32)
    return PackedLinear(
        nd.name,
        G.pack_panels(np.ascontiguousarray(w.T)),
        shift,
        w.shape[1],
        w.shape[0],
        nd.attrs["act"],
    )
