"""Exception types raised by bnlab.

Every class subclasses the builtin a caller would naturally catch (``ValueError`` or ``TypeError``),
so ``except ValueError`` keeps working; the bnlab type lets a caller be more precise. Messages
always name the offending argument and say what was expected.
"""

from __future__ import annotations


class BNLabError(Exception):
    """Base class of every bnlab-specific error."""


class ShapeError(BNLabError, ValueError):
    """An array has the wrong number of dimensions or the wrong size along an axis."""


class DTypeError(BNLabError, TypeError):
    """An array has a dtype bnlab does not accept (e.g. integers where floats are needed)."""


class NonFiniteError(BNLabError, ValueError):
    """A batch contains NaN or Inf and the caller asked for an error instead of a warning."""


class DataFormatError(BNLabError, ValueError):
    """A data file (IDX, checkpoint, safetensors, npz) is corrupt, truncated or of another kind."""


class NonFiniteBatchWarning(RuntimeWarning):
    """A training batch had non-finite statistics; running statistics were left unchanged."""


class UsageError(BNLabError, ValueError):
    """A command-line argument or a named file cannot be used (the CLI exits with status 2)."""


class TrainingDiverged(BNLabError, ArithmeticError):
    """The training loss or the weights became NaN/Inf; the run folder keeps the last finite
    epoch (the CLI exits with status 1)."""


class StateDictError(BNLabError, KeyError):
    """A state dict's keys do not fit the model (missing or unexpected keys)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputModifiedError(BNLabError, ValueError):
    """The input of a forward pass changed before its backward pass (an in-place operation on
    x, or x reused as an output): the backward would compute wrong gradients, so it refuses."""
