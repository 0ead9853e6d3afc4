"""bench/bench_orchestration.py runs the README command in a copy on the shared venv.

The copy's `scripts/dev.sh` must find the venv set up (no re-install: set-up is not part of
the figure) and must not leave the shared editable install pointing at the temporary copy.
The real dev.sh runs here, against a venv folder holding only its set-up stamp: any install
attempt would fail for want of a Python in it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _copy(clone: Path) -> None:
    for rel in ("scripts/dev.sh", "pyproject.toml", "requirements/constraints.txt"):
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, clone / rel)


def _deps_hash() -> str:
    """dev.sh's: sha256 of pyproject.toml + constraints.txt, 16 hex digits."""
    data = (ROOT / "pyproject.toml").read_bytes() + (
        ROOT / "requirements/constraints.txt"
    ).read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def test_the_copy_runs_on_the_shared_venv_and_gives_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("bench_orchestration", None)
    import bench_orchestration

    clone, venv = tmp_path / "clone", tmp_path / "venv"
    _copy(clone)
    venv.mkdir()
    stamp = venv / ".tracetune-installed"
    stamp.write_text(f"{_deps_hash()} {ROOT}\n")  # the venv as set up in the repository
    original = stamp.read_text()
    env = {**os.environ, "TRACETUNE_VENV": str(venv)}

    with bench_orchestration.shared_venv_for(clone, venv):
        setup = subprocess.run(
            ["bash", str(clone / "scripts" / "dev.sh"), "setup"],
            cwd=clone, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert setup.returncode == 0, setup.stdout + setup.stderr
        assert "==>" not in setup.stdout  # neither "setting up" nor "pointing ... at this checkout"
    assert stamp.read_text() == original


def test_an_unset_venv_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    sys.modules.pop("bench_orchestration", None)
    import bench_orchestration

    unset = bench_orchestration.shared_venv_for(tmp_path / "clone", tmp_path / "venv")
    with pytest.raises(SystemExit, match="not set up"), unset:
        pass
