"""The project's .dvcignore against a real DVC repository: what tests and linters write inside a
dependency folder (byte code, caches) must not make `dvc repro` rerun a stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _dvc(repo: Path, *args: str) -> str:
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_bytecode_and_tool_caches_in_a_dependency_do_not_rerun_a_stage(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("X = 1\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    (repo / "dvc.yaml").write_text(
        "stages:\n  copy:\n    cmd: python -c \"open('out.txt', 'w').write('x')\"\n"
        "    deps: [pkg]\n    outs: [out.txt]\n"
    )
    _dvc(repo, "repro")
    for cache in ("__pycache__/mod.cpython-311.pyc", ".mypy_cache/x.json", ".ruff_cache/y"):
        path = repo / "pkg" / cache
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"changes on every test run")
    assert json.loads(_dvc(repo, "status", "--json")) == {}
    (repo / "pkg" / "mod.py").write_text("X = 2\n")  # a real source change still counts
    assert "copy" in json.loads(_dvc(repo, "status", "--json"))
