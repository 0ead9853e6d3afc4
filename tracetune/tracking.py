"""MLflow set-up shared by every stage: one experiment, one tracking URI, runs tagged by stage."""

from __future__ import annotations

import os
import re
import socket
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


class StageKilled(BaseException):
    """SIGTERM / SIGHUP reached a stage: unwinds like Ctrl-C so that its MLflow run is ended."""


@contextmanager
def _raise_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `StageKilled` in the main thread (their default is to die on the
    spot, leaving the MLflow run RUNNING forever); the previous handlers come back after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise StageKilled(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from Linux's /proc), None if it is
    gone. With the pid, it names one process: a reused pid has another start time. Without
    /proc, "unknown" for a live pid (the kernel still says whether it exists)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
        return "unknown"
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), after "pid (comm)"


def _owner_tags() -> dict[str, str]:
    pid = os.getpid()
    return {
        "tracetune.host": socket.gethostname(),
        "tracetune.pid": str(pid),
        "tracetune.pid_start": _process_start(pid) or "unknown",
    }


def is_orphaned(tags: dict[str, str]) -> bool:
    """A RUNNING run whose process on this host is gone (or its pid now names another process).
    Runs of other hosts, or without the owner tags, cannot be judged here and are left alone."""
    if tags.get("tracetune.host") != socket.gethostname() or "tracetune.pid" not in tags:
        return False
    started = _process_start(int(tags["tracetune.pid"]))
    if started is None:
        return True
    recorded = tags.get("tracetune.pid_start", "unknown")
    return "unknown" not in (started, recorded) and started != recorded


def reap_orphaned_runs(experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the RUNNING runs of `stage` whose process died without ending them
    (`kill -9`, a lost machine): run at each stage start. Returns the run ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`tracetune.stage` = '{stage}'",
        max_results=1000,
    )
    reaped = []
    for run in runs:
        if is_orphaned(run.data.tags):
            client.set_tag(run.info.run_id, "tracetune.reaped", "process gone; reaped at start")
            client.set_terminated(run.info.run_id, status="KILLED")
            reaped.append(run.info.run_id)
    return reaped


@contextmanager
def stage_run(
    params: TrackingParams, stage: str, tags: dict[str, Any] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one pipeline stage, tagged with the stage and the git commit.

    The run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C, SIGTERM, SIGHUP); a run
    whose process was killed outright (`kill -9`) is marked KILLED by the next start of the
    same stage (`reap_orphaned_runs`).
    """
    import mlflow

    experiment_id = configure(params)
    reap_orphaned_runs(experiment_id, stage)
    all_tags = {
        "tracetune.stage": stage,
        "git_commit": git_commit() or "unknown",
        **_owner_tags(),
        **(tags or {}),
    }
    with _raise_on_termination():
        run = mlflow.start_run(run_name=stage, tags={k: str(v) for k, v in all_tags.items()})
        try:
            yield run
        except (KeyboardInterrupt, StageKilled):
            mlflow.end_run(status="KILLED")
            raise
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
        mlflow.end_run(status="FINISHED")
