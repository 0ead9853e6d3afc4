"""The approval flow: a registered challenger waits for a human before it becomes champion.

The flow pauses with `pause_flow_run(wait_for_input=ApprovalInput)`: the Prefect UI shows the
version's gate verdict and metrics (a markdown artifact) and a form (decision, by, note), every
field required and none pre-filled, so the form as first shown cannot be submitted and no click
decides by accident. A submission the flow still cannot use (a blank name) is logged and the flow
pauses again for the time left. The answer resumes the flow, which approves or rejects through
`tracetune.registry.approval` (the same code as `tracetune approve/reject`, so the same checks
and the same lock), and the `approval-request` artifact then shows the decision. Nobody
answering within `registry.approval_timeout_s` records an `expired` decision on the version and
leaves the champion where it is. `registry.auto_approve` (non-production only) skips the pause.

Resume from code or a script: `prefect.flow_runs.resume_flow_run(id,
run_input={"decision": "approve", "by": "ana", "note": "ok"})`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput
from pydantic import Field

from tracetune.config import Params, load_params

AUTO_APPROVER = "auto-approve"


class ApprovalInput(RunInput):
    """The reviewer's answer (the form the Prefect UI shows while the flow is paused).

    No field has a default: Prefect builds the form's JSON schema from this model, and its
    server rejects a resume whose input misses a required field, so the flow keeps waiting
    instead of failing after the request was consumed."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: make this version champion; reject: keep the current champion"
    )
    by: str = Field(min_length=1, description="your name (stored on the model version)")
    note: str = Field(min_length=1, description="why (stored on the model version)")


def answer_problem(answer: ApprovalInput) -> str | None:
    """What makes a submission unusable although it passed the schema (blank text)."""
    if not answer.by.strip():
        return "the reviewer's name is blank"
    if not answer.note.strip():
        return "the note is blank"
    return None


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


def decision_markdown(summary: dict[str, Any], outcome: dict[str, Any]) -> str:
    """The request, closed: what was decided, by whom, and where the champion is now."""
    action = outcome.get("action", "?")
    who = f" by {outcome['by']}" if outcome.get("by") else ""
    lines = [
        f"# {summary['model']} v{summary['version']}: {action}{who}",
        "",
        f"- note: {outcome.get('note') or '-'}",
        f"- champion now: v{outcome.get('champion') or '-'}",
        "",
        "---",
        "",
        review_markdown(summary).replace("# Approve", "## Request was: approve", 1),
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
    answer = wait_for_answer(markdown, timeout, poll_interval_s)
    if answer is None:
        note = f"no decision within {timeout} s"
        logger.warning("%s v%s: %s", summary["model"], version, note)
        outcome = record_decision(params_file, model, version, "expire", "", note)
    else:
        logger.info("%s by %s: %s", answer.decision, answer.by, answer.note)
        outcome = record_decision(
            params_file, model, version, answer.decision, answer.by.strip(), answer.note.strip()
        )
    create_markdown_artifact(
        markdown=decision_markdown(summary, outcome),
        key="approval-request",
        description=f"{summary['model']} v{version}: {outcome.get('action')}",
    )
    return outcome


def wait_for_answer(markdown: str, timeout_s: int, poll_interval_s: int) -> ApprovalInput | None:
    """Pause until a usable answer arrives; None when the time runs out. An unusable one is
    logged and the flow pauses again for the time left (the request is not lost)."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from pydantic import ValidationError

    logger = get_run_logger()
    form = ApprovalInput.with_initial_data(description=markdown)
    deadline = time.monotonic() + timeout_s
    while (left := int(deadline - time.monotonic())) > 0:
        try:
            answer = pause_flow_run(
                wait_for_input=form, timeout=left, poll_interval=poll_interval_s
            )
        except FlowPauseTimeout:
            return None
        except ValidationError as exc:
            logger.warning("submission not usable, asking again: %s", exc.errors()[0]["msg"])
            continue
        problem = answer_problem(answer)
        if problem is None:
            return answer
        logger.warning("submission not usable (%s), asking again", problem)
    return None


if __name__ == "__main__":
    approval()
