"""Planning a forward pass: per input shape, a flat list of steps and the buffers they share.

A :class:`Planner` walks the engine's (folded, fused) graph once per input shape (and thread
pool), decides which kernel runs each node (that depends on the shape: Winograd needs enough
tiles) and emits steps ``(function, *args)`` from :mod:`bnlab.inference._steps`; an argument
that is a list is an arena slot, resolved once the arena is allocated.

Buffers: every value lives in one of a few flat arrays; a value's array returns to the free list
after its last reader ran, and an elementwise node whose input dies there writes in place. Two
nodes are merged at this stage: a 1x1 conv whose output is only the residual of another 1x1 conv
runs inside that conv's GEMM (:mod:`._fused`, two K segments, one epilogue).
"""

from __future__ import annotations

import numpy as np

from bnlab.inference import _direct as DC
from bnlab.inference import _steps as S
from bnlab.inference import _winograd as WG
from bnlab.inference._arena import Arena, Plan, bind, label
from bnlab.inference.graph import Node, UnsupportedOperatorError, infer_shapes

ELEMENTWISE = ("act", "affine", "add", "mul")


class Planner:
    """Turns a compiled network's graph into a :class:`Plan` whose steps run on ``pool``."""

    def __init__(self, net, pool):
        self.net = net
        self.pool = pool

    def build(self, n: int, h: int, w: int) -> Plan:
        graph = self.net.graph
        self.n = n
        self.shapes = infer_shapes(graph, h, w)
        self.arena = Arena()
        self.steps: list = []
        self.where: dict[str, int] = {}  # value -> buffer
        self.live: dict[int, int] = {}  # buffer -> live values in it
        absorbed, extra = self._fusions()
        readers = self._readers(absorbed, extra)
        x_slot = self.arena.view(self._new(graph.input), (n, h, w, graph.in_channels))
        for nd in graph.nodes:
            if id(nd) in absorbed:
                continue
            self._node(nd, extra.get(id(nd)))
            for v in _reads(nd, extra):
                readers[v] -= 1
                if readers[v] == 0:
                    self._drop(v)
        out = self._view(graph.output, self._storage(graph.output))
        self.arena.materialize()
        steps = [bind(s) for s in self.steps]
        return Plan(x_slot[0], steps, [label(s) for s in self.steps], out[0])

    # ------------------------------------------------------------------ buffers

    def _storage(self, v: str) -> tuple[int, ...]:
        s = self.shapes[v]
        return (self.n, s[1], s[2], s[0]) if len(s) == 3 else (self.n, s[0])

    def _new(self, v: str, buf: int | None = None) -> int:
        if buf is None:
            buf = self.arena.take(int(np.prod(self._storage(v))))
        self.where[v] = buf
        self.live[buf] = self.live.get(buf, 0) + 1
        return buf

    def _drop(self, v: str) -> None:
        buf = self.where[v]
        self.live[buf] -= 1
        if self.live[buf] == 0:
            self.arena.release(buf)

    def _view(self, v: str, shape) -> list:
        return self.arena.view(self.where[v], shape)

    def _mat(self, v: str) -> list:
        """The value as a matrix (rows, C): N·H·W pixels of a map, or N samples."""
        st = self._storage(v)
        return self._view(v, (int(np.prod(st[:-1])), st[-1]))

    def _map(self, v: str) -> list:
        return self._view(v, self._storage(v))

    def _readers(self, absorbed, extra) -> dict[str, int]:
        readers: dict[str, int] = {self.net.graph.output: 1}  # the output is never released
        for nd in self.net.graph.nodes:
            if id(nd) in absorbed:
                continue
            for v in _reads(nd, extra):
                readers[v] = readers.get(v, 0) + 1
        return readers

    def _output(self, nd: Node, inplace_from: str | None = None) -> int:
        """The buffer of nd's output: its dying input's buffer (elementwise in place) or new."""
        if inplace_from is not None:
            return self._new(nd.output, self.where[inplace_from])
        return self._new(nd.output)

    def _dies_here(self, nd: Node, v: str) -> bool:
        graph = self.net.graph
        later = [m for m in graph.nodes[graph.nodes.index(nd) + 1 :] if v in m.inputs]
        return (
            not later
            and v != graph.output
            and v != graph.input
            and self.shapes[v] == self.shapes[nd.output]
            and nd.inputs.count(v) == 1
        )

    # ------------------------------------------------------------------ fusions

    def _fusions(self):
        """Nodes another node's step does the work of: (absorbed node ids, {id: absorbed node}).

        * a 1x1 conv whose output is only the residual of another pointwise conv (folded BN):
          one GEMM with two K segments;
        * a squeeze-excitation scale x · s (s per image and channel) read only by a pointwise
          conv: the conv's GEMM runs per image with its weight rows scaled by s instead
          (K·C_out multiplies instead of H·W·K), when the map has more pixels than the conv
          has output channels."""
        net, graph = self.net, self.net.graph
        producers, consumers = graph.producers(), graph.consumers()
        absorbed, extra = set(), {}
        for nd in graph.nodes:
            if nd.op != "conv" or len(nd.inputs) != 2:
                continue
            conv, src = net.packed[nd.name], producers.get(nd.inputs[1])
            if src is None or src.op != "conv" or len(src.inputs) != 1:
                continue
            second = net.packed[src.name]
            if (
                conv.pointwise
                and conv.stride == (1, 1)
                and second.pointwise
                and conv.scale.size == 0
                and second.scale.size == 0
                and second.act[0] == 0
                and len(consumers[src.output]) == 1
                and src.output != graph.output
            ):
                absorbed.add(id(src))
                extra[id(nd)] = src
        for nd in graph.nodes:
            mul = producers.get(nd.inputs[0]) if nd.op == "conv" else None
            if mul is None or mul.op != "mul" or len(consumers[mul.output]) != 1:
                continue
            big, gate = _gated(mul, self.shapes)
            conv = net.packed[nd.name]
            if (big is not None and conv.pointwise and conv.stride == (1, 1)
                    and self.shapes[big][1] * self.shapes[big][2] >= conv.c_out
                    and mul.output != graph.output):  # fmt: skip
                absorbed.add(id(mul))
                extra[id(nd)] = mul
        return absorbed, extra

    # ------------------------------------------------------------------ nodes

    def _node(self, nd: Node, second: Node | None) -> None:  # noqa: C901 - one case per op
        op, pool = nd.op, self.pool
        if op == "conv":
            self._conv(nd, second)
        elif op == "linear":
            lin = self.net.packed[nd.name]
            a = self._mat(nd.inputs[0])
            self._new(nd.output)
            self.steps.append((S.packed_gemm, pool, a, lin, self._mat(nd.output), None))
        elif op in ELEMENTWISE:
            self._elementwise(nd)
        elif op in ("maxpool", "avgpool"):
            self._pool(nd)
        elif op == "adaptive_avgpool":
            x = nd.inputs[0]
            self._new(nd.output)
            if self.shapes[nd.output][1:] == (1, 1):
                c, h, w = self.shapes[x]
                self.steps.append(
                    (S.global_avgpool, self._view(x, (self.n, h * w, c)), self._mat(nd.output))
                )
            else:
                self.steps.append((S.adaptive_avgpool, pool, self._map(x), self._map(nd.output)))
        elif op == "flatten":
            x = nd.inputs[0]
            s = self.shapes[x]
            if len(s) == 1 or s[1:] == (1, 1):  # the same floats: an alias
                self._new(nd.output, self.where[x])
            else:
                self._new(nd.output)
                self.steps.append(
                    (S.flatten, self._view(x, (self.n, s[1] * s[2], s[0])), self._mat(nd.output))
                )
        elif op == "concat":
            parts = [self._mat(v) for v in nd.inputs]
            self._new(nd.output)
            self.steps.append((S.concat, parts, self._mat(nd.output)))
        elif op == "softmax":
            x = self._mat(nd.inputs[0])
            self._new(nd.output)
            self.steps.append((S.softmax, x, self._mat(nd.output)))
        else:  # pragma: no cover - the passes remove bn; Node validates the rest
            raise UnsupportedOperatorError(f"the engine has no kernel for {op} (node {nd.name})")

    def _elementwise(self, nd: Node) -> None:
        op, pool, shapes = nd.op, self.pool, self.shapes
        ins = nd.inputs
        if op == "mul" and shapes[ins[0]] != shapes[ins[1]]:  # a map times (N, C, 1, 1)
            big, small = (
                (ins[0], ins[1])
                if len(shapes[ins[1]]) == 3 and shapes[ins[1]][1:] == (1, 1)
                else (ins[1], ins[0])
            )
            c, h, w = shapes[big]
            self._output(nd, big if self._dies_here(nd, big) else None)
            self.steps.append(
                (
                    S.scale_channels,
                    pool,
                    self._view(big, (self.n, h * w, c)),
                    self._view(small, (self.n, c)),
                    self._view(nd.output, (self.n, h * w, c)),
                )
            )
            return
        if op == "add" and shapes[ins[0]] != shapes[ins[1]]:
            raise UnsupportedOperatorError(
                f"node {nd.name}: add of shapes {shapes[ins[0]]} and {shapes[ins[1]]} "
                "(broadcasting adds are not implemented)"
            )
        dying = next((v for v in ins if self._dies_here(nd, v)), None)
        srcs = [self._mat(v) for v in ins]
        self._output(nd, dying)
        out = self._mat(nd.output)
        if op == "add":
            self.steps.append((S.add, pool, srcs[0], srcs[1], out, nd.attrs["act"]))
        elif op == "mul":
            self.steps.append((S.mul, pool, srcs[0], srcs[1], out))
        elif op == "affine":
            c = self.shapes[nd.output][0]  # a scalar constant applies to every channel
            scale, shift = (
                np.broadcast_to(np.asarray(nd.params[k], np.float32), (c,)).copy()
                for k in ("scale", "shift")
            )
            self.steps.append((S.affine, pool, srcs[0], scale, shift, out, nd.attrs["act"]))
        else:
            self.steps.append((S.activation, pool, srcs[0], out, nd.attrs["act"]))

    def _pool(self, nd: Node) -> None:
        a = nd.attrs
        x = self._map(nd.inputs[0])
        self._new(nd.output)
        out = self._map(nd.output)
        (kh, kw), (sh, sw), (pt, pl, pb, pr) = a["kernel"], a["stride"], a["pads"]
        if nd.op == "maxpool":
            dh, dw = a["dilation"]
            self.steps.append((S.maxpool, self.pool, x, (kh, kw, sh, sw, pt, pl, dh, dw), out))
        else:
            self.steps.append(
                (
                    S.avgpool,
                    self.pool,
                    x,
                    (kh, kw, sh, sw, pt, pl, pb, pr),
                    bool(a["count_include_pad"]),
                    out,
                )
            )

    def _conv(self, nd: Node, second: Node | None) -> None:
        net, pool, n = self.net, self.pool, self.n
        conv = net.packed[nd.name]
        x = nd.inputs[0]
        c_in, h, w = self.shapes[x]
        c_out, ho, wo = self.shapes[nd.output]
        residual = nd.inputs[1] if len(nd.inputs) > 1 else None
        if residual is not None and self.shapes[residual] != self.shapes[nd.output]:
            raise UnsupportedOperatorError(
                f"node {nd.name}: a residual of shape {self.shapes[residual]} added to an output "
                f"of shape {self.shapes[nd.output]}"
            )
        if second is not None and second.op == "mul":  # squeeze-excitation scale in the weights
            big, gate = _gated(second, self.shapes)
            res = None if residual is None else self._mat(residual)
            self._new(nd.output)
            self.steps.append((S.se_gemm, pool, self._view(big, (n, h * w, c_in)),
                               self._view(gate, (n, c_in)), conv, self._mat(nd.output), res,
                               np.empty_like(conv.panels)))  # fmt: skip
            return
        xm = self._map(x)
        if second is not None:  # conv3 + downsample branch as one two-segment GEMM
            sec = net.packed[second.name]
            xs, scratch = self._strided(second.inputs[0], sec.stride, (ho, wo))
            self._new(nd.output)
            self._release(scratch)
            self.steps.append((S.fused_tail, pool, xm, conv, xs, sec, self._mat(nd.output)))
            return
        res = None if residual is None else self._mat(residual)
        geom = (*conv.kernel, *conv.stride, conv.pads[0], conv.pads[1], *conv.dilation, ho, wo)
        if conv.pointwise and conv.dilation == (1, 1):
            a, scratch = self._strided(x, conv.stride, (ho, wo))
            self._new(nd.output)
            self._release(scratch)
            self.steps.append((S.packed_gemm, pool, a, conv, self._mat(nd.output), res))
            return
        self._new(nd.output)
        out = self._mat(nd.output)
        if conv.taps is not None:  # depthwise, or grouped with few channels per group
            self.steps.append((S.strip_conv, pool, xm, conv, geom, out, res))
        elif self._use_direct(conv, c_in, residual):
            xp = np.zeros(DC.padded_shape(n, h, w, c_in, conv.pads), np.float32)
            self.steps.append((S.direct_conv, pool, xm, conv, xp, (ho, wo), out))
        elif self._use_winograd(conv, n, h, w):
            self.steps.append((S.winograd_conv, pool, xm, conv, out, res))
        else:
            self.steps.append((S.implicit_conv, pool, xm, conv, geom, out, res))

    def _strided(self, v: str, stride, out_hw) -> tuple[list, int | None]:
        """(slot, scratch buffer) of the input of a 1x1 conv: v itself, or v subsampled by the
        stride into a scratch buffer, which the caller releases once the conv's output has its
        own buffer (only the conv reads the scratch)."""
        c = self.shapes[v][0]
        if stride == (1, 1):
            return self._map(v), None
        buf = self.arena.take(self.n * out_hw[0] * out_hw[1] * c)
        sub = self.arena.view(buf, (self.n, *out_hw, c))
        self.steps.append((S.subsample, self._map(v), stride, sub))
        return sub, buf

    def _release(self, buf: int | None) -> None:
        if buf is not None:
            self.arena.release(buf)

    def _use_direct(self, conv, c_in: int, residual) -> bool:
        """The direct conv for few input channels (the stems), where the implicit GEMM's
        gather would cost as much as the GEMM (measured 2.3 -> 1.4 ms on ResNet-50's stem)."""
        return conv.groups == 1 and c_in < 16 and residual is None and conv.dilation == (1, 1)

    def _use_winograd(self, conv, n, h, w) -> bool:
        """Winograd for 3x3 stride-1 convs with enough tiles to reuse the 4x larger transformed
        weights (ResNet-50's 7x7 maps at batch 1, 4 tiles, are faster direct)."""
        if not self.net.winograd or conv.groups != 1:
            return False
        if (conv.kernel, conv.stride, conv.pads, conv.dilation) != (
            (3, 3),
            (1, 1),
            (1, 1, 1, 1),
            (1, 1),
        ):
            return False
        th, tw = WG.tile_grid(h, w)
        return n * th * tw >= WG.MIN_TILES


def _gated(mul: Node, shapes) -> tuple[str | None, str | None]:
    """(map, gate) of a mul of a map (C, H, W) by a per-channel gate (C, 1, 1), or (None, None)."""
    a, b = mul.inputs
    for big, gate in ((a, b), (b, a)):
        sb, sg = shapes[big], shapes[gate]
        if len(sb) == 3 and sb[1:] != (1, 1) and sg == (sb[0], 1, 1):
            return big, gate
    return None, None


def _reads(nd: Node, extra: dict) -> set[str]:
    """The values a node's step reads: its inputs, or for a conv that absorbed the 1x1 conv
    of its residual, its own input and that conv's input (the residual is never made); for a
    conv that absorbed a squeeze-excitation scale, the scale's inputs."""
    if id(nd) in extra and extra[id(nd)].op == "mul":  # a squeeze-excitation scale
        return set(extra[id(nd)].inputs) | set(nd.inputs[1:])
    if id(nd) in extra:
        return {nd.inputs[0], extra[id(nd)].inputs[0]}
    return set(nd.inputs)
