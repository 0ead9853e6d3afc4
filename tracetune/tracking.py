"""MLflow set-up shared by every stage: one experiment, one tracking URI, runs tagged by stage."""

from __future__ import annotations

import os
import socket
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
