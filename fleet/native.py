"""Which implementation of the hot path runs: the compiled one or its pure-Python reference.

Each compiled module (C, built by ``pip install``; see setup.py) has a
pure-Python twin with the same interface that stays the reference, passes the
same tests and is the fallback. ``FLEET_PURE=1`` in the environment selects
the pure ones, so the suite can run against both (scripts/test does).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TypeVar

T = TypeVar("T")

PURE = os.environ.get("FLEET_PURE", "") not in ("", "0")
# The compiled modules, by name: setup.py builds these (fleet/x/_y.c for fleet.x._y); the tests check all were built.
COMPILED = ("fleet.dispatch._core", "fleet.dispatch._frames", "fleet.mongrel2._codec", "fleet.wsgi._environ",
            "fleet.wsgi._response", "fleet.worker._lane", "fleet.http._simple")


def compiled(name: str) -> ModuleType | None:
    """The compiled module ``name``, or None if FLEET_PURE is set or it was not built."""
    if PURE:
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def twin(name: str, attribute: str, reference: T) -> T:
    """``attribute`` of the compiled module ``name`` if it runs, else its pure-Python ``reference``."""
    return getattr(compiled(name), attribute, reference)


def describe() -> str:
    """One line for the logs: which implementation runs."""
    if PURE:
        return "pure Python (FLEET_PURE)"
    missing = [name for name in COMPILED if compiled(name) is None]
    return f"pure Python (not built: {', '.join(missing)})" if missing else "compiled"
