"""MLflow set-up shared by every stage: one experiment, one tracking URI, runs tagged by stage."""

from __future__ import annotations

import os
import re
import sqlite3
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

    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    location = params.artifact_location
    if "://" not in location:
        location = Path(location).resolve().as_uri()
    experiment = mlflow.get_experiment_by_name(params.experiment)
    if experiment is not None:
        if "://" not in params.artifact_location:
            relocate_local_store(uri, experiment.artifact_location, location)
        mlflow.set_experiment(params.experiment)
        return str(experiment.experiment_id)
    experiment_id = mlflow.create_experiment(params.experiment, artifact_location=location)
    mlflow.set_experiment(params.experiment)
    return str(experiment_id)


# Columns in which MLflow's SQL store records where artifacts live (experiments, runs, model
# versions, logged models): absolute paths, whatever params.yaml said.
_LOCATION_COLUMN = re.compile(r"location|artifact_uri|^source$")


def relocate_local_store(uri: str, recorded: str, wanted: str) -> int:
    """Point a workspace's own SQLite store at its own artifact folder after a move or copy.

    MLflow turns the relative `tracking.artifact_location` into an absolute path once, when it
    creates the experiment; a moved or copied workspace would then keep writing new runs into
    the old folder (and read old runs from there). When the recorded root is not this
    workspace's, every recorded location under it is rewritten to the same place under this
    one (the artifacts moved with the folder). Returns the number of values rewritten.
    """
    from tracetune.registry.locking import local_store_path

    db = local_store_path(uri) if uri.startswith("sqlite:") else None
    if db is None or not db.is_file() or recorded.rstrip("/") == wanted.rstrip("/"):
        return 0
    pairs = [(recorded.rstrip("/"), wanted.rstrip("/"))]
    if recorded.startswith("file://") and wanted.startswith("file://"):
        pairs.append((_file_path(recorded), _file_path(wanted)))  # plain paths too
    changed = 0
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for column in (r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')):
                if not _LOCATION_COLUMN.search(column):
                    continue
                for old, new in pairs:
                    changed += conn.execute(
                        f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                        f'WHERE "{column}" = ? OR substr("{column}", 1, ?) = ?',
                        (new, len(old) + 1, old, len(old) + 1, old + "/"),
                    ).rowcount
    return changed


def _file_path(uri: str) -> str:
    from urllib.parse import unquote, urlparse

    return unquote(urlparse(uri).path).rstrip("/")


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
