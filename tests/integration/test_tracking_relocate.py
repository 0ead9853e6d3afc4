"""A workspace moved to another folder keeps its MLflow store working: new runs write into the
new folder's artifact root and old runs' artifacts are read from where they moved. Each side
runs in its own process, as two `tracetune` commands before and after the move would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

LOG_RUN = """
import json, sys
import mlflow
from tracetune.config import TrackingParams
from tracetune.tracking import stage_run
name = sys.argv[1]
params = TrackingParams(tracking_uri="sqlite:///mlflow.db", artifact_location="mlartifacts")
open(f"{name}.txt", "w").write(name)
with stage_run(params, "relocate-test") as run:
    mlflow.log_artifact(f"{name}.txt")
client = mlflow.MlflowClient()
runs = client.search_runs([mlflow.get_experiment_by_name("tracetune").experiment_id])
print(json.dumps({
    "run": run.info.run_id,
    "root": mlflow.get_experiment_by_name("tracetune").artifact_location,
    "uris": {r.info.run_id: r.info.artifact_uri for r in runs},
    "files": {
        r.info.run_id: mlflow.artifacts.download_artifacts(run_id=r.info.run_id) for r in runs
    },
}))
"""


def _log_run(workspace: Path, name: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_URI")}
    done = subprocess.run(
        [sys.executable, "-c", LOG_RUN, name],
        cwd=workspace,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_moved_workspace_writes_and_reads_artifacts_in_its_new_folder(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    first = _log_run(old, "first")
    shutil.move(old, new)

    second = _log_run(new, "second")
    root = (new / "mlartifacts").resolve().as_uri()
    assert second["root"] == root
    uris = second["uris"]
    assert isinstance(uris, dict) and len(uris) == 2
    assert all(str(uri).startswith(root) for uri in uris.values())  # old run moved with it
    files = second["files"]
    assert isinstance(files, dict)
    assert (Path(files[first["run"]]) / "first.txt").read_text() == "first"
    assert (Path(files[second["run"]]) / "second.txt").read_text() == "second"
    assert not old.exists()
