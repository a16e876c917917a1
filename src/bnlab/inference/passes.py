"""Graph passes: fold BN, fuse residual adds and activations; the fold's error certificate.

    fold_batch_norms(graph)       conv/linear -> BN  =>  conv/linear with folded weights
                                  (:func:`bnlab.fold.fold_conv_bn`, float64, exact for any
                                  padding, stride, groups); a BN after anything else becomes a
                                  per-channel affine node (it cannot be folded: e.g. after an add)
    fuse(graph)                   add(conv(x), r) => conv(x) with residual r (the conv moves to
                                  where the add was); an activation after a conv, linear, affine
                                  or add => that node's epilogue
    certify(graph, folded, pairs, x)   the measured error of folding (FoldCertificate)

A node is merged into its producer only when the producer's output has no other reader.
"""

from __future__ import annotations

import numpy as np

from bnlab.errors import DTypeError
from bnlab.fold.certificate import FoldCertificate, error_row
from bnlab.fold.weights import bn_scale_shift, fold_conv_bn
from bnlab.inference import _act
from bnlab.inference.graph import Graph, Node


def _sole_reader(graph: Graph, value: str) -> Node | None:
    readers = graph.consumers().get(value, [])
    return readers[0] if len(readers) == 1 and value != graph.output else None


def fold_batch_norms(graph: Graph, fold: bool = True) -> tuple[Graph, list[tuple[str, str]]]:
    """A copy of ``graph`` without BN nodes, and the (layer, BN) name pairs that were folded.

    ``fold=False`` keeps each BN after a conv as the conv's per-channel scale + shift instead
    (applied in the engine's epilogue: y = conv(x)·s + (b·s + t); for checking the fold)."""
    g = graph.copy()
    producers = g.producers()
    pairs: list[tuple[str, str]] = []
    kept: list[Node] = []
    for nd in g.nodes:
        if nd.op != "bn":
            kept.append(nd)
            continue
        p = nd.params
        layer = producers.get(nd.inputs[0])
        foldable = (
            layer is not None
            and layer.op in ("conv", "linear")
            and _sole_reader(g, layer.output) is nd
            and len(layer.inputs) == 1
            and layer.attrs["act"] == _act.IDENTITY
            and "scale" not in layer.params
        )
        if foldable and (fold or layer.op == "conv"):
            if fold:
                w, b = fold_conv_bn(
                    layer.params["weight"],
                    layer.params.get("bias"),
                    p["mean"],
                    p["var"],
                    nd.attrs["eps"],
                    p["gamma"],
                    p["beta"],
                )
                layer.params.update(weight=w, bias=b)
                pairs.append((layer.name, nd.name))
            else:
                s, t = bn_scale_shift(p["gamma"], p["beta"], p["mean"], p["var"], nd.attrs["eps"])
                b0 = layer.params.get("bias", np.zeros(len(s)))
                dt = layer.params["weight"].dtype
                layer.params.update(scale=s.astype(dt), bias=(b0 * s + t).astype(dt))
            _rename_output(g, layer, nd.output, producers)
            continue
        s, t = bn_scale_shift(p["gamma"], p["beta"], p["mean"], p["var"], nd.attrs["eps"])
        kept.append(
            Node(
                "affine",
                nd.inputs,
                nd.output,
                nd.name,
                {"scale": s.astype(np.float32), "shift": t.astype(np.float32)},
            )
        )
    g.nodes = kept
    return g.validate(), pairs


def _rename_output(g: Graph, nd: Node, new: str, producers: dict) -> None:
    producers.pop(nd.output, None)
    nd.output = new
    producers[new] = nd


def fuse(graph: Graph) -> Graph:
    """Gated activations, residual adds into the conv that feeds them, then activations into
    their producer."""
    g = graph.copy()
    _fuse_gated_activations(g)
    _fuse_residual_adds(g)
    _fuse_activations(g)
    return g.validate()


GATED = {  # x · gate(x) as one activation: what exporters write SiLU and Hardswish as
    _act.SIGMOID: lambda a, b: (_act.SILU, 0.0, 0.0),
    _act.HARDSIGMOID: lambda a, b: (_act.HARDSWISH, a, b),
}


