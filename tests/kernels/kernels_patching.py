"""Module attributes set for the length of a ``with`` block, for tests that run under hypothesis
(whose examples cannot use pytest's function-scoped ``monkeypatch``)."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def attributes_set(values: dict):
    """Set ``{(module, name): value}`` for the block, then restore every previous value."""
    saved = {key: getattr(*key) for key in values}
    try:
        for (module, name), value in values.items():
            setattr(module, name, value)
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
