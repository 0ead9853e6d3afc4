"""The end of the main job's console: the evaluation in rounded numbers, then what to do next.

Why: a walk-through ended on the stage table and did not know where the reports were, how to
see the registry or how to approve the new version. The closing block says it with the run's
own paths, model name and version, and why the gate refused when it did.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tracetune.config import Params

CONSOLE_COLUMNS = (
    ("tsr", "TSR"),
    ("tsr_95ci", "95% CI"),
    ("steps_mean", "steps"),
    ("cost_per_task_usd", "$/task"),
    ("tsr_vs_production", "vs production"),
)


def eval_console_table(rows: Sequence[dict[str, Any]]) -> str:
    """The evaluation comparison for the console: fixed columns, every number rounded."""
    from tracetune.console import num

    if not rows:
        return ""
    cells = [["model", *(title for _, title in CONSOLE_COLUMNS)]]
    for row in rows:
        cells.append(
            [str(row.get("candidate", ""))]
            + [num(row[key]) if key in row else "" for key, _ in CONSOLE_COLUMNS]
        )
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    return "\n".join(line.rstrip() for line in lines)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def approval_lines(
    registered: dict[str, Any] | None, registered_now: bool, promote_note: str
) -> list[str]:
    """How the new version meets its reviewer, or why there is none to approve."""
    if registered is None or not registered_now:
        return ["  approve     nothing newly registered in this run"]
    model, version = registered.get("model", "MODEL"), registered.get("version", "VERSION")
    if registered.get("auto_approved"):
        return [f"  approve     v{version} was auto-approved (registry.auto_approve): champion"]
    if registered.get("verdict") != "passed":
        fails = [str(r) for r in registered.get("reasons") or [] if str(r).startswith("FAIL")]
        lines = [f"  approve     nothing: v{version} failed the promotion gate"]
        lines += [f"              {reason}" for reason in fails[:3]]
        return lines
    if promote_note and "tracetune approve" not in promote_note:
        return [f"  approve     {promote_note}"]  # decided inline, or waiting in a deployment
    return [
        f"  approve     tracetune approve {model} {version} --by NAME"
        f"   (v{version} passed the gate and is challenger)",
        f"              or: tracetune reject {model} {version} --by NAME",
    ]


def what_next(root: Path, params: Params, stages: Sequence[dict[str, Any]]) -> str:
    """The closing block: reports, metrics, runs, registry and the approval step of this run."""
    import os

    from flows.retrain import read_registration  # here: retrain imports this module

    reports = sorted((root / params.paths.reports / "eval").glob("*/report.md"))
    by_name = {s["name"]: s for s in stages}
    registered_now = by_name.get("register", {}).get("status") == "ran"
    promote_note = str(by_name.get("promote", {}).get("note", ""))
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.tracking_uri
    ui = (
        f"mlflow ui --backend-store-uri {uri}"
        if uri.startswith("sqlite:")
        else f"open {uri} (the MLflow server)"
    )
    lines = [
        f"What next (commands run from {root}):",
        "  reports     "
        + (", ".join(_rel(p, root) for p in reports) or "none written (no evaluation ran)"),
        "  metrics     dvc metrics show   (curves: dvc plots show)",
        f"  runs        {ui}",
        "  registry    tracetune registry status",
        *approval_lines(
            read_registration(root / params.paths.metrics), registered_now, promote_note
        ),
    ]
    return "\n".join(lines)
