"""Importing a bench script (bench/ is not a package) for a test, fresh each time."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def import_bench(monkeypatch: pytest.MonkeyPatch, name: str) -> ModuleType:
    """`bench/<name>.py` as a module, re-imported (a test may have changed what it reads)."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop(name, None)
    return importlib.import_module(name)
