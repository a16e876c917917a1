"""Start :mod:`bnlab.torch.train` on N local CPU processes (bnlab train --nproc N).

The launching process checks the arguments, the run folder and the data once (:func:`preflight`),
owns the run folder's lock while torchrun's workers run (they are told through LOCK_HELD_ENV), and
reads each worker's exit status from a file (STATUS_ENV): the workers exit 0 to torchrun, so a
handled error is bnlab's one line and never torchrun's failure report.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bnlab.runs import LOCK_HELD_ENV, RunFolder, check_mode
from bnlab.torch.train import STATUS_ENV, config_of, main, parse_args


def preflight(argv: list[str]) -> None:
    """Raise the error every rank would hit (bad settings, run folder, missing data) once,
    before torchrun starts the processes."""
    from bnlab.data import find_fashion_mnist

    args = parse_args(argv)
    config_of(args).validate()
    check_mode(Path(args.out), args.resume, args.overwrite)
    find_fashion_mnist(args.data)


def torchrun_command(argv: list[str], nproc: int, port: int | None = None) -> list[str]:
    """The torchrun command line that runs this trainer on ``nproc`` local CPU processes: on
    127.0.0.1:``port``, or (None) ``--standalone``, whose rendezvous store binds a port the OS
    picks (no window in which another process can take a port chosen in advance)."""
    where = ["--standalone"] if port is None else ["--master-addr", "127.0.0.1"]
    where += [] if port is None else ["--master-port", str(port)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *where,
        "-m", "bnlab.torch.train", *argv,
    ]  # fmt: skip


def launch(argv: list[str], nproc: int = 1) -> int:
    """Run the trainer in this process (nproc = 1) or under torchrun (for ``bnlab train --engine
    torch --nproc N``); returns the exit status. With torchrun, this process validates the
    arguments and owns the run folder (its lock) while the workers run."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    if nproc == 1:
        return main(argv)
    preflight(argv)
    args = parse_args(argv)
    with RunFolder.claim(args.out, resume=args.resume, overwrite=args.overwrite) as run:
        code = _run_torchrun(argv, nproc, run)
        run.adopt_files()
    return code


def _run_torchrun(argv: list[str], nproc: int, run: RunFolder) -> int:
    import subprocess
    import tempfile

    from bnlab.cli import EXIT_INTERNAL

    with tempfile.TemporaryDirectory(prefix="bnlab-train-") as tmp:
        status = Path(tmp) / "status"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            LOCK_HELD_ENV: str(run.path.resolve()),
            STATUS_ENV: str(status),
        }
        code = subprocess.call(torchrun_command(argv, nproc), env=env, stdin=subprocess.DEVNULL)
        codes = [int(p.read_text() or EXIT_INTERNAL) for p in Path(tmp).glob("status.*")]
    if code:  # a worker crashed outside main(): torchrun has reported it
        return EXIT_INTERNAL
    return max(codes, default=EXIT_INTERNAL)
