"""A converted model under PyTorch's program transforms: ``torch.compile`` (fullgraph, train and
eval, numerics and running statistics vs eager), ``torch.export``, ``torch.fx.symbolic_trace``,
``torch.jit.script``/``trace`` and both ONNX exporters (checked with onnxruntime). Each on both
routes: ``always`` (bnlab's kernels, as the custom ops ``torch.ops.bnlab.*`` when traced) and
``never`` (PyTorch's op). Compilation is slow on the test machine: the models are tiny and the
inductor backend runs once; the other compile tests use ``aot_eager`` (dynamo, AOTAutograd and
functionalization, without code generation)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch._dynamo.backends.registry import lookup_backend  # noqa: E402

import bnlab.torch as bt  # noqa: E402
from bnlab.errors import NonFiniteBatchWarning  # noqa: E402

X = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=["always", "never"], ids=["kernels", "pytorch-op"])
def route(request):
    with bt.dispatch.kernel_route(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


def _model(momentum_1d=0.1):
    torch.manual_seed(3)
    return bt.convert(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 6),
            nn.BatchNorm1d(6, momentum=momentum_1d),
        )
    )


def _bnlab_ops(graph) -> set[str]:
    """The bnlab ops a graph calls (overload packets and ``.default`` overloads alike)."""
    return {str(n.target).removesuffix(".default") for n in graph.nodes if "bnlab" in str(n.target)}


def _assert_state_equal(a: nn.Module, b: nn.Module, **tol):
    want = b.state_dict()
    got = a.state_dict()
    assert set(got) == set(want)
    for name, t in got.items():
        torch.testing.assert_close(t, want[name], **tol, msg=name)


def _check_compiled(backend: str, route: str, momentum_1d=0.1):
    """Two training steps and an eval call: compiled == eager (outputs, gradients, buffers)."""
    seen = []

    def recording(gm, inputs):  # the graph dynamo hands the backend: one node per BN op
        seen.append(_bnlab_ops(gm.graph))
        return lookup_backend(backend)(gm, inputs)

    eager = _model(momentum_1d)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=recording, fullgraph=True)  # no graph break allowed
    for step in range(2):
        for m in (compiled, eager):
            m(X + step).square().sum().backward()
        for p, q in zip(model.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
        _assert_state_equal(model, eager, rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 2
    model.eval(), eager.eval()
    torch.testing.assert_close(compiled(X), eager(X), rtol=1e-4, atol=1e-5)
    ops = set().union(*seen)
    if route == "always":
        assert ops == {"bnlab.batch_norm", "bnlab.update_running_stats_"}
    else:
        assert not ops


def test_compile_fullgraph_train_and_eval_aot_eager(route):
    _check_compiled("aot_eager", route, momentum_1d=None)  # the cumulative average as well


@pytest.mark.slow
def test_compile_fullgraph_train_and_eval_inductor():
    with bt.dispatch.kernel_route("always"):
        _check_compiled("inductor", "always")


def test_compiled_training_keeps_nonfinite_batches_out_of_the_buffers(route):
    model = _model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(X)
    before = copy.deepcopy(model.state_dict())
    bad = X.clone()
    bad[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(bad)
    if route == "always":  # the custom op runs eagerly inside the graph and can warn
        assert any(issubclass(w.category, NonFiniteBatchWarning) for w in caught)
    state = model.state_dict()
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(state[name], before[name]), name  # traced: the branch-free rule


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_gives_a_program_that_runs(route, training):
    model = _model().train(training)
    eager = copy.deepcopy(model)
    program = torch.export.export(model, (X,))
    ops = _bnlab_ops(program.graph)
    if route == "always":
        want = {"bnlab.batch_norm"}
        assert ops == (want | {"bnlab.update_running_stats_"} if training else want)
    else:
        assert not ops
    runnable = program.module()
    torch.testing.assert_close(runnable(X), eager(X))
    if training:
        _assert_state_equal(runnable, eager)
        assert int(runnable.get_buffer("1.num_batches_tracked")) == 1


def test_fx_symbolic_trace_records_one_node_per_module(route):
    model = _model()
    gm = torch.fx.symbolic_trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target.__name__ for n in calls] == ["bnlab_batch_norm"] * 2
    eager = copy.deepcopy(model)
    torch.testing.assert_close(gm(X), eager(X))  # traced in training: updates the buffers
    _assert_state_equal(gm, eager)
    eval_gm = torch.fx.symbolic_trace(model.eval())
    torch.testing.assert_close(eval_gm(X), eager.eval()(X))


def test_jit_script_falls_back_to_pytorch_op_and_saves(route):
    model = _model()
    eager = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in 2.13
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(X), eager(X))
        _assert_state_equal(scripted, eager)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    assert all(type(m) in (bt.BatchNorm2d, bt.BatchNorm1d) for m in (model[1], model[5]))
    loaded.eval(), eager.eval()
    torch.testing.assert_close(loaded(X), eager(X))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_jit_trace_records_pytorch_op(route, training):
    model = _model().train(training)
    eager = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (X,), check_trace=False)
    assert "aten::batch_norm" in str(traced.inlined_graph)
    eager(X)  # the trace ran the model once
    torch.testing.assert_close(traced(X), eager(X))
    _assert_state_equal(traced, eager)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo-exporter"])
def test_onnx_export_emits_batch_normalization(route, dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _model()
    model(X)  # non-trivial running statistics
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            proto = torch.onnx.export(model, (X,), dynamo=True, optimize=False, verbose=False)
            proto = proto.model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(model, (X,), buffer, dynamo=False, do_constant_folding=False)
            proto = onnx.load_from_string(buffer.getvalue())
    assert [n.op_type for n in proto.graph.node].count("BatchNormalization") == 2
    session = ort.InferenceSession(proto.SerializeToString())
    (out,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(X), rtol=1e-4, atol=1e-5)
