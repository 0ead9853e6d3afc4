"""MLflow set-up shared by every stage: one experiment, one tracking URI, runs tagged by stage.

A pipeline execution is one parent run with a nested run per stage: the stages run in separate
processes (`dvc repro`), so they find their parent by a pipeline id (the Prefect flow run's id,
or `TRACETUNE_PIPELINE_ID` for a plain `dvc repro`) rather than by MLflow's active-run stack.
Every run under Prefect carries tags naming its flow run (`prefect.*`).
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracetune.config import TrackingParams

if TYPE_CHECKING:
    import mlflow


def tracking_uri(params: TrackingParams) -> str:
    """The environment wins so that one params.yaml serves laptops and servers alike."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri


def set_uri_not_exported(uri: str) -> None:
    """`mlflow.set_tracking_uri`, minus its side effect of exporting MLFLOW_TRACKING_URI: that
    variable is the user's override (`tracking_uri`), and once exported, the next stage run in
    the same process or started from it (the in-process flow, a test session) wrote its runs
    into this stage's store whatever its own params said."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def configure(params: TrackingParams) -> str:
    """Point mlflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri(params)
    set_uri_not_exported(uri)
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


# --- Prefect and the pipeline's parent run -------------------------------------------------------

PIPELINE_ID_ENV = "TRACETUNE_PIPELINE_ID"
PIPELINE_STAGE = "pipeline"
PIPELINE_TAG = "tracetune.pipeline_id"
# What a flow process hands its stage processes (they run without Prefect's context).
PREFECT_ENV = {
    "prefect.flow_run_id": "TRACETUNE_PREFECT_FLOW_RUN_ID",
    "prefect.flow_run_name": "TRACETUNE_PREFECT_FLOW_RUN_NAME",
    "prefect.flow_name": "TRACETUNE_PREFECT_FLOW_NAME",
    "prefect.flow_run_url": "TRACETUNE_PREFECT_FLOW_RUN_URL",
}
EXPORTED_BY_ENV = "TRACETUNE_PREFECT_EXPORTED_BY"


def _live_prefect_tags() -> dict[str, str]:
    """The flow run this thread runs in, from Prefect's own context; {} outside a flow.

    Prefect is not imported for this: a process that has not imported it cannot be in a flow.
    """
    if "prefect" not in sys.modules:
        return {}
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return {}
    run_id = str(ctx.flow_run.id)
    tags = {
        "prefect.flow_run_id": run_id,
        "prefect.flow_run_name": str(ctx.flow_run.name),
        "prefect.flow_name": str(ctx.flow.name) if ctx.flow is not None else "",
        "prefect.flow_run_url": _prefect_ui_url(run_id) or "",
    }
    return {k: v for k, v in tags.items() if v}


