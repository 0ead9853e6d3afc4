"""The promotion gate's verdict, where a Prefect user looks: an artifact, a tag, a task state.

Why: the register stage judges the candidate and writes `metrics/register.json`, but a stage is
a subprocess, so a refusal reached Prefect only as a line of the stage's log inside a green run.
After the register stage, the flow publishes the verdict as the `gate-verdict` markdown artifact
(each check with its value, bound and reason, and what to do next), tags the flow run
`gate:passed` or `gate:refused`, and a refused version's `promote` task ends Cancelled, named
`Refused`, with the failed checks as its message. The flow run itself then ends Completed, named
`Refused` (the pipeline did its work; the model did not earn promotion): see docs/registry.md.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

ARTIFACT_KEY = "gate-verdict"
PASSED_TAG, REFUSED_TAG = "gate:passed", "gate:refused"
REFUSED = "Refused"  # the state name of a refused version's promote task and of the flow run


def passed(registered: dict[str, Any]) -> bool:
    return registered.get("verdict") == "passed"


def gate_tag(registered: dict[str, Any]) -> str:
    return PASSED_TAG if passed(registered) else REFUSED_TAG


def param_of(check: str) -> str:
    """The params.yaml key that sets a check's bound."""
    if check == "champion_non_inferiority":
        return "registry.gate.champion_non_inferiority_margin"
    if check.startswith("margin_vs_"):
        return f"registry.gate.min_{check}"
    return f"registry.gate.{check}"


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, int | float):
        return f"{value:.4g}"
    return str(value)


def checks_table(registered: dict[str, Any]) -> str:
    """One row per check (failures first), from the checks or, for a version registered before
    checks were recorded, from the reason lines (which carry value and bound in words)."""
    checks = registered.get("checks") or []
    if checks:
        rows = sorted(checks, key=lambda c: bool(c.get("passed")))
        lines = [
            "| check | result | value | bound | reason | set by |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c.get('name')} | {'pass' if c.get('passed') else '**FAIL**'} "
            f"| {_number(c.get('observed'))} | {_number(c.get('threshold'))} "
            f"| {str(c.get('reason', '')).replace('|', '/')} | `{param_of(str(c.get('name')))}` |"
            for c in rows
        ]
        return "\n".join(lines)
    reasons = [str(r) for r in registered.get("reasons") or []]
    return "\n".join(f"- {r}" for r in reasons) or "_no checks recorded_"


def next_steps(registered: dict[str, Any], report: str = "") -> list[str]:
    """What the reader can do now, in the order they would do it."""
    model, version = registered.get("model", "?"), registered.get("version", "?")
    if passed(registered):
        if registered.get("auto_approved"):
            return [f"v{version} is champion already (`registry.auto_approve`, non-production)."]
        return [
            f"v{version} is `challenger`; the `promote` task shows how it meets its reviewer.",
            f"Approve it: `tracetune approve {model} {version} --by NAME --note WHY` "
            f"(or `tracetune reject ...`); `tracetune registry status` shows every version.",
        ]
    failed = ", ".join(f"`{param_of(f)}`" for f in registered.get("failed") or []) or "-"
    return [
        f"v{version} stays registered for the record; it is not challenger and cannot be "
        "approved. The champion is unchanged.",
        f"Read why tasks fail: `{report or registered.get('candidate')}` (the evaluation "
        "report) and the `eval-comparison` artifact of this run.",
        "Improve the candidate (more or better data, more SFT steps, RLVR) and run again: "
        "`tracetune run`.",
        f"If a bound is wrong for this environment, change it in params.yaml ({failed}) as a "
        "reviewed change; the verdict is recomputed only for a new registration.",
    ]


def verdict_markdown(registered: dict[str, Any], report: str = "") -> str:
    """The `gate-verdict` artifact: verdict, version, each check, what next."""
    model, version = registered.get("model", "?"), registered.get("version", "?")
    word = "PASSED" if passed(registered) else "REFUSED"
    reused = " (the same model and evaluation as an earlier run: no new version)"
    reused = reused if registered.get("reused") else ""
    lines = [
        f"# Promotion gate {word}: {model} v{version}",
        "",
        f"- candidate: `{registered.get('candidate', '?')}`, "
        f"model: `{registered.get('model_uri', '?')}`"
        + (reused if registered.get("reused") else ""),
        f"- champion now: v{registered.get('champion') or '-'}, "
        f"challenger: {'yes' if registered.get('challenger') else 'no'}",
        "",
        "## Checks",
        "",
        checks_table(registered),
        "",
        "## What next",
        "",
        *[f"{i}. {step}" for i, step in enumerate(next_steps(registered, report), 1)],
        "",
    ]
    return "\n".join(lines)


def refusal_message(registered: dict[str, Any]) -> str:
    """The refused state's message: the version and the reason of each failed check."""
    failed = [str(r) for r in registered.get("reasons") or [] if str(r).startswith("FAIL")]
    head = f"{registered.get('model', '?')} v{registered.get('version', '?')} refused by the gate"
    return f"{head}: " + "; ".join(r.removeprefix("FAIL ") for r in failed) if failed else head


# --- Prefect side -------------------------------------------------------------------------------


def tag_flow_run(tag: str) -> None:
    """Add `tag` to the current flow run (Prefect 3 has no helper; tags are replaced whole)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(run_id).tags  # type: ignore[arg-type]
        if tag not in current:
            client.update_flow_run(run_id, tags=[*current, tag])  # type: ignore[arg-type]


def publish_verdict(registered: dict[str, Any], report: str = "") -> str:
    """The `gate-verdict` artifact and the flow run's gate tag; returns the tag."""
    from prefect.artifacts import create_markdown_artifact

    tag = gate_tag(registered)
    create_markdown_artifact(
        markdown=verdict_markdown(registered, report),
        key=ARTIFACT_KEY,
        description=f"{registered.get('model')} v{registered.get('version')}: {tag}",
    )
    tag_flow_run(tag)
    return tag


@task(name="promote", task_run_name="promote v{version}", cache_policy=NO_CACHE)
def refuse_promotion(version: str, message: str) -> Any:
    """Ends Cancelled, named Refused: the UI shows that promotion did not happen, and why."""
    from prefect import get_run_logger
    from prefect.states import Cancelled

    get_run_logger().warning(message)
    return Cancelled(name=REFUSED, message=message, data=message)
