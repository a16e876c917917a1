"""d2l's "Batch Normalization" chapter run with bnlab's replacements, as a reader would: the
chapter's own BatchNorm class with bnlab's ``batch_norm`` imported in place of the chapter's
function (both published versions), bnlab.torch.BatchNorm, and nn.BatchNorm2d/1d, LeNet-BN on real
Fashion-MNIST for 2 epochs from the same weights on the same batches."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
import d2l_chapter as ch  # noqa: E402
from torch import nn  # noqa: E402

import bnlab  # noqa: E402
import bnlab.torch as bt  # noqa: E402
from bnlab.torch import d2l  # noqa: E402


@pytest.fixture(scope="module")
def data(fashion_mnist_session):
    return ch.fashion_mnist_subset(num_train=3072, num_test=1000)


def chapter_net(batch_norm, momentum, seed=0):
    cls = ch.chapter_batchnorm(batch_norm, momentum)
    return ch.lenet_bn(lambda c: cls(c, 4), lambda c: cls(c, 2), seed=seed)


def variants(reference):
    """The chapter's net and the three replacements, all holding the reference's weights."""
    nets = {
        "d2l chapter": reference,
        "chapter class + bnlab batch_norm": chapter_net(d2l.batch_norm, 0.9),
        "bnlab.torch.BatchNorm": ch.lenet_bn(lambda c: bt.BatchNorm(c, 4),
                                             lambda c: bt.BatchNorm(c, 2)),
        "nn.BatchNorm2d/1d": ch.lenet_bn(nn.BatchNorm2d, nn.BatchNorm1d),
    }  # fmt: skip
    for net in nets.values():
        ch.copy_weights(net, reference)
    return nets


def test_lenet_bn_two_epochs_with_each_replacement(data, monkeypatch):
    """The older text's recipe (lr 1.0, batches of 256, momentum 0.9): the chapter's class with
    bnlab's function and bnlab's module give the chapter's losses and accuracy exactly;
    nn.BatchNorm2d agrees to float32 rounding. The drop-in, called without training= as the
    chapter calls it, warns exactly once."""
    monkeypatch.setitem(d2l._warned, "grad_mode", False)
    nets = variants(chapter_net(ch.d2l_batch_norm_v017, 0.9))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        result = ch.train_lockstep(nets, *data, epochs=2, lr=1.0, batch_size=256)
    assert sum(issubclass(w.category, d2l.GradModeWarning) for w in rec) == 1
    ref = result["d2l chapter"]
    for name in ("chapter class + bnlab batch_norm", "bnlab.torch.BatchNorm"):
        torch.testing.assert_close(result[name]["losses"], ref["losses"], rtol=1e-6, atol=1e-6)
        assert result[name]["test_accuracy"] == ref["test_accuracy"], name
    torch.testing.assert_close(result["nn.BatchNorm2d/1d"]["losses"], ref["losses"], rtol=1e-3,
                               atol=1e-3)  # fmt: skip
    assert abs(result["nn.BatchNorm2d/1d"]["test_accuracy"] - ref["test_accuracy"]) < 0.02
    assert ref["losses"][-1] < 0.5 * ref["losses"][0]
    assert ref["test_accuracy"] > 0.6
    # the drop-in's moving statistics are the chapter's (no NaN, same averages)
    for a, b in zip(nets["d2l chapter"], nets["chapter class + bnlab batch_norm"], strict=True):
        if hasattr(a, "moving_mean"):
            torch.testing.assert_close(b.moving_mean, a.moving_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.moving_var, a.moving_var, rtol=1e-5, atol=1e-6)


def _train_steps(net, train, steps, lr=0.1, batch_size=128):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for (X, y), _ in zip(ch.batches(*train, batch_size, epoch=0), range(steps), strict=False):
        ch.train_step(net, opt, X, y)


def _moving(net):
    return [m.moving_mean.clone() for m in net if hasattr(m, "moving_mean")]


def test_d2l_1_0_chapter_with_batch_norm_v1(data):
    """d2l 1.0's class (momentum=0.1, lr 0.1, batches of 128): bnlab's batch_norm_v1 keeps the
    chapter's moving averages; the older-meaning batch_norm with the same class warns and would
    weigh each new batch 0.9 instead of 0.1."""
    train, test = data
    reference = chapter_net(ch.d2l_batch_norm_v1, 0.1)
    ours = chapter_net(d2l.batch_norm_v1, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", d2l.MomentumMeaningWarning)
        warnings.simplefilter("ignore", d2l.GradModeWarning)
        for net in (reference, ours):
            _train_steps(net, train, steps=8)
    for a, b in zip(_moving(reference), _moving(ours), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert ch.evaluate_accuracy(ours, *test) == ch.evaluate_accuracy(reference, *test)
    mixed = chapter_net(d2l.batch_norm, 0.1)
    with pytest.warns(d2l.MomentumMeaningWarning, match="batch_norm_v1"):
        _train_steps(mixed, train, steps=1)


def test_evaluation_under_autograd_is_d2l_s_trap_only_without_training(data):
    """Evaluating with autograd on (model.eval() but no no_grad, e.g. for a saliency map): the
    drop-in without training= behaves as d2l (batch statistics, moving averages move);
    bnlab.torch.BatchNorm follows model.eval()."""
    train, test = data
    X = test[0][:64].requires_grad_()
    chapter = chapter_net(d2l.batch_norm, 0.9).eval()
    module = ch.lenet_bn(lambda c: bt.BatchNorm(c, 4), lambda c: bt.BatchNorm(c, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", d2l.GradModeWarning)
        before = _moving(chapter), _moving(module)
        chapter(X).sum().backward()
        module(X).sum().backward()
    assert not torch.equal(_moving(chapter)[0], before[0][0])  # d2l's behaviour, reachable
    assert all(torch.equal(a, b) for a, b in zip(_moving(module), before[1], strict=True))


def test_d2l_state_dict_into_bnlab_then_recalibrate(data):
    """A trained d2l model saves no moving statistics: loading its state_dict into a LeNet-BN
    made of bnlab.torch.BatchNorm says so; after strict=False and bnlab.recalibrate the model
    evaluates at least as well as the d2l model with its own moving averages (which lag behind
    the weights after a short run: recalibrated statistics are the better ones)."""
    train, test = data
    trained = chapter_net(ch.d2l_batch_norm_v017, 0.9)
    _train_steps(trained, train, steps=24, lr=1.0, batch_size=128)
    sd = trained.state_dict()
    assert not any("moving" in k for k in sd)  # d2l never registered them
    model = ch.lenet_bn(lambda c: bt.BatchNorm(c, 4), lambda c: bt.BatchNorm(c, 2), seed=1)
    with pytest.raises(RuntimeError, match=r"bnlab\.recalibrate"):
        model.load_state_dict(sd)
    with pytest.warns(d2l.MissingMovingStatisticsWarning):
        model.load_state_dict(sd, strict=False)
    before = ch.evaluate_accuracy(model, *test)
    batches = [X for (X, _), _ in zip(ch.batches(*train, 256, epoch=5), range(8), strict=False)]
    bnlab.recalibrate(model, batches)
    after, d2l_acc = ch.evaluate_accuracy(model, *test), ch.evaluate_accuracy(trained, *test)
    assert after > before + 0.2 and after > d2l_acc - 0.03, (before, after, d2l_acc)