def _prefect_ui_url(flow_run_id: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The flow run's page when a Prefect API (hence UI) URL is known, else None. (The
    temporary local API's page lives only as long as its flow run.)"""
    env = os.environ if environ is None else environ
    if "prefect" in sys.modules and environ is None:
        from prefect.utilities.urls import url_for

        return url_for("flow-run", obj_id=flow_run_id)
    ui = env.get("PREFECT_UI_URL") or env.get("PREFECT_API_URL", "").removesuffix("/api")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def prefect_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags linking a run to the Prefect flow run it belongs to; {} when not under Prefect.

    In the flow's own process Prefect's context says; in a stage process (`dvc repro` started
    by the flow) the variables `export_prefect_context` set; in a process a worker started for
    a deployment, `PREFECT__FLOW_RUN_ID`. Variables the exporting process left behind after its
    flow ended are ignored there (its own pid is recorded with them).
    """
    env = os.environ if environ is None else environ
    live = _live_prefect_tags()
    if live:
        return live
    if env.get(EXPORTED_BY_ENV) == str(os.getpid()):
        return {}
    tags = {tag: env[var] for tag, var in PREFECT_ENV.items() if env.get(var)}
    if "prefect.flow_run_id" not in tags and env.get("PREFECT__FLOW_RUN_ID"):
        run_id = env["PREFECT__FLOW_RUN_ID"]
        tags = {"prefect.flow_run_id": run_id}
        url = _prefect_ui_url(run_id, env)
        if url:
            tags["prefect.flow_run_url"] = url
    return tags if "prefect.flow_run_id" in tags else {}


def export_prefect_context(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Hand the current flow run's identity to the stage processes it starts; call it inside
    a flow. Returns what was set ({} outside a flow, and nothing is set)."""
    env = os.environ if environ is None else environ
    tags = _live_prefect_tags()
    if not tags:
        return {}
    values = {PREFECT_ENV[tag]: value for tag, value in tags.items()}
    for var in PREFECT_ENV.values():
        env.pop(var, None)  # an earlier flow run's URL must not outlive it
    values[EXPORTED_BY_ENV] = str(os.getpid())
    env.update(values)
    return values


def pipeline_id(environ: Mapping[str, str] | None = None) -> str | None:
    """What groups stage runs under one parent: `TRACETUNE_PIPELINE_ID`, else the Prefect
    flow run; None for a stage run on its own."""
    env = os.environ if environ is None else environ
    chosen = env.get(PIPELINE_ID_ENV) or prefect_tags(environ).get("prefect.flow_run_id")
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", chosen) if chosen else None


def pipeline_parent(experiment_id: str, pid: str, tags: Mapping[str, str]) -> str:
    """The parent run of pipeline execution `pid`: found by its tag, else created (RUNNING)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}' and tags.`tracetune.stage` = "
        f"'{PIPELINE_STAGE}'",
        max_results=1,
    )
    if found:
        return str(found[0].info.run_id)
    name = tags.get("prefect.flow_run_name") or pid[:12]
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline {name}",
        tags={PIPELINE_TAG: pid, "tracetune.stage": PIPELINE_STAGE, **tags},
    )
    return str(run.info.run_id)


def _mark_parent(run_id: str, status: str) -> None:
    """The parent spans its stages: RUNNING while one runs, then how the last one ended."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status=status, end_time=int(time.time() * 1000))
    except MlflowException as exc:  # the parent was deleted meanwhile: the stage is what counts
        print(f"warning: pipeline run {run_id} not updated: {exc}", file=sys.stderr)


def parent_run_id(run: Any) -> str | None:
    """The pipeline parent of a stage run (None for a run on its own)."""
    return run.data.tags.get("mlflow.parentRunId") if run is not None else None


@contextmanager
def stage_run(
    params: TrackingParams, stage: str, tags: dict[str, Any] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one pipeline stage, tagged with the stage, the git commit and the
    Prefect flow run, nested under its pipeline's parent run when it has one.

    Open it before the stage's work, so that the run's duration is the stage's. The run ends
    FINISHED, FAILED (an exception) or KILLED (Ctrl-C, SIGTERM, SIGHUP); a run whose process
    was killed outright (`kill -9`) is marked KILLED by the next start of the same stage
    (`reap_orphaned_runs`).
    """
    import mlflow

    experiment_id = configure(params)
    reap_orphaned_runs(experiment_id, stage)
    flow_tags = prefect_tags()
    all_tags = {
        "tracetune.stage": stage,
        "git_commit": git_commit() or "unknown",
        **_owner_tags(),
        **flow_tags,
        **(tags or {}),
    }
    nested = mlflow.active_run() is not None
    pid = None if nested else pipeline_id()
    parent = pipeline_parent(experiment_id, pid, flow_tags) if pid else None
    if pid:
        all_tags[PIPELINE_TAG] = pid
    with _raise_on_termination():
        run = mlflow.start_run(
            run_name=stage,
            tags={k: str(v) for k, v in all_tags.items()},
            nested=nested,
            parent_run_id=parent,
        )
        if parent:
            _mark_parent(parent, "RUNNING")
        status = "FINISHED"
        try:
            yield run
        except (KeyboardInterrupt, StageKilled):
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            mlflow.end_run(status=status)
            if parent:
                _mark_parent(parent, status)


# --- what stages log ----------------------------------------------------------------------------


def summary_metrics(
    summary: Mapping[str, Any], prefix: str = "", depth: int = 2
) -> dict[str, float]:
    """The numbers of a stage summary as metrics: top-level counts, and one level of nested
    counts (`quarantine_reasons.bad_json`); lists and deeper tables stay in the JSON."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = re.sub(r"[^A-Za-z0-9_\-./ :]", "_", f"{prefix}{key}")
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[name] = float(value)
        elif isinstance(value, Mapping) and depth > 1:
            out |= summary_metrics(value, f"{name}.", depth - 1)
    return out


def summary_params(summary: Mapping[str, Any]) -> dict[str, str]:
    """The summary's top-level words (status, batch, source) as params."""
    return {k: str(v)[:500] for k, v in summary.items() if v is None or isinstance(v, str | bool)}


def log_summary(summary: Mapping[str, Any], artifact_file: str) -> None:
    """A data stage's summary in its run: counts as metrics, words as params, all of it as JSON."""
    import mlflow

    mlflow.log_metrics(summary_metrics(summary))
    mlflow.log_params(summary_params(summary))
    mlflow.log_dict(dict(summary), artifact_file)


def log_report(markdown: str, plots: list[Path], artifact_path: str) -> None:
    """An evaluation report where MLflow can show it: `report.md` linking the PNG plots logged
    beside it, and `report.html` with them inlined."""
    import mlflow

    from tracetune.evaluation.report import relink_images, report_html

    images = {p.name: p.read_bytes() for p in plots if p.is_file()}
    local = relink_images(markdown, set(images))
    mlflow.log_text(local, f"{artifact_path}/report.md")
    mlflow.log_text(report_html(local, images), f"{artifact_path}/report.html")
    for plot in plots:
        if plot.is_file():
            mlflow.log_artifact(str(plot), artifact_path)
