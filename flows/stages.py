"""Prefect tasks that run pipeline stages the way `dvc repro` does, and nothing more.

There is one copy of every stage's command: `dvc.yaml`. A task here runs
`dvc repro --single-item <stage>` in a subprocess, so DVC decides whether the stage is stale, runs
its command and writes `dvc.lock` (the lineage record). Prefect adds what DVC lacks: retries of
transient failures (S3, network) and never of training, timings, live logs (each stage's output
line by line as it is printed, progress bars condensed: flows/live_output.py), and artifacts
(the GE report of a failed gate, the evaluation table).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

# Substrings of botocore/requests/DVC errors that a second try can cure. Anything else (a failed
# gate, a bug, an OOM) fails the same way twice, so retrying it only delays the alarm.
TRANSIENT_MARKERS = (
    "could not connect to the endpoint",
    "endpointconnectionerror",
    "connection refused",
    "connection reset",
    "connection aborted",
    "connectionerror",
    "connecttimeout",
    "read timeout",
    "readtimeout",
    "timed out",
    "temporary failure in name resolution",
    "name or service not known",
    "slowdown",
    "serviceunavailable",
    "service unavailable",
    "internalerror",
    "requesttimeout",
    "throttl",
    "too many requests",
    "bad gateway",
    "gateway timeout",
    "replaced after it was listed",  # ingest: an S3 object overwritten mid-run; the rerun lists it
)
OUTPUT_TAIL_CHARS = 4000
PROGRESS_EVERY_S = 120.0  # the default of `orchestrate.progress_every_s`


class StageFailed(RuntimeError):
    """A stage (or a DVC transfer) exited non-zero; `transient` says whether to retry it."""

    def __init__(
        self,
        message: str,
        *,
        stage: str = "",
        transient: bool = False,
        reports: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.transient = transient
        self.reports = reports


@dataclass(frozen=True)
class StageResult:
    """What the flow records per stage: how it ended and the stage's own wall time."""

    name: str
    # ran | up-to-date | missing | skipped | dispatched | nothing-to-validate | refused
    status: str
    seconds: float = 0.0
    note: str = ""
    reports: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- pure helpers -------------------------------------------------------------------------------


def dvc_argv(*args: str) -> list[str]:
    """DVC through this interpreter: `dvc` on PATH may belong to another environment."""
    return [sys.executable, "-m", "dvc", *args]


def stage_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for stage commands: `python` in dvc.yaml must be this venv's python.

    `scripts/dev.sh` calls `.venv/bin/tracetune` without activating the venv, so PATH would
    otherwise find the system interpreter, which lacks the project's packages.
    """
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (bindir, path) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def is_transient(text: str) -> bool:
    """Whether an error's text names a failure that a retry can cure (network, S3 throttling)."""
    lowered = text.lower()
    return any(marker in lowered for marker in TRANSIENT_MARKERS)


def tail(*texts: str | None, limit: int = OUTPUT_TAIL_CHARS) -> str:
    """The last `limit` characters of a process's output: where the error usually is."""
    joined = "\n".join(t for t in texts if t).strip()
    return joined[-limit:]


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def snapshot_reports(reports_dir: Path) -> dict[Path, float]:
    """HTML reports and their mtimes, to tell which ones a stage just wrote."""
    if not reports_dir.exists():
        return {}
    return {p: p.stat().st_mtime for p in reports_dir.rglob("*.html") if p.is_file()}


def new_reports(
    before: dict[Path, float], after: dict[Path, float], limit: int = 3
) -> tuple[str, ...]:
    """Reports a stage just wrote: the Data Docs index pages if any (GX writes one per site plus
    a page per validation), else the first few HTML files."""
    changed = sorted(str(p) for p, mtime in after.items() if before.get(p) != mtime)
    index = [p for p in changed if Path(p).name == "index.html"]
    return tuple((index or changed)[:limit])


