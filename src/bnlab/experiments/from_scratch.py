"""``from-scratch``: is a from-scratch batch norm the real thing?

The same LeNet-BN (d2l) from the same initial weights is trained on the same batches with four
batch-norm implementations, in lock step:

* ``engine``   bnlab's NumPy engine (:func:`bnlab.models.lenet_bn`, explicit backward)
* ``d2l``      :class:`bnlab.torch.BatchNorm`, d2l's from-scratch module, in PyTorch
* ``drop-in``  :class:`bnlab.torch.BatchNorm2d`/``1d`` (bnlab's kernels under autograd)
* ``torch``    ``torch.nn.BatchNorm2d``/``1d``: the reference

After every SGD step the max abs difference to ``torch`` is recorded for the training-mode
logits, every parameter gradient and the running statistics; at the end, for the eval-mode
logits. d2l's moving variance averages the *biased* batch variance while PyTorch's averages the
unbiased one; it is compared both raw and after the exact conversion
r_torch = (1 − w)^t + n/(n − 1) · (r_d2l − (1 − w)^t), which accounts for the initial value 1
(w = 0.1 the new batch's weight, t steps, n values per channel per batch).
"""

from __future__ import annotations

import importlib.util

import numpy as np

from bnlab.experiments._runner import Verdict
from bnlab.experiments._summary import fmt

NAME = "from-scratch"
TITLE = "bnlab's engine vs bnlab.torch.BatchNorm (d2l) vs torch.nn.BatchNorm2d, step by step"
CLAIM = (
    "A from-scratch batch norm is the real thing: from the same weights and batches it "
    "produces the same outputs, gradients and running statistics as torch.nn.BatchNorm2d."
)
SOURCE = "d2l 8.5 (BatchNorm from scratch vs nn.BatchNorm2d); cs231n assignment 2"
IMPLS = ("engine", "d2l", "drop-in")
LABELS = {
    "engine": "bnlab engine (NumPy)",
    "d2l": "bnlab.torch.BatchNorm (d2l)",
    "drop-in": "bnlab.torch.BatchNorm2d",
    "torch": "torch.nn.BatchNorm2d",
}
QUANTITIES = ("logits", "grads", "running_mean", "running_var", "running_var_converted")
TOLERANCE = {"float64": 1e-9, "float32": 1e-3}
_TORCH_NORM = {"d2l": "d2l", "drop-in": "bnlab", "torch": "torch"}

_BUDGETS = {
    "full": dict(steps=300, batch_size=128, n_train=38400),
    "quick": dict(steps=60, batch_size=64, n_train=3840),
    "tiny": dict(steps=3, batch_size=16, n_train=48),
}


def unavailable() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch not installed (pip install bnlab[torch])"
    return None


def config(budget: str) -> dict:
    cfg = {**_BUDGETS[budget], "lr": 0.5, "dtype": "float64", "n_test": 256}
    return {**cfg, "tolerance": TOLERANCE[cfg["dtype"]]}


# --------------------------------------------------------------------------- model plumbing


def _is_d2l_bn(model, index: int) -> bool:
    from bnlab.torch import BatchNorm  # noqa: PLC0415

    return isinstance(model[index], BatchNorm)


def _torch_key(model, key: str) -> str:
    """Engine/PyTorch state_dict key -> the key in ``model`` (d2l's BN names differ)."""
    index, name = key.split(".", 1)
    if _is_d2l_bn(model, int(index)):
        name = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                "running_var": "moving_var"}[name]  # fmt: skip
    return f"{index}.{name}"


def torch_models(engine, dtype: str) -> dict:
    """``d2l``, ``drop-in`` and ``torch`` LeNet-BNs holding the engine's initial weights."""
    import torch  # noqa: PLC0415

    from bnlab.torch.models import lenet_bn  # noqa: PLC0415

    models = {}
    for impl, norm in _TORCH_NORM.items():
        model = lenet_bn(norm, seed=None).to(getattr(torch, dtype))
        state = model.state_dict()
        for key, value in engine.state_dict().items():
            if key.endswith("num_batches_tracked") and norm == "d2l":
                continue  # d2l keeps no counter
            tkey = _torch_key(model, key)
            state[tkey] = torch.from_numpy(np.array(value)).reshape(state[tkey].shape)
        model.load_state_dict(state)
        models[impl] = model
    return models


