"""Fixtures of the bnlab.torch tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_thread():
    """torch and numba on one thread for the duration of a test (restored after).

    The small training runs here are dominated by per-call thread wake-ups on a shared 2-core
    machine; one thread makes them several times faster and does not change any result checked.
    """
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    numba = None
    try:
        import numba
    except ImportError:
        pass
    numba_before = numba.get_num_threads() if numba else None
    torch.set_num_threads(1)
    if numba:
        numba.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if numba:
        numba.set_num_threads(numba_before)


@pytest.fixture(scope="session")
def pytorch_module_db():
    """PyTorch's own ModuleInfo database (``torch.testing._internal.common_modules.module_db``,
    shipped in the torch wheel), imported without letting the import change this test session:
    ``common_utils`` loads its own hypothesis profile, freezes ``torch.backends`` flags, adds a
    warnings filter, wraps ``torch._C.ScriptFunction.__call__`` and sets an environment
    variable, all at import. Each is put back as it was."""
    pytest.importorskip("expecttest")  # common_utils needs it (bnlab's dev extra pins it)
    torch = pytest.importorskip("torch")
    import os
    import warnings

    import hypothesis

    profile = hypothesis.settings._current_profile
    filters = list(warnings.filters)
    environ = dict(os.environ)
    calls = (torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__)
    flags_open = not torch.backends.flags_frozen()
    try:
        from torch.testing._internal.common_modules import module_db
    finally:
        hypothesis.settings.load_profile(profile)
        warnings.filters[:] = filters
        os.environ.clear()
        os.environ.update(environ)
        torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = calls
        if flags_open:  # the flag lives in the globals of torch/backends/__init__.py
            torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    return {info.name: info for info in module_db}