def lock_entry(root: Path, name: str) -> Any:
    """A stage's record in dvc.lock (None if absent): unchanged means DVC skipped it."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    if name in stages:  # DVC 3 writes foreach stages flat, as `evaluate@sft`
        return stages[name]
    base, _, key = name.partition("@")
    entry = stages.get(base)
    return entry.get(key) if key and isinstance(entry, dict) else None


def _flat_scalars(payload: dict[str, Any]) -> dict[str, Any]:
    """Top-level numbers and strings of a metrics file (nested tables stay in the file)."""
    return {k: v for k, v in payload.items() if isinstance(v, (int, float, str, bool))}


PREFERRED_COLUMNS = ("model", "tsr", "tsr_95ci", "steps_mean", "cost_per_task_usd", "latency_s")
BASELINE_ARMS = ("baseline_prompt_only", "baseline_production", "baseline_floor")


def _arm_row(name: str, arm: dict[str, Any]) -> dict[str, Any]:
    """The comparison's columns for one evaluated arm (`candidate` or a baseline)."""
    row: dict[str, Any] = {"candidate": name, "tsr": arm.get("tsr")}
    low, high = arm.get("tsr_ci_low"), arm.get("tsr_ci_high")
    if isinstance(low, int | float) and isinstance(high, int | float):
        row["tsr_95ci"] = f"[{low:.3f}, {high:.3f}]"
    for key in ("steps_mean", "cost_per_task_usd", "latency_s", "n"):
        if key in arm:
            row[key] = arm[key]
    return row