def _fuse_gated_activations(g: Graph) -> None:
    """mul(x, sigmoid(x)) -> silu(x), mul(x, hardsigmoid(x)) -> hardswish(x): one node that the
    producer of x can then take into its epilogue."""
    producers = g.producers()
    drop: set[int] = set()
    for nd in g.nodes:
        if nd.op != "mul" or nd.inputs[0] == nd.inputs[1]:
            continue
        for i in (0, 1):
            gate, x = producers.get(nd.inputs[i]), nd.inputs[1 - i]
            if (
                gate is not None
                and gate.op == "act"
                and gate.inputs[0] == x
                and gate.attrs["act"][0] in GATED
                and _sole_reader(g, gate.output) is nd
            ):
                code, a, b = gate.attrs["act"]
                nd.op, nd.inputs, nd.params = "act", [x], {}
                nd.attrs = {"act": GATED[code](a, b)}
                drop.add(id(gate))
                break
    g.nodes = [nd for nd in g.nodes if id(nd) not in drop]


def _fuse_residual_adds(g: Graph) -> None:
    producers = g.producers()
    order = {id(nd): i for i, nd in enumerate(g.nodes)}
    moved: dict[int, Node] = {}  # id(add) -> conv that takes its place
    taken: set[int] = set()  # id of every conv moved
    for add in [nd for nd in g.nodes if nd.op == "add"]:
        cands = []
        for i, v in enumerate(add.inputs):
            conv = producers.get(v)
            if (
                conv is not None
                and conv.op == "conv"
                and len(conv.inputs) == 1
                and id(conv) not in taken
                and conv.attrs["act"] == _act.IDENTITY
                and _sole_reader(g, v) is add
                and add.inputs[1 - i] != v
            ):
                unit = conv.attrs["stride"] == (1, 1)
                cands.append(((unit, order[id(conv)]), i, conv))
        if not cands:
            continue
        # a stride-1 conv takes the residual (a strided 1x1 branch can then share its GEMM,
        # see _plan), else the later conv
        _, i, conv = max(cands, key=lambda c: c[0])
        conv.inputs.append(add.inputs[1 - i])
        conv.attrs["act"] = add.attrs["act"]
        _rename_output(g, conv, add.output, producers)
        moved[id(add)] = conv
        taken.add(id(conv))
    if moved:
        g.nodes = [moved.get(id(nd), nd) for nd in g.nodes if id(nd) not in taken]


def _fuse_activations(g: Graph) -> None:
    producers = g.producers()
    kept: list[Node] = []
    for nd in g.nodes:
        src = producers.get(nd.inputs[0]) if nd.op == "act" else None
        if (
            src is not None
            and src.op in ("conv", "linear", "affine", "add")
            and src.attrs["act"] == _act.IDENTITY
            and _sole_reader(g, src.output) is nd
        ):
            src.attrs["act"] = nd.attrs["act"]
            _rename_output(g, src, nd.output, producers)
            continue
        kept.append(nd)
    g.nodes = kept


# --------------------------------------------------------------------------- certificate


def certify(graph: Graph, folded: Graph, pairs, calibration, whole_model=None) -> FoldCertificate:
    """Errors of every folded pair and of the whole model on ``calibration`` (N, C, H, W).

    For each pair the layer's input is taken from a float64 run of the unfolded graph; the
    reference is the unfolded layer + BN in float64, compared with the folded layer in float32
    and with the unfolded layer + BN in float32 (the rounding one has anyway). The whole model:
    the folded and the unfolded graph in float32 against the unfolded graph in float64.
    Relative errors divide by max |reference| (see :class:`bnlab.fold.PairError`).
    ``whole_model`` replaces the folded graph in the whole-model row (e.g. the graph of the
    file that was written).
    """
    from bnlab.inference import reference as R  # noqa: PLC0415

    x = np.asarray(calibration)
    if not np.issubdtype(x.dtype, np.floating):
        raise DTypeError(f"calibration must be a float array batch, got dtype {x.dtype}")
    values = R.run(graph, x, np.float64, keep=True)
    by_name = {nd.name: nd for nd in graph.nodes}
    folded_by_name = {nd.name: nd for nd in folded.nodes}
    rows = []
    for layer_name, bn_name in pairs:
        layer, bn, new = by_name[layer_name], by_name[bn_name], folded_by_name[layer_name]
        xin = values[layer.inputs[0]]
        ref = R.node_forward(bn, [R.node_forward(layer, [xin])])
        x32 = xin.astype(np.float32)
        unf = R.node_forward(bn, [R.node_forward(layer, [x32], np.float32)], np.float32)
        plain = Node(
            new.op,
            new.inputs[:1],
            new.output,
            new.name,
            new.params,
            {**new.attrs, "act": _act.IDENTITY},
        )  # the fold alone, before fusions
        rows.append(error_row(layer_name, ref, R.node_forward(plain, [x32], np.float32), unf))
    x32 = x.astype(np.float32)
    whole = error_row(
        "<whole model>",
        values[graph.output],
        R.run(folded if whole_model is None else whole_model, x32, np.float32),
        R.run(graph, x32, np.float32),
    )
    return FoldCertificate(rows, whole)
