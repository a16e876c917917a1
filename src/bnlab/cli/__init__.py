"""The ``bnlab`` command line.

Each subcommand lives in its own module of this package (``bnlab/cli/<name>.py``, dashes in the
command name become underscores) and defines:

    HELP: str                       one-line help
    add_arguments(parser) -> None   its argparse arguments
    run(args) -> int                the exit status (EXIT_OK or EXIT_FAILED)

Modules are discovered, so adding a command never edits this file. Heavy imports (torch,
matplotlib, numba) belong inside ``run`` so that ``bnlab --help`` stays fast.

Errors: a command raises; :func:`main` turns the exception into one line on stderr and an exit
status (no traceback). Bad arguments, files or data (:class:`bnlab.errors.UsageError` and the other
bnlab errors, ``ValueError``, ``OSError``, ``MemoryError``) exit with EXIT_USAGE; anything else is a
bug in bnlab and exits with EXIT_INTERNAL (``BNLAB_DEBUG=1`` shows its traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

EXIT_OK = 0  # success
EXIT_FAILED = 1  # the command ran and its verdict is negative (diagnose BAD, check over tolerance)
EXIT_USAGE = 2  # bad arguments, files or data: nothing was changed
EXIT_INTERNAL = 3  # an unexpected error inside bnlab (a bug: please report it)
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_CODES_HELP = f"""exit status:
  {EXIT_OK}    success
  {EXIT_FAILED}    the command ran and reports a failure (diagnose: a BAD layer; check: an error
       over its tolerance; train: the loss diverged)
  {EXIT_USAGE}    bad arguments, files or data (a one-line error on stderr; nothing was changed)
  {EXIT_INTERNAL}    internal error in bnlab (set BNLAB_DEBUG=1 for the traceback)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""


def _command_modules():
    import bnlab.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield info.name.replace("_", "-"), importlib.import_module(f"bnlab.cli.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlab",
        description="Batch normalization: correct, explained, fast and checkable.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in _command_modules():
        p = sub.add_parser(
            name,
            help=mod.HELP,
            description=mod.HELP,
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def usage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the user's arguments, files or data are bad" (exit EXIT_USAGE)."""
    from bnlab.errors import BNLabError

    return (BNLabError, ValueError, OSError, EOFError, MemoryError, OverflowError)


MAX_MESSAGE = 600  # characters: an error line never dumps data


def describe(err: BaseException) -> str:
    """The exception's message as one line of at most MAX_MESSAGE characters."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = text or type(err).__name__
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    if isinstance(err, MemoryError):
        return f"out of memory{': ' + text if text != 'MemoryError' else ''}"
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) or argparse's usage error (2), already printed
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USAGE
    prog = f"bnlab {args.command}"
    try:
        return int(args._run(args) or EXIT_OK)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except usage_errors() as err:
        if os.environ.get("BNLAB_DEBUG"):
            raise
        print(f"{prog}: error: {describe(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # a bug in bnlab: one line, a distinct status
        if os.environ.get("BNLAB_DEBUG"):
            raise
        print(
            f"{prog}: internal error: {type(err).__name__}: {describe(err)} "
            "(a bug in bnlab; BNLAB_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
