"""Folding the BNs of an ONNX model in the file itself: what ``bnlab fold model.onnx`` writes.

* a ``Conv -> BatchNormalization`` pair (the conv's output read by the BN only) becomes one Conv
  whose weight and bias are folded (:func:`bnlab.fold.fold_conv_bn`, float64, then the weight's
  dtype); so does ``Gemm -> BatchNormalization`` (alpha = beta = 1);
* any other BN becomes ``Mul`` by s and ``Add`` of t, s = γ/sqrt(σ² + ε), t = β − μ·s, with
  (C, 1, 1) constants (per channel of an (N, C, H, W) input; (C,) for (N, C));

so the written model has no BatchNormalization node. Everything else (node names, other
initializers, opset, metadata) is kept; initializers only the removed nodes used are dropped.
The same fold function makes the engine's folded graph, so the two agree bit for bit.
"""

from __future__ import annotations

import numpy as np

from bnlab.errors import DataFormatError
from bnlab.fold.weights import bn_scale_shift, fold_conv_bn
from bnlab.inference.import_onnx import _onnx, load_model


def fold_onnx(path):
    """(folded ModelProto, names of the folded layer nodes, names of BNs made Mul + Add)."""
    onnx = _onnx()
    from onnx import numpy_helper  # noqa: PLC0415

    model = load_model(path)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for nd in g.node:  # exporters alias equal initializers through Identity nodes
        if nd.op_type == "Identity" and nd.input and nd.input[0] in inits:
            inits[nd.output[0]] = inits[nd.input[0]]
    readers: dict[str, int] = {}
    for nd in g.node:
        for v in nd.input:
            readers[v] = readers.get(v, 0) + 1
    for out in g.output:
        readers[out.name] = readers.get(out.name, 0) + 1
    producer = {o: nd for nd in g.node for o in nd.output}
    ranks = _ranks(onnx, model)
    folded, affine, new_nodes, drop = [], [], [], set()

    def array(name):
        if name not in inits:
            raise DataFormatError(f"{path}: {name!r} must be an initializer to be folded")
        return numpy_helper.to_array(inits[name])

    def add_init(arr, name):
        inits[name] = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        g.initializer.append(inits[name])

    for nd in g.node:
        if nd.op_type != "BatchNormalization":
            continue
        gamma, beta, mean, var = (array(v) for v in nd.input[1:5])
        eps = next((a.f for a in nd.attribute if a.name == "epsilon"), 1e-5)
        layer = producer.get(nd.input[0])
        if _foldable(layer, readers, nd.input[0], inits):
            w = array(layer.input[1])
            trans = next((a.i for a in layer.attribute if a.name == "transB"), 0)
            w_out_first = w if layer.op_type == "Conv" or trans else w.T
            bias = array(layer.input[2]) if len(layer.input) > 2 and layer.input[2] else None
            if bias is not None and bias.size != w_out_first.shape[0]:
                bias = np.broadcast_to(bias.reshape(-1), (w_out_first.shape[0],)).copy()
            wf, bf = fold_conv_bn(w_out_first, bias, mean, var, eps, gamma, beta)
            wf = wf if layer.op_type == "Conv" or trans else wf.T
            stem = layer.name or layer.output[0]
            add_init(wf, f"{stem}.weight_bnfolded")
            add_init(bf, f"{stem}.bias_bnfolded")
            drop.update(v for v in layer.input[1:] if v)
            del layer.input[1:]
            layer.input.extend([f"{stem}.weight_bnfolded", f"{stem}.bias_bnfolded"])
            folded.append(stem)
            layer.output[0] = nd.output[0]
        else:
            s, t = bn_scale_shift(gamma, beta, mean, var, eps)
            shape = (-1, 1, 1) if ranks.get(nd.input[0], 4) == 4 else (-1,)
            stem = nd.name or nd.output[0]
            add_init(s.astype(np.float32).reshape(shape), f"{stem}.scale")
            add_init(t.astype(np.float32).reshape(shape), f"{stem}.shift")
            mid = f"{stem}.scaled"
            new_nodes.append(
                (
                    nd,
                    [
                        onnx.helper.make_node(
                            "Mul", [nd.input[0], f"{stem}.scale"], [mid], stem + "/Mul"
                        ),
                        onnx.helper.make_node(
                            "Add", [mid, f"{stem}.shift"], [nd.output[0]], stem + "/Add"
                        ),
                    ],
                )
            )
            affine.append(stem)
        drop.update(nd.input[1:5])
    replaced = {id(bn): nodes for bn, nodes in new_nodes}
    nodes = []
    for nd in g.node:
        if nd.op_type == "BatchNormalization":
            nodes.extend(replaced.get(id(nd), []))
        else:
            nodes.append(nd)
    del g.node[:]
    g.node.extend(nodes)
    _drop_unused(g, drop)
    return model, folded, affine


def _foldable(layer, readers, value, inits) -> bool:
    if layer is None or readers.get(value, 0) != 1 or len(layer.input) < 2:
        return False
    if layer.input[1] not in inits or (
        len(layer.input) > 2 and layer.input[2] and layer.input[2] not in inits
    ):
        return False
    if layer.op_type == "Conv":
        return True
    if layer.op_type == "Gemm":
        attrs = {a.name: a for a in layer.attribute}
        return (
            (attrs["alpha"].f if "alpha" in attrs else 1.0) == 1.0
            and (attrs["beta"].f if "beta" in attrs else 1.0) == 1.0
            and not (attrs["transA"].i if "transA" in attrs else 0)
        )
    return False


def _ranks(onnx, model) -> dict[str, int]:
    """Rank of every tensor ONNX's shape inference can tell (for the Mul/Add constants)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes are a convenience here; 4-D is the default
        return {}
    vis = list(inferred.graph.value_info) + list(inferred.graph.input)
    return {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in vis
        if v.type.tensor_type.HasField("shape")
    }


def _drop_unused(g, candidates) -> None:
    used = {v for nd in g.node for v in nd.input}
    gone = {c for c in candidates if c not in used}
    keep = [t for t in g.initializer if t.name not in gone]
    del g.initializer[:]
    g.initializer.extend(keep)
    inputs = [i for i in g.input if i.name not in gone]
    del g.input[:]
    g.input.extend(inputs)


def write_folded_onnx(path, out) -> tuple[list[str], list[str]]:
    """Fold ``path`` and write the BN-free model to ``out`` atomically; returns (folded layers,
    BNs made Mul + Add)."""
    from bnlab.io import atomic_write_bytes  # noqa: PLC0415

    model, folded, affine = fold_onnx(path)
    atomic_write_bytes(out, model.SerializeToString())
    return folded, affine
