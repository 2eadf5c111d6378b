"""Shared helpers for the engine/scheduler tests (test_fig8.py, test_conformance.py, ...).

Imported with ``from conftest import ...`` (pytest puts tests/ on sys.path).  Their one home is
:mod:`llmqueue.worked_example`, which ``llmqueue reproduce`` uses too.
"""

from __future__ import annotations

from llmqueue.worked_example import (  # noqa: F401  (re-exported for the tests)
    ONE_SECOND,
    compositions,
    drive,
    label,
    make_engine,
    put_decoding,
)
