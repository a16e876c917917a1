"""ONNX import (bnlab.inference.import_onnx): every supported operator against ONNX Runtime, the
errors for unsupported operators, and malformed, truncated and fuzzed files (an error, never a
crash); the BN-free ONNX file ``bnlab fold`` writes.

Tolerance: engine vs ONNX Runtime (both float32) within 1e-5 of the largest |output| (these
graphs are a few layers deep).
"""

from __future__ import annotations

import numpy as np
import pytest

import bnlab.inference
from bnlab.errors import BNLabError, DataFormatError
from bnlab.inference import UnsupportedOperatorError

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ort = pytest.importorskip("onnxruntime")
RNG = np.random.default_rng(0)


def init(name, shape, scale=0.3, positive=False):
    a = RNG.standard_normal(shape).astype(np.float32) * scale
    return numpy_helper.from_array(np.abs(a) + 0.5 if positive else a, name)


def model(nodes, inits, in_shape=(None, 4, 9, 9), out_shape=None, opset=17, out="y"):
    dims = ["N" if d is None else d for d in in_shape]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                              dims)], [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                              out_shape)], inits)  # fmt: skip
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def save(m, tmp_path, name="m.onnx"):
    path = tmp_path / name
    path.write_bytes(m.SerializeToString())
    return path


def check_against_ort(m, tmp_path, x=None, tol=1e-5):
    path = save(m, tmp_path)
    x = RNG.standard_normal((2, 4, 9, 9)).astype(np.float32) if x is None else x
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = bnlab.inference.compile(path, threads=2)(x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol * max(np.abs(ref).max(), 1e-3))
    return out


def conv_bn(i, c_in, c_out, k=3, group=1, **attrs):
    """Conv (no bias) -> BatchNormalization: nodes and initializers of layer i."""
    w = init(f"w{i}", (c_out, c_in // group, k, k))
    bn = [init(f"g{i}", (c_out,), positive=True), init(f"b{i}", (c_out,)),
          init(f"m{i}", (c_out,)), init(f"v{i}", (c_out,), positive=True)]  # fmt: skip
    src = "x" if i == 0 else f"t{i - 1}"
    nodes = [helper.make_node("Conv", [src, f"w{i}"], [f"c{i}"], f"conv{i}", group=group,
                              **attrs),
             helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"b{i}", f"m{i}", f"v{i}"],
                              [f"t{i}"], f"bn{i}", epsilon=1e-3)]  # fmt: skip
    return nodes, [w, *bn]


@pytest.mark.parametrize(
    "conv_attrs",
    [{"pads": [1, 1, 1, 1]}, {"pads": [0, 2, 1, 0], "strides": [2, 1]},
     {"pads": [2, 2, 2, 2], "dilations": [2, 2]}, {"auto_pad": "SAME_UPPER"},
     {"auto_pad": "VALID", "strides": [2, 2]}],
    ids=["pad1", "asymmetric", "dilated", "same", "valid"],
)  # fmt: skip
@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_bn_activations(tmp_path, conv_attrs, group):
    nodes, inits = conv_bn(0, 4, 8, group=group, **conv_attrs)
    nodes += [helper.make_node("Relu", ["t0"], ["r"]), helper.make_node("Clip", ["r", "lo", "hi"],
              ["y"])]  # fmt: skip
    inits += [numpy_helper.from_array(np.float32(0.1), "lo"),
              numpy_helper.from_array(np.float32(1.5), "hi")]  # fmt: skip
    check_against_ort(model(nodes, inits), tmp_path)


def test_activation_ops_and_squeeze_excitation(tmp_path):
    """Sigmoid, HardSigmoid (ONNX's default alpha), HardSwish, x · sigmoid(x) (exported SiLU),
    global pooling, per-channel Mul (SE), Sub/Div/Add/Mul by constants, Clip of opset 6."""
    nodes, inits = conv_bn(0, 4, 8, pads=[1, 1, 1, 1])
    nodes += [
        helper.make_node("Sigmoid", ["t0"], ["s0"]),
        helper.make_node("Mul", ["t0", "s0"], ["silu"]),
        helper.make_node("GlobalAveragePool", ["silu"], ["gp"]),
        helper.make_node("Conv", ["gp", "se_w"], ["se"], "se_conv"),
        helper.make_node("HardSigmoid", ["se"], ["gate"]),
        helper.make_node("Mul", ["silu", "gate"], ["scaled"]),
        helper.make_node("HardSwish", ["scaled"], ["hs"]),
        helper.make_node("Sub", ["hs", "k_sub"], ["d1"]),
        helper.make_node("Div", ["d1", "k_div"], ["d2"]),
        helper.make_node("Add", ["k_add", "d2"], ["d3"]),
        helper.make_node("Mul", ["d3", "k_mul"], ["y"]),
    ]  # fmt: skip
    inits += [init("se_w", (8, 8, 1, 1)), numpy_helper.from_array(np.float32(0.25), "k_sub"),
              numpy_helper.from_array(np.float32(1.5), "k_div"),
              init("k_add", (1, 8, 1, 1)), init("k_mul", (8, 1, 1))]  # fmt: skip
    check_against_ort(model(nodes, inits), tmp_path)
    clip6 = model([helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.5)], [], opset=6)
    check_against_ort(clip6, tmp_path)


