"""Checkpoints of the PyTorch trainer in the NumPy engine's format: the same safetensors keys and
metadata, so either engine resumes or evaluates the other's run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnlab.errors import UsageError
from bnlab.runs import resume_error
from bnlab.train_common import checkpoint_extra


class NumpyStates:
    """Adapters giving torch objects the state API :func:`bnlab.checkpoint.save_checkpoint` uses."""

    def __init__(self, module: nn.Module, opt: torch.optim.SGD):
        self.module, self.opt = module, opt

    def model_state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.module.state_dict().items()}

    def optim_state(self) -> dict[str, np.ndarray]:
        """Momentum buffers under the NumPy engine's keys ``momentum_buffer.<i>``."""
        params = self.opt.param_groups[0]["params"]
        out = {}
        for i, p in enumerate(params):
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"momentum_buffer.{i}"] = buf.detach().cpu().numpy()
        return out

    def hyperparameters(self) -> dict:
        g = self.opt.param_groups[0]
        keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
        return {k: g[k] for k in keys}

    def load(self, model_state: dict, optim_state: dict) -> None:
        self.module.load_state_dict(
            {k: torch.from_numpy(np.array(v)) for k, v in model_state.items()}
        )
        params = self.opt.param_groups[0]["params"]
        for key, value in optim_state.items():
            p = params[int(key.rpartition(".")[2])]
            self.opt.state[p]["momentum_buffer"] = torch.from_numpy(np.array(value))


def save_epoch(out: Path, states: NumpyStates, config: dict, metrics: dict, done: int) -> None:
    from bnlab.checkpoint import save_state
    from bnlab.io import atomic_write_json

    optimizer = {"type": "SGD", **states.hyperparameters()}
    save_state(
        out, states.model_state(), states.optim_state(), optimizer, model_name=config["model"],
        epoch=done, extra=checkpoint_extra(config, metrics, done),
    )  # fmt: skip
    atomic_write_json(out / "metrics.json", metrics)


def bn_parameters(module: nn.Module) -> list:
    """(name, γ, β) of every affine batch-norm layer, for the report."""
    return [
        (name, m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy())
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
    ]


def restore_epoch(out: Path, config: dict, states: NumpyStates, metrics: dict) -> int:
    from bnlab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out, expect_model=config["model"])
    problem = resume_error(out, config, ckpt.meta.get("config", {}))
    if problem:
        raise UsageError(problem)
    states.load(ckpt.model_state, ckpt.optim_state)
    metrics["epochs"] = list(ckpt.meta.get("epochs", []))[: ckpt.epoch]
    metrics["data"] = ckpt.meta.get("data")
    return ckpt.epoch