def _flat(named: dict) -> np.ndarray:
    return np.concatenate([np.ravel(v) for _, v in sorted(named.items())])


def engine_step(model, opt, loss_fn, x, y) -> dict:
    """One engine SGD step; returns the logits, gradients, loss and post-step running stats."""
    model.train()
    opt.zero_grad()
    logits = model.forward(x)
    loss = float(loss_fn.forward(logits, y))
    model.backward(loss_fn.backward())
    grads = {k: p.grad.copy() for k, p in model.named_parameters()}
    opt.step()
    return {"loss": loss, "logits": logits, "grads": grads, "state": model.state_dict()}


def torch_step(model, opt, x, y) -> dict:
    import torch  # noqa: PLC0415

    model.train()
    opt.zero_grad()
    logits = model(torch.from_numpy(x))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    loss.backward()
    grads = {k: p.grad.detach().numpy().copy() for k, p in model.named_parameters()}
    opt.step()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return {
        "loss": float(loss.detach()),
        "logits": logits.detach().numpy(),
        "grads": grads,
        "state": state,
    }


def _canonical(model, step: dict) -> dict:
    """Gradients and BN buffers under the engine/PyTorch key names, flattened."""
    if model is None:  # the engine: keys are PyTorch's already
        grads, state = step["grads"], step["state"]
        keys = list(grads)
    else:
        keys = [k for k, _ in _engine_param_keys(model)]
        grads = {k: step["grads"][_torch_key(model, k)] for k in keys}
        state = {k: step["state"][_torch_key(model, k)] for k in _buffer_keys(model)}
    return {
        "grads": {k: np.ravel(grads[k]) for k in keys},
        "running_mean": {k: np.ravel(v) for k, v in state.items() if k.endswith("running_mean")},
        "running_var": {k: np.ravel(v) for k, v in state.items() if k.endswith("running_var")},
    }


def _engine_param_keys(model):
    """Engine-style parameter keys of a torch LeNet-BN (d2l's gamma/beta renamed)."""
    for key, p in model.named_parameters():
        index, name = key.split(".", 1)
        name = {"gamma": "weight", "beta": "bias"}.get(name, name)
        yield f"{index}.{name}", p


def _buffer_keys(model) -> list[str]:
    keys = []
    for i, _ in enumerate(model):
        if _is_d2l_bn(model, i) or hasattr(model[i], "running_mean"):
            keys += [f"{i}.running_mean", f"{i}.running_var"]
    return keys


def exact_d2l_to_torch_var(var: np.ndarray, n: int, steps: int, w: float = 0.1) -> np.ndarray:
    """d2l's biased moving variance -> PyTorch's unbiased one, exactly, for fixed n per batch:
    both start at 1 and weigh the new batch by w, so r_t − (1 − w)^t is linear in the batch
    variances and scales by n/(n − 1)."""
    init = (1.0 - w) ** steps
    return init + n / (n - 1) * (var - init)


def values_per_channel(engine, x: np.ndarray) -> dict[int, int]:
    """n (values per channel per batch) of each BN layer, keyed by its index in ``engine``,
    measured on batch ``x`` (the engine's buffers are left as they were)."""
    from bnlab.experiments._bn import bn_input_moments, bn_layers, running_stats_restored  # noqa: PLC0415

    with running_stats_restored(engine):
        counts = [n for _, _, n in bn_input_moments(engine, x)]
    bn_ids = {id(m) for m in bn_layers(engine)}
    indices = [i for i, layer in enumerate(engine) if id(layer) in bn_ids]
    return dict(zip(indices, counts, strict=True))


