"""MLflow set-up shared by every stage: one experiment, one tracking URI, runs tagged by stage."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracetune.config import TrackingParams

if TYPE_CHECKING:
    import mlflow


def tracking_uri(params: TrackingParams) -> str:
    """The environment wins so that one params.yaml serves laptops and servers alike."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri


def configure(params: TrackingParams) -> str:
    """Point mlflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params))
    experiment = mlflow.get_experiment_by_name(params.experiment)
    if experiment is not None:
        mlflow.set_experiment(params.experiment)
        return str(experiment.experiment_id)
    location = params.artifact_location
    if "://" not in location:
        location = Path(location).resolve().as_uri()
    experiment_id = mlflow.create_experiment(params.experiment, artifact_location=location)
    mlflow.set_experiment(params.experiment)
    return str(experiment_id)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=True, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@contextmanager
def stage_run(
    params: TrackingParams, stage: str, tags: dict[str, Any] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one pipeline stage, tagged with the stage and the git commit."""
    import mlflow

    configure(params)
    all_tags = {"tracetune.stage": stage, "git_commit": git_commit() or "unknown", **(tags or {})}
    with mlflow.start_run(run_name=stage, tags={k: str(v) for k, v in all_tags.items()}) as run:
        yield run