@pytest.mark.parametrize(
    "pool",
    [helper.make_node("MaxPool", ["t0"], ["p"], kernel_shape=[3, 3], strides=[2, 2],
                      pads=[1, 1, 1, 1]),
     helper.make_node("MaxPool", ["t0"], ["p"], kernel_shape=[2, 2], ceil_mode=1, strides=[2, 2]),
     helper.make_node("MaxPool", ["t0"], ["p"], kernel_shape=[2, 2], dilations=[2, 2]),
     helper.make_node("AveragePool", ["t0"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
     helper.make_node("AveragePool", ["t0"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                      count_include_pad=1, strides=[2, 2], ceil_mode=1),
     helper.make_node("ReduceMean", ["t0"], ["p"], axes=[2, 3], keepdims=1)],
    ids=["max", "max-ceil", "max-dilated", "avg", "avg-include-pad-ceil", "reducemean"],
)  # fmt: skip
def test_pooling_flatten_gemm_softmax(tmp_path, pool):
    nodes, inits = conv_bn(0, 4, 8, pads=[1, 1, 1, 1])
    nodes += [pool, helper.make_node("Dropout", ["p"], ["d"]),
              helper.make_node("Identity", ["d"], ["i"]), helper.make_node("Flatten", ["i"], ["f"]),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["g"], transB=1, alpha=0.5, beta=2.0),
              helper.make_node("Softmax", ["g"], ["y"], axis=1)]  # fmt: skip
    size = {"p": None}
    m0 = model(nodes[:3], inits, out="p")
    sess = ort.InferenceSession(save(m0, tmp_path, "probe.onnx").as_posix(),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    size["p"] = int(np.prod(sess.run(None, {"x": np.zeros((1, 4, 9, 9), np.float32)})[0].shape[1:]))
    inits += [init("fc_w", (10, size["p"])), init("fc_b", (10,))]
    check_against_ort(model(nodes, inits), tmp_path)


def test_concat_reshape_matmul_and_unfoldable_bn(tmp_path):
    """A BN after an add cannot be folded: it runs as a per-channel affine step."""
    n0, i0 = conv_bn(0, 4, 8, pads=[1, 1, 1, 1])
    nodes = n0 + [
        helper.make_node("Conv", ["x", "w_side"], ["side"], pads=[0, 0, 0, 0]),
        helper.make_node("Add", ["t0", "side"], ["sum"]),
        helper.make_node("BatchNormalization", ["sum", "g", "b", "m", "v"], ["bn"]),
        helper.make_node("Concat", ["bn", "x"], ["cat"], axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["gp"]),
        helper.make_node("Reshape", ["gp", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "mm_w"], ["y"]),
    ]  # fmt: skip
    inits = i0 + [init("w_side", (8, 4, 1, 1)), init("g", (8,), positive=True), init("b", (8,)),
                  init("m", (8,)), init("v", (8,), positive=True),
                  numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
                  init("mm_w", (12, 5))]  # fmt: skip
    check_against_ort(model(nodes, inits), tmp_path)
    predict = bnlab.inference.compile(save(model(nodes, inits), tmp_path))
    assert [nd.op for nd in predict.graph.nodes].count("affine") == 1


@pytest.mark.parametrize(
    ("node", "needles"),
    [(helper.make_node("LeakyRelu", ["x"], ["y"], "leaky_node"), ["LeakyRelu", "leaky_node"]),
     (helper.make_node("Resize", ["x", "", "scales"], ["y"], "up"), ["Resize", "up"]),
     (helper.make_node("Concat", ["x", "x"], ["y"], "cat0", axis=2), ["axis=2", "cat0"]),
     (helper.make_node("Softmax", ["x"], ["y"], "sm", axis=2), ["axis=2", "sm"])],
    ids=["leakyrelu", "resize", "concat-axis", "softmax-axis"],
)  # fmt: skip
def test_unsupported_operators_name_the_operator_and_the_node(tmp_path, node, needles):
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    path = save(model([node], inits), tmp_path)
    with pytest.raises(UnsupportedOperatorError) as info:
        bnlab.inference.compile(path)
    assert all(n in str(info.value) for n in needles), str(info.value)


# --------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def good_bytes():
    nodes, inits = conv_bn(0, 4, 8, pads=[1, 1, 1, 1])
    nodes += [helper.make_node("Relu", ["t0"], ["r"]), helper.make_node("GlobalAveragePool",
              ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["y"])]  # fmt: skip
    return model(nodes, inits).SerializeToString()


def outcome(path):
    """'ok' if the file compiles and runs, else the (bnlab) error type; anything else fails."""
    try:
        bnlab.inference.compile(path, threads=1)(np.ones((1, 4, 9, 9), np.float32))
    except (BNLabError, FileNotFoundError) as err:
        return type(err).__name__
    return "ok"


def test_malformed_files_are_clear_errors(tmp_path, good_bytes):
    cases = {"empty.onnx": b"", "garbage.onnx": b"\x08\x01\xff\xfe not a protobuf" * 7,
             "text.onnx": b"hello world\n"}  # fmt: skip
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataFormatError, match=name):
            bnlab.inference.compile(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        bnlab.inference.compile(tmp_path / "missing.onnx")
    with pytest.raises(DataFormatError, match="not a file"):
        (tmp_path / "dir.onnx").mkdir()
        bnlab.inference.compile(tmp_path / "dir.onnx")


def test_inconsistent_models_are_clear_errors(tmp_path):
    dangling = model([helper.make_node("Relu", ["nowhere"], ["y"], "r")], [])
    nan_w = model(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        [numpy_helper.from_array(np.full((8, 4, 3, 3), np.nan, np.float32), "w")],
    )
    wrong_k = model([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[5, 5])],
                    [init("w", (8, 4, 3, 3))])  # fmt: skip
    bad_ch = model([helper.make_node("Conv", ["x", "w"], ["y"])], [init("w", (8, 3, 3, 3))])
    zero_stride = model([helper.make_node("Conv", ["x", "w"], ["y"], strides=[0, 1])],
                        [init("w", (8, 4, 3, 3))])  # fmt: skip
    two_d = model([helper.make_node("Relu", ["x"], ["y"])], [], in_shape=(None, 4))
    for i, (m, needle) in enumerate([(dangling, "nowhere"), (nan_w, "NaN"), (wrong_k, "kernel"),
                                     (bad_ch, "channels"), (zero_stride, "positive"),
                                     (two_d, "2 dimensions")]):  # fmt: skip
        path = save(m, tmp_path, f"bad{i}.onnx")
        with pytest.raises(BNLabError, match=needle):
            bnlab.inference.compile(path)(np.ones((1, 4, 9, 9), np.float32))


def test_truncated_and_fuzzed_files_are_errors_never_crashes(tmp_path, good_bytes):
    """Every prefix length class and 150 seeded byte flips of a valid file: each either still
    runs or raises a bnlab error (no other exception, no crash of the process)."""
    rng = np.random.default_rng(1)
    variants = [good_bytes[:n] for n in sorted({int(f * len(good_bytes)) for f in
                                                np.linspace(0.01, 0.99, 40)})]  # fmt: skip
    for _ in range(150):
        b = bytearray(good_bytes)
        for pos in rng.integers(0, len(b), rng.integers(1, 6)):
            b[pos] = int(rng.integers(0, 256))
        variants.append(bytes(b))
    seen = {}
    for i, data in enumerate(variants):
        path = tmp_path / f"v{i}.onnx"
        path.write_bytes(data)
        kind = outcome(path)
        seen[kind] = seen.get(kind, 0) + 1
    assert seen.get("DataFormatError", 0) > 20, seen  # the truncations at least
    assert set(seen) <= {"ok", "DataFormatError", "UnsupportedOperatorError", "ShapeError",
                         "NonFiniteError", "DTypeError"}, seen  # fmt: skip


# --------------------------------------------------------------------------- folding


def test_fold_writes_a_bn_free_onnx_file_equal_to_the_original(tmp_path):
    from bnlab.inference.export_onnx import write_folded_onnx

    n0, i0 = conv_bn(0, 4, 8, pads=[1, 1, 1, 1])
    n1, i1 = conv_bn(1, 8, 8, group=8, pads=[1, 1, 1, 1])
    nodes = n0 + n1 + [
        helper.make_node("Add", ["t0", "t1"], ["s"]),
        helper.make_node("BatchNormalization", ["s", "g", "b", "m", "v"], ["bn"]),  # unfoldable
        helper.make_node("GlobalAveragePool", ["bn"], ["gp"]),
        helper.make_node("Flatten", ["gp"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["fc"], transB=1),
        helper.make_node("BatchNormalization", ["fc", "g2", "b2", "m2", "v2"], ["y"]),
    ]  # fmt: skip
    inits = i0 + i1 + [init("g", (8,), positive=True), init("b", (8,)), init("m", (8,)),
                       init("v", (8,), positive=True), init("fc_w", (6, 8)), init("fc_b", (6,)),
                       init("g2", (6,), positive=True), init("b2", (6,)), init("m2", (6,)),
                       init("v2", (6,), positive=True)]  # fmt: skip
    src = save(model(nodes, inits), tmp_path, "src.onnx")
    folded, affine = write_folded_onnx(src, tmp_path / "folded.onnx")
    assert sorted(folded) == ["conv0", "conv1", "fc"] and len(affine) == 1
    out = onnx.load(str(tmp_path / "folded.onnx"))
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}
    x = RNG.standard_normal((2, 4, 9, 9)).astype(np.float32)
    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for p in (src, tmp_path / "folded.onnx")]  # fmt: skip
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=1e-5 * np.abs(runs[0]).max())
    ours = bnlab.inference.compile(tmp_path / "folded.onnx")(x)
    np.testing.assert_allclose(ours, runs[0], rtol=0, atol=1e-5 * np.abs(runs[0]).max())