def run_seed(cfg: dict, seed: int, progress) -> dict:
    import torch  # noqa: PLC0415

    from bnlab.experiments._data import batch_indices, fashion_mnist  # noqa: PLC0415
    from bnlab.models import lenet_bn  # noqa: PLC0415
    from bnlab.nn import CrossEntropyLoss  # noqa: PLC0415
    from bnlab.optim import SGD  # noqa: PLC0415

    dtype = np.dtype(cfg["dtype"])
    train, _, test = fashion_mnist(cfg["n_train"], 0, cfg["n_test"], standardize=False)
    engine = lenet_bn(seed, dtype=dtype)
    models = torch_models(engine, cfg["dtype"])
    opts = {k: torch.optim.SGD(m.parameters(), lr=cfg["lr"]) for k, m in models.items()}
    e_opt, loss_fn = SGD(engine.parameters(), lr=cfg["lr"]), CrossEntropyLoss()
    trace = {impl: {q: [] for q in QUANTITIES} for impl in IMPLS}
    losses = {impl: [] for impl in (*IMPLS, "torch")}
    batches = batch_indices(len(train), cfg["batch_size"], seed, cfg["steps"])
    counts = values_per_channel(engine, train.x[: cfg["batch_size"]].astype(dtype))
    with progress(cfg["steps"], f"seed {seed}") as bar:
        for t, idx in enumerate(batches, start=1):
            x, y = train.x[idx].astype(dtype), train.y[idx]
            steps = {"engine": engine_step(engine, e_opt, loss_fn, x, y)}
            for impl, model in models.items():
                steps[impl] = torch_step(model, opts[impl], x, y)
            ref = _canonical(models["torch"], steps["torch"])
            for impl in IMPLS:
                got = _canonical(None if impl == "engine" else models[impl], steps[impl])
                row = _differences(got, ref, steps[impl]["logits"], steps["torch"]["logits"])
                if impl == "d2l":
                    row["running_var_converted"] = max(
                        float(np.abs(exact_d2l_to_torch_var(v, counts[int(k.split(".")[0])], t)
                                     - ref["running_var"][k]).max())
                        for k, v in got["running_var"].items()
                    )  # fmt: skip
                for q in QUANTITIES:
                    trace[impl][q].append(row[q])
            for impl, s in steps.items():
                losses[impl].append(s["loss"])
            bar.update(1, loss=steps["torch"]["loss"])
    return {"trace": trace, "loss": losses, "eval_logits": _eval_differences(engine, models, test)}


def _differences(got: dict, ref: dict, logits, ref_logits) -> dict:
    def maxdiff(a: dict, b: dict) -> float:
        return float(np.abs(_flat(a) - _flat(b)).max())

    row = {
        "logits": float(np.abs(np.asarray(logits) - ref_logits).max()),
        "grads": maxdiff(got["grads"], ref["grads"]),
        "running_mean": maxdiff(got["running_mean"], ref["running_mean"]),
        "running_var": maxdiff(got["running_var"], ref["running_var"]),
    }
    row["running_var_converted"] = row["running_var"]
    return row


def _eval_differences(engine, models: dict, test) -> dict:
    """Max abs difference of eval-mode logits on the test images, per implementation."""
    import torch  # noqa: PLC0415

    from bnlab.nn import no_grad  # noqa: PLC0415

    x = test.x.astype(engine.state_dict()["0.weight"].dtype)
    engine.eval()
    with no_grad():
        outs = {"engine": engine.forward(x)}
    with torch.no_grad():
        for impl, model in models.items():
            model.eval()
            outs[impl] = model(torch.from_numpy(x)).numpy()
    return {impl: float(np.abs(outs[impl] - outs["torch"]).max()) for impl in IMPLS}


def summarize(per_seed: list[dict], cfg: dict) -> dict:
    """Worst case over seeds and steps, per implementation and quantity."""
    return {
        impl: {
            **{q: max(max(run["trace"][impl][q]) for run in per_seed) for q in QUANTITIES},
            "eval_logits": max(run["eval_logits"][impl] for run in per_seed),
        }
        for impl in IMPLS
    }