def eval_rows(metrics_dir: Path) -> list[dict[str, Any]]:
    """One row per `eval_<name>.json` (base -> sft -> rlvr, then the rest), then one per baseline.

    Files in the evaluate stage's shape (`candidate`, `baseline_*`, `delta`) give TSR with its
    interval, steps, cost and the TSR delta against production; other files their top-level
    numbers and strings.
    """
    order = {"base": 0, "baseline": 0, "prompt": 0, "sft": 1, "rlvr": 2, "champion": 3}
    files = sorted(
        metrics_dir.glob("eval_*.json"),
        key=lambda p: (order.get(p.stem.removeprefix("eval_"), 9), p.stem),
    )
    rows: list[dict[str, Any]] = []
    baselines: dict[str, dict[str, Any]] = {}
    for path in files:
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(payload, dict):
            continue
        name = path.stem.removeprefix("eval_")
        candidate = payload.get("candidate")
        if not isinstance(candidate, dict):
            rows.append({"candidate": name, **_flat_scalars(payload)})
            continue
        row = _arm_row(name, candidate)
        delta = payload.get("delta")
        for key in ("tsr_vs_production", "tsr_vs_floor"):
            if isinstance(delta, dict) and key in delta:
                row[key] = delta[key]
        rows.append(row)
        for arm in BASELINE_ARMS:
            if isinstance(payload.get(arm), dict):
                baselines.setdefault(arm, payload[arm])
    rows += [_arm_row(arm, baselines[arm]) for arm in BASELINE_ARMS if arm in baselines]
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table over the union of the rows' keys (preferred metrics first)."""
    if not rows:
        return ""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    first = [k for k in PREFERRED_COLUMNS if k in keys[1:]]
    columns = [keys[0], *first, *(k for k in keys[1:] if k not in first)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# --- Prefect side -------------------------------------------------------------------------------


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn`: retry S3/network failures only, never a gate or a bug."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.transient
    except (ConnectionError, TimeoutError):
        return True
    except Exception:
        return False
    return False


def _failure_artifacts(name: str, exc: StageFailed, output: str) -> None:
    """Link the GE report (if the stage wrote one) and summarise the failure in the UI."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    for i, report in enumerate(exc.reports):
        create_link_artifact(
            link=Path(report).resolve().as_uri(),
            link_text=f"{name}: {Path(report).name}",
            key=artifact_key(name, "report", str(i) if i else ""),
            description=f"Data Docs written by the failed stage `{name}`",
        )
    links = "\n".join(f"- [{Path(r).name}]({Path(r).resolve().as_uri()})" for r in exc.reports)
    create_markdown_artifact(
        markdown=f"# Stage `{name}` failed\n\n{links or '_no report written_'}\n\n"
        f"```\n{output}\n```\n",
        key=artifact_key(name, "failure"),
        description=f"Why `{name}` failed; nothing downstream ran and nothing was registered",
    )


def stage_logger() -> Any:
    """The Prefect run logger inside a run (its records reach the UI), else a plain logger."""
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("tracetune.stages")


def run_logged(
    argv: list[str], root: Path, progress_every_s: float = PROGRESS_EVERY_S
) -> tuple[int, str]:
    """Run a command, logging its output line by line as it comes (flows/live_output.py)."""
    from flows.live_output import Condenser, stream_process

    log = stage_logger()
    # A whole pipeline's console stays near 150 lines (issue 22): bars at quarters, and a
    # silent stage says it is alive after 5 minutes (or one progress interval, if longer).
    condenser = Condenser(every_s=progress_every_s, quiet_s=max(300.0, progress_every_s))
    return stream_process(argv, root, stage_env(), log.info, condenser)


def reproduce(
    name: str,
    root: Path,
    reports_dir: Path,
    *,
    force: bool = False,
    retryable: bool = True,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> StageResult:
    """`dvc repro --single-item <name>`: DVC runs the stage if stale and records it in dvc.lock.

    The output is logged line by line while the stage runs, progress bars condensed; the last
    lines go into the failure message and the transient check (`retryable`: training stages
    are never retried, so their failures are never called transient).
    """
    before_reports = snapshot_reports(root / reports_dir)
    before_lock = lock_entry(root, name)
    argv = dvc_argv("repro", "--single-item", *(["--force"] if force else []), name)
    started = time.perf_counter()
    code, output = run_logged(argv, root, progress_every_s)
    if code:
        output = tail(output)
        reports = new_reports(before_reports, snapshot_reports(root / reports_dir))
        raise StageFailed(
            f"stage {name!r} exited {code}:\n{output}",
            stage=name,
            transient=retryable and is_transient(output),
            reports=reports,
        )
    seconds = time.perf_counter() - started
    changed = before_lock is None or lock_entry(root, name) != before_lock
    return StageResult(name, "ran" if changed or force else "up-to-date", round(seconds, 3))


def _reproduce_reporting(
    name: str, root: str, reports_dir: str, force: bool, retryable: bool, progress_every_s: float
) -> StageResult:
    try:
        return reproduce(
            name,
            Path(root),
            Path(reports_dir),
            force=force,
            retryable=retryable,
            progress_every_s=progress_every_s,
        )
    except StageFailed as exc:
        _failure_artifacts(name, exc, str(exc))
        raise


@task(
    name="stage", task_run_name="{name}", cache_policy=NO_CACHE, retry_condition_fn=retry_transient
)
def run_stage(
    name: str,
    root: str,
    reports_dir: str,
    force: bool = False,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> StageResult:
    """A data/evaluation/registry stage; retried (per the flow's options) only when transient."""
    return _reproduce_reporting(name, root, reports_dir, force, True, progress_every_s)


@task(name="train", task_run_name="{name}", cache_policy=NO_CACHE, retries=0)
def run_training_stage(
    name: str, root: str, reports_dir: str, progress_every_s: float = PROGRESS_EVERY_S
) -> StageResult:
    """A training stage: never retried (a rerun costs GPU hours and fails the same way)."""
    return _reproduce_reporting(name, root, reports_dir, False, False, progress_every_s)


@task(
    name="dvc",
    task_run_name="dvc {verb}",
    cache_policy=NO_CACHE,
    retry_condition_fn=retry_transient,
)
def dvc_transfer(verb: str, root: str, targets: list[str]) -> float:
    """`dvc push|pull [targets]` to the default remote; S3/network hiccups are retried."""
    extra = ["--allow-missing"] if verb == "pull" else []
    started = time.perf_counter()
    code, output = run_logged(dvc_argv(verb, *extra, *targets), Path(root))
    if code:
        output = tail(output)
        raise StageFailed(
            f"dvc {verb} exited {code}:\n{output}",
            stage=f"dvc {verb}",
            transient=is_transient(output),
        )
    return round(time.perf_counter() - started, 3)


@task(name="eval-table", cache_policy=NO_CACHE)
def publish_eval_table(metrics_dir: str) -> str:
    """The evaluation comparison (every `metrics/eval_*.json`) as a markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    table = markdown_table(eval_rows(Path(metrics_dir)))
    if table:
        create_markdown_artifact(
            markdown=f"# Evaluation on held-out tasks\n\n{table}\n",
            key="eval-comparison",
            description="Candidates vs the prompt-only baseline (metrics/eval_*.json)",
        )
    return table
