"""BFCL multi-turn through the unchanged DVC stages (issue 19, item 6): with params-bfcl.yaml,
`dvc repro` simulates, ingests, gates, curates, splits, builds the tiny base, fine-tunes it on
BFCL episodes and evaluates it beside the floor, prompt-only and production arms.

Scaled down as the flow tests are (tests/integration/flow_support.py: same stages, same code);
BFCL's prompts need 4096 positions. Skips without bfcl-eval.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "bfcl_eval", reason="BFCL tests need bfcl-eval: pip install --no-deps bfcl-eval==2026.3.23"
)

from tests.integration.flow_support import TINY, copy_worktree


def dvc(repo: Path, *args: str) -> str:
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_dvc_repro_fine_tunes_and_evaluates_on_bfcl(tmp_path: Path) -> None:
    from flows.retrain import override_params

    root = copy_worktree(tmp_path / "repo")
    shutil.copy(root / "params-bfcl.yaml", root / "params.yaml")
    bfcl = {
        "gates.curated.min_rows": 30,  # 300 sessions of 19 tasks
        "base_model.build.max_positions": 4096,
        "sft.max_length": 4096,
    }
    override_params(root / "params.yaml", TINY | bfcl)
    dvc(root, "repro", "evaluate@sft")

    metrics = root / "metrics"
    assert json.loads((metrics / "simulate.json").read_text())["trajectories"] == 300
    assert json.loads((metrics / "sft.json").read_text())
    evaluation = json.loads((metrics / "eval_sft.json").read_text())
    test_tasks = 6  # the car's declared test split (multi_turn_base_4, _9, ... of its 19)
    for arm in ("candidate", "baseline_prompt_only", "baseline_floor"):
        assert evaluation[arm]["n"] == test_tasks, arm
    assert evaluation["baseline_floor"]["tsr"] == 0.0  # every BFCL task needs a call
    assert evaluation["baseline_production"]["n"] > 0  # production's logs of those tasks
    assert "tsr_vs_floor" in evaluation["delta"]