def verdict(summary: dict, cfg: dict) -> Verdict:
    """Holds when every implementation matches torch within the dtype's tolerance in training
    logits, gradients, running mean and running variance (d2l's after the exact conversion
    between the biased and unbiased conventions). Eval logits must match for the engine and the
    drop-in; d2l's differ by construction (its biased moving variance) and are reported."""
    tol = cfg["tolerance"]
    checked = ("logits", "grads", "running_mean", "running_var_converted")
    ok = all(summary[i][q] <= tol for i in IMPLS for q in checked)
    ok = ok and all(summary[i]["eval_logits"] <= tol for i in ("engine", "drop-in"))
    worst = ", ".join(f"{LABELS[i]} {fmt(max(summary[i][q] for q in checked))}" for i in IMPLS)
    d2l = summary["d2l"]
    text = (
        f"worst max abs difference to torch.nn.BatchNorm2d in training over all steps "
        f"({cfg['dtype']}, tolerance {fmt(tol)}): {worst}; eval logits: engine "
        f"{fmt(summary['engine']['eval_logits'])}, drop-in "
        f"{fmt(summary['drop-in']['eval_logits'])}. d2l's moving variance is the biased one: "
        f"it differs by up to {fmt(d2l['running_var'])} raw and "
        f"{fmt(d2l['running_var_converted'])} after the exact conversion, so d2l's eval logits "
        f"differ by {fmt(d2l['eval_logits'])} (a convention, not a bug in the math)."
    )
    return Verdict(ok, text)


def plot(result: dict, out_dir) -> list[str]:
    from bnlab.experiments._plot import new_figure, save_png  # noqa: PLC0415

    run = result["per_seed"][0]
    colors = {"engine": "tab:blue", "d2l": "tab:orange", "drop-in": "tab:green", "torch": "k"}
    fig, axes = new_figure(1, 4, size=(4.6, 4.0))
    ax = axes[0][0]
    for impl, style in (("torch", "-"), ("engine", "--"), ("d2l", ":"), ("drop-in", "-.")):
        ax.plot(range(1, len(run["loss"][impl]) + 1), run["loss"][impl], style,
                color=colors[impl], label=LABELS[impl])  # fmt: skip
    ax.set(xlabel="SGD step", ylabel="training loss", title="(a) training curves (seed 0)")
    for ax, quantity, title in (
        (axes[0][1], "logits", "(b) |logits − torch| (train mode)"),
        (axes[0][2], "grads", "(c) |gradients − torch|"),
    ):
        for impl in IMPLS:
            vals = np.maximum(run["trace"][impl][quantity], 1e-18)
            ax.plot(range(1, len(vals) + 1), vals, color=colors[impl], label=LABELS[impl])
        ax.set(xlabel="SGD step", ylabel="max abs difference to torch", yscale="log",
               title=title)  # fmt: skip
    ax = axes[0][3]
    for impl in IMPLS:
        vals = np.maximum(run["trace"][impl]["running_var_converted"], 1e-18)
        ax.plot(range(1, len(vals) + 1), vals, color=colors[impl], label=LABELS[impl])
    raw = np.maximum(run["trace"]["d2l"]["running_var"], 1e-18)
    ax.plot(range(1, len(raw) + 1), raw, ":", color=colors["d2l"], label="d2l, raw (biased)")
    ax.set(xlabel="SGD step", ylabel="max abs difference to torch", yscale="log",
           title="(d) |running_var − torch| (d2l converted)")  # fmt: skip
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(
        f"Same LeNet-BN, same weights and batches: four batch norms ({result['config']['dtype']})"
    )
    return [save_png(fig, out_dir / "from_scratch.png")]


def report(result: dict) -> str:
    cfg, summary = result["config"], result["summary"]
    lines = [
        f"**Setup.** d2l's LeNet-BN in {cfg['dtype']}, initial weights from "
        f"`bnlab.models.lenet_bn(seed)` copied into the PyTorch models, plain SGD lr {cfg['lr']}, "
        f"{cfg['steps']} steps of batch {cfg['batch_size']} (the same batches for all), "
        f"Fashion-MNIST pixels in [0, 1]. Numbers are the worst max abs difference to "
        f"`torch.nn.BatchNorm2d/1d` over all steps and seeds; eval logits on {cfg['n_test']} "
        f"test images after training.",
        "",
        "| implementation | logits | gradients | running mean | running var | "
        "running var (converted) | eval logits |",
        "|---|---|---|---|---|---|---|",
    ]
    for impl in IMPLS:
        s = summary[impl]
        cells = [fmt(s[q]) for q in (*QUANTITIES, "eval_logits")]
        lines.append(f"| {LABELS[impl]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
