"""``Parameter``, ``Module`` and ``Sequential``: the bookkeeping half of bnlab's CNN engine.

A module owns parameters (learnable arrays with a ``.grad``), buffers (state such as BN running
statistics) and child modules, exactly as ``torch.nn.Module`` does, so ``state_dict()`` keys are
PyTorch's and weights move both ways. There is no autograd: every module implements

    forward(x)      -> y     and caches what its backward needs (unless in ``no_grad()``)
    backward(dout)  -> dx    accumulating dL/dparam into ``param.grad``

The math lives in the layer files (and in :mod:`bnlab.functional` for the norms); this file only
keeps the books.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from bnlab.errors import DTypeError, ShapeError, StateDictError
from bnlab.nn._state_dict import IncompatibleKeys, as_numpy, state_problem
from bnlab.nn.parameter import Parameter

__all__ = ["IncompatibleKeys", "Module", "Parameter", "Sequential", "no_grad"]

_GRAD = {"enabled": True}


@contextlib.contextmanager
def no_grad():
    """Within this block, forward passes keep no cache (inference needs less memory)."""
    old = _GRAD["enabled"]
    _GRAD["enabled"] = False
    try:
        yield
    finally:
        _GRAD["enabled"] = old


class Module:
    """Base class of every layer: parameters, buffers, children, train/eval mode, state_dict.

    Subclasses define ``forward(x)`` and ``backward(dout)``; ``__call__`` is ``forward``.
    Assigning a :class:`Parameter` or a :class:`Module` to an attribute registers it (in
    declaration order, which fixes the state_dict order, as in PyTorch).
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------------ registration
    def __setattr__(self, name: str, value) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError("call Module.__init__() before assigning attributes")
        params, buffers, mods = self._parameters, self._buffers, self._modules
        if isinstance(value, Parameter):
            self._discard(name)
            params[name] = value
        elif isinstance(value, Module):
            self._discard(name)
            mods[name] = value
        elif name in params:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to parameter {name!r}")
            params[name] = None
        elif name in buffers:
            if value is not None and not isinstance(value, np.ndarray):
                raise TypeError(f"buffer {name!r} must be an ndarray or None")
            buffers[name] = value
        elif name in mods:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to child module {name!r}")
            mods[name] = None
        else:
            object.__setattr__(self, name, value)

    def _discard(self, name: str) -> None:
        for d in (self._parameters, self._buffers, self._modules):
            d.pop(name, None)
        self.__dict__.pop(name, None)

    def __getattr__(self, name: str):
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            if store in d and name in d[store]:
                return d[store][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        self._discard(name)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Add a parameter (or a None placeholder, e.g. ``bias`` when ``bias=False``)."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"parameter {name!r} must be a Parameter or None")
        self._discard(name)
        self._parameters[name] = param

    def register_buffer(self, name: str, array: np.ndarray | None, persistent: bool = True):
        """Add a buffer: state that is saved in ``state_dict`` (when persistent) but not learned."""
        if array is not None and not isinstance(array, np.ndarray):
            raise TypeError(f"buffer {name!r} must be an ndarray or None")
        self._discard(name)
        self._buffers[name] = array
        if not persistent:
            self._non_persistent.add(name)

    def add_module(self, name: str, module: Module | None) -> None:
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{name!r} must be a Module or None, got {type(module).__name__}")
        self._discard(name)
        self._modules[name] = module

    # ------------------------------------------------------------------ traversal
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, m in self._modules.items():
            if m is not None:
                yield name, m

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module (name ``prefix``) and every descendant, depth first, each once."""
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:
            name, mod = stack.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            yield name, mod
            kids = [(f"{name}.{n}" if name else n, m) for n, m in mod.named_children()]
            stack.extend(reversed(kids))

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        seen: set[int] = set()
        for mname, mod in self.named_modules(prefix):
            for pname, p in mod._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for mname, mod in self.named_modules(prefix):
            for bname, b in mod._buffers.items():
                if b is not None:
                    yield (f"{mname}.{bname}" if mname else bname), b

    def buffers(self) -> Iterator[np.ndarray]:
        for _, b in self.named_buffers():
            yield b

    # ------------------------------------------------------------------ modes and grads
    def train(self, mode: bool = True) -> Module:
        """Set training mode (batch statistics in BN) on this module and every descendant."""
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode must be True or False, got {mode!r}")
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        """Inference mode (running statistics in BN): ``train(False)``."""
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    def to(self, dtype) -> Module:
        """Cast every floating parameter and buffer to ``dtype`` (e.g. np.float64 for grad checks).

        Integer buffers (``num_batches_tracked``) keep their dtype. Gradients are dropped.
        """
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise DTypeError(f"dtype must be a floating dtype, got {dtype}")
        for m in self.modules():
            for p in m._parameters.values():
                if p is not None:
                    p.data = p.data.astype(dtype)
                    p.grad = None
            for name, b in m._buffers.items():
                if b is not None and b.dtype.kind == "f":
                    m._buffers[name] = b.astype(dtype)
            m._on_dtype_change()
        return self

    def _on_dtype_change(self) -> None:
        """Hook for modules that keep dtype-specific scratch buffers."""

    def double(self) -> Module:
        return self.to(np.float64)

    def float(self) -> Module:
        return self.to(np.float32)

    # ------------------------------------------------------------------ state dict
    def _local_state(self) -> Iterator[tuple[str, np.ndarray]]:
        for name, p in self._parameters.items():
            if p is not None:
                yield name, p.data
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent:
                yield name, b

    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Copies of every parameter and persistent buffer, keyed like PyTorch ("0.weight")."""
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for mname, mod in self.named_modules():
            for name, arr in mod._local_state():
                out[f"{mname}.{name}" if mname else name] = np.array(arr, copy=True)
        return out

    def _state_slots(self) -> OrderedDict[str, tuple[Module, str, np.ndarray]]:
        slots: OrderedDict[str, tuple[Module, str, np.ndarray]] = OrderedDict()
        for mname, mod in self.named_modules():
            for name, arr in mod._local_state():
                slots[f"{mname}.{name}" if mname else name] = (mod, name, arr)
        return slots

    def load_state_dict(
        self, state_dict, strict: bool = True, *, check_values: bool = True
    ) -> IncompatibleKeys:
        """Copy ``state_dict`` into this module's arrays (cast to their dtypes).

        Every key is checked before anything is written: with ``strict=True`` missing or
        unexpected keys raise a StateDictError (a KeyError) listing them all; a wrong shape, an
        integer array for a float slot (or a float for an integer one), NaN/Inf, or a value a
        module refuses (a negative running variance) raises a ShapeError listing every problem.
        On any error nothing has been modified. ``check_values=False`` skips the value checks
        (NaN/Inf, a module's own rules) but not shapes and dtypes: a diagnosis must be able to
        load a broken state to look at it.
        Accepts NumPy arrays or torch tensors (converted with ``.detach().cpu().numpy()``).
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        slots = self._state_slots()
        missing = [k for k in slots if k not in state_dict]
        unexpected = [k for k in state_dict if k not in slots]
        if strict and (missing or unexpected):
            raise StateDictError(
                f"Error(s) in loading state_dict for {type(self).__name__}: "
                f"missing keys: {missing}; unexpected keys: {unexpected}"
            )
        values, problems = {}, []
        for key, (mod, name, arr) in slots.items():
            if key not in state_dict:
                continue
            val = as_numpy(state_dict[key], key)
            problem = state_problem(val, arr, check_values) or (
                check_values and mod._state_value_problem(name, val)
            )
            if problem:
                problems.append(f"{key}: {problem}")
            values[key] = val
        if problems:
            raise ShapeError(
                f"Error(s) in loading state_dict for {type(self).__name__}: " + "; ".join(problems)
            )
        for key, val in values.items():
            _, _, arr = slots[key]
            np.copyto(arr, val, casting="unsafe")
        return IncompatibleKeys(missing, unexpected)

    def _state_value_problem(self, name: str, value: np.ndarray) -> str | None:
        """What is wrong with ``value`` for this module's parameter or buffer ``name`` beyond
        shape and dtype (e.g. a negative variance), or None. Subclasses with constraints
        override it; :meth:`load_state_dict` refuses the whole state dict on any problem."""
        return None

    # ------------------------------------------------------------------ forward/backward
    def forward(self, *args):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def backward(self, dout):
        raise NotImplementedError(f"{type(self).__name__} does not define backward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _need_cache(self) -> bool:
        return _GRAD["enabled"]

    def _cached(self, name: str = "_cache"):
        cache = self.__dict__.get(name)
        if cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() called without a preceding forward() "
                "(or the forward ran inside no_grad())"
            )
        return cache

    # ------------------------------------------------------------------ repr
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        kids = list(self.named_children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not kids:
            return head + ")"
        lines = [head]
        for name, m in kids:
            body = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"


class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ... (PyTorch's state_dict keys)."""

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential argument {i} must be a Module, got {type(m).__name__}")
            self.add_module(str(i), m)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, idx):
        mods = list(self._modules.values())
        if isinstance(idx, slice):
            return Sequential(*mods[idx])
        if isinstance(idx, (int, np.integer)):
            if not -len(mods) <= idx < len(mods):
                raise IndexError(f"index {idx} is out of range for Sequential of {len(mods)}")
            return mods[idx]
        raise TypeError(f"Sequential indices must be int or slice, got {type(idx).__name__}")

    def append(self, module: Module) -> Sequential:
        self.add_module(str(len(self)), module)
        return self

    def forward(self, x):
        for m in self._modules.values():
            x = m.forward(x)
        return x

    def backward(self, dout):
        for m in reversed(self._modules.values()):
            dout = m.backward(dout)
            if dout is None:  # the first layer was told not to compute its input gradient
                break
        return dout
