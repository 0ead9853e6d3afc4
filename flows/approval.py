"""The approval flow: a registered challenger waits for a human before it becomes champion.

The flow pauses with `pause_flow_run(wait_for_input=ApprovalInput)`: the Prefect UI shows the
version's gate verdict and metrics (a markdown artifact) and a form (approve, by, note); the
answer resumes the flow, which approves or rejects through `tracetune.registry.approval` (the
same code as `tracetune approve/reject`, so the same checks and the same lock). Nobody answering
within `registry.approval_timeout_s` records an `expired` decision on the version and leaves the
champion where it is. `registry.auto_approve` (non-production only) skips the pause.

Resume from code or a script:
`prefect.flow_runs.resume_flow_run(id, run_input={"approve": True, "by": "ana", "note": "ok"})`.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput
from pydantic import Field

from tracetune.config import Params, load_params

AUTO_APPROVER = "auto-approve"


class ApprovalInput(RunInput):
    """The reviewer's answer (the form the Prefect UI shows while the flow is paused)."""

    approve: bool = Field(description="true: make this version champion; false: reject it")
    by: str = Field(min_length=1, description="your name (stored on the model version)")
    note: str = Field("", description="why (stored on the model version)")


def registered_version(params: Params) -> str:
    """The version the register stage just created (`metrics/register.json`)."""
    path = params.paths.metrics / "register.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the register stage or pass a version")
    return str(json.loads(path.read_text())["version"])


def review_markdown(summary: dict[str, Any]) -> str:
    """What the reviewer reads before deciding."""
    lines = [
        f"# Approve {summary['model']} v{summary['version']} as champion?",
        "",
        f"- candidate: `{summary.get('candidate')}`, current champion: "
        f"v{summary.get('champion') or '-'}",
        f"- TSR {summary.get('tsr')} (95% CI {summary.get('tsr_ci')}), "
        f"steps {summary.get('steps_mean')}, cost/task ${summary.get('cost_per_task_usd')}",
        f"- gate: **{summary.get('verdict')}**",
        "",
        *[f"  - {reason}" for reason in summary.get("reasons", [])],
    ]
    return "\n".join(lines)


@task(name="review-version", cache_policy=NO_CACHE)
def review_version(params_file: str, model: str | None, version: str) -> dict[str, Any]:
    """The version's verdict and metrics, and why it may not be approved (if so)."""
    from tracetune.registry.approval import promotable_problem
    from tracetune.registry.client import (
        CHAMPION,
        EVAL_TAG,
        GATE_REASONS,
        GATE_VERDICT,
        json_tag,
        open_registry,
    )

    params = load_params(params_file)
    registry = open_registry(params.tracking, model, params.registry.lock_timeout_s)
    mv = registry.version(version)
    tags = mv.tags or {}
    block = json_tag(tags, EVAL_TAG, {}) or {}
    return {
        "model": registry.name,
        "version": str(mv.version),
        "candidate": tags.get("tracetune.candidate"),
        "champion": registry.alias(CHAMPION),
        "verdict": tags.get(GATE_VERDICT),
        "reasons": json_tag(tags, GATE_REASONS, []),
        "tsr": block.get("tsr"),
        "tsr_ci": [block.get("tsr_ci_low"), block.get("tsr_ci_high")],
        "steps_mean": block.get("steps_mean"),
        "cost_per_task_usd": block.get("cost_per_task_usd"),
        "problem": promotable_problem(mv),
    }


@task(name="record-decision", cache_policy=NO_CACHE)
def record_decision(
    params_file: str, model: str | None, version: str, decision: str, by: str, note: str
) -> dict[str, Any]:
    """approve | reject | expire, through the registry's locked operations."""
    from tracetune.registry.approval import approve, expire, reject
    from tracetune.registry.client import open_registry

    params = load_params(params_file)
    registry = open_registry(params.tracking, model, params.registry.lock_timeout_s)
    if decision == "approve":
        result = approve(registry, version, by, note)
    elif decision == "reject":
        result = reject(registry, version, by, note)
    else:
        result = expire(registry, version, note)
    return result.as_dict()


@flow(name="approval", log_prints=True)
def approval(
    version: str | None = None,
    model: str | None = None,
    params_file: str = "params.yaml",
    timeout_s: int | None = None,
    poll_interval_s: int = 10,
) -> dict[str, Any]:
    """Pause for a reviewer's decision on `version` (default: the last registered one)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    logger = get_run_logger()
    params = load_params(params_file)
    version = version or registered_version(params)
    summary = review_version(params_file, model, version)
    if summary["problem"]:
        logger.warning("not asking for approval: %s", summary["problem"])
        return {"action": "refused", "version": version, "message": summary["problem"]}
    if params.registry.auto_approve:
        logger.warning("registry.auto_approve is on: approving without a human")
        note = "registry.auto_approve is on (non-production)"
        return record_decision(params_file, model, version, "approve", AUTO_APPROVER, note)
    markdown = review_markdown(summary)
    description = f"{summary['model']} v{version} awaits approval"
    create_markdown_artifact(markdown=markdown, key="approval-request", description=description)
    timeout = int(timeout_s or params.registry.approval_timeout_s)
    form = ApprovalInput.with_initial_data(description=markdown, approve=False, by="", note="")
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout, poll_interval=poll_interval_s)
    except FlowPauseTimeout:
        note = f"no decision within {timeout} s"
        logger.warning("%s v%s: %s", summary["model"], version, note)
        return record_decision(params_file, model, version, "expire", "", note)
    decision = "approve" if answer.approve else "reject"
    logger.info("%s by %s: %s", decision, answer.by, answer.note)
    return record_decision(params_file, model, version, decision, answer.by, answer.note)


if __name__ == "__main__":
    approval()
