"""Child process of the SIGKILL crash-safety tests (not a test module).

    python crash_worker.py MODE FOLDER [--die-before-sidecar]

MODE ``safetensors`` writes ``FOLDER/w.safetensors`` with bnlab.io.save_safetensors;
MODE ``checkpoint`` writes ``FOLDER/ckpt`` with bnlab.checkpoint.save_checkpoint.
The worker first resumes from what is on disk (printing ``ready <step>``, -1 when nothing), then
saves steps step+1, step+2, ... forever, as fast as it can, until the parent kills it. The saved
content of step s is every array filled with the value s, so a reader can check that the file is
internally consistent (metadata step == array contents) and not a mix of two saves.
``--die-before-sidecar`` (checkpoint mode): save one step normally, then SIGKILL itself at the
exact moment between the weights file and its JSON sidecar being replaced.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np

SHAPES = {"a": (512, 512), "b": (256, 1024), "c": (1000,)}  # ~2 MB of float32 per save


def tensors_for(step: int) -> dict[str, np.ndarray]:
    return {k: np.full(s, step, np.float32) for k, s in SHAPES.items()}


def check_consistent(tensors: dict[str, np.ndarray], step: int, where) -> None:
    for k, s in SHAPES.items():
        t = tensors[k]
        if t.shape != s or not (t == step).all():
            raise AssertionError(f"{where}: tensor {k} is not the content of step {step}")


# ------------------------------------------------------------------ safetensors mode
def st_load(folder: Path) -> int:
    from bnlab.io import load_safetensors

    path = folder / "w.safetensors"
    if not path.exists():
        return -1
    tensors, meta = load_safetensors(path)
    step = int(meta["step"])
    check_consistent(tensors, step, path)
    return step


def st_save(folder: Path, step: int) -> None:
    from bnlab.io import save_safetensors

    save_safetensors(folder / "w.safetensors", tensors_for(step), {"step": str(step)})


# ------------------------------------------------------------------ checkpoint mode
class _Model:
    """What save_checkpoint needs of a model/optimizer: state_dict() and hyperparameters()."""

    def __init__(self, step: int):
        self.step = step

    def state_dict(self):
        return tensors_for(self.step)

    def hyperparameters(self):
        return {"lr": 0.1}


def ck_load(folder: Path) -> int:
    from bnlab.checkpoint import load_checkpoint, paths

    if not paths(folder / "ckpt")[0].exists():
        return -1
    ck = load_checkpoint(folder / "ckpt", expect_model="crash")
    check_consistent(ck.model_state, ck.epoch, folder / "ckpt")
    check_consistent({k[len("opt.") :]: v for k, v in ck.optim_state.items()}, ck.epoch, "optim")
    return ck.epoch


def ck_save(folder: Path, step: int) -> None:
    from bnlab.checkpoint import save_checkpoint

    m = _Model(step)

    class _Opt(_Model):
        def state_dict(self):
            return {"opt." + k: v for k, v in tensors_for(self.step).items()}

    save_checkpoint(folder / "ckpt", m, _Opt(step), model_name="crash", epoch=step)


MODES = {"safetensors": (st_load, st_save), "checkpoint": (ck_load, ck_save)}


def main() -> None:
    mode, folder = sys.argv[1], Path(sys.argv[2])
    load, save = MODES[mode]
    step = load(folder)
    print(f"ready {step}", flush=True)
    if "--die-before-sidecar" in sys.argv:
        save(folder, step + 1)
        import bnlab.io

        bnlab.io.atomic_write_json = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        save(folder, step + 2)
        raise SystemExit("unreachable: the worker should have been killed")
    while True:
        step += 1
        save(folder, step)


if __name__ == "__main__":
    main()
