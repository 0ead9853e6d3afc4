"""Metrics of a set of trajectories: TSR with its Wilson interval, steps, tokens, cost, latency.

Everything here is a pure function of `Trajectory` records, so the candidate's rollouts, the
prompt-only baseline's cached rollouts and the production logs are measured by the same code.
The block one arm gets (`summarize`) is the `M` of `metrics/eval_<model>.json`:

    tsr, tsr_ci_low, tsr_ci_high, n          task success rate and its 95% Wilson interval
    steps_mean, steps_median                  assistant turns per task
    tokens_in, tokens_out                     prompt / completion tokens per task (mean)
    cost_per_task_usd                         mean cost per task at the arm's prices
    latency_s                                 mean wall time per task
    per_family {family: {tsr, n}}
    failures {label: count}                   failure taxonomy of the failed tasks
    cut_by_turn_limit                         episodes the turn limit ended (rollout arms)

Why Wilson and not the normal interval: held-out sets are small (a few hundred tasks, tens per
family) and TSRs sit near 0 or 1 for weak or strong models, where the normal interval leaves
[0, 1] and covers badly; Wilson stays inside and keeps its coverage.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from tracetune.agent.rollout import (
    BAD_ARGUMENTS,
    BAD_FORMAT,
    FAILURE_LABELS,
    FORMAT_FEEDBACK,
    STEP_CAP,
    UNKNOWN_TOOL,
    failure_label,
)
from tracetune.config import Pricing
from tracetune.trajectories.schema import Message, Trajectory
from tracetune.trajectories.simulator import cost_usd

Z95 = 1.959963984540054
ROUND = 6

# Tool-error texts of `Environment.step` (environments/base.py) -> step error kinds.
_TOOL_ERROR_KINDS = (
    ("unknown tool", UNKNOWN_TOOL),
    ("invalid arguments", BAD_ARGUMENTS),
    ("arguments are not valid json", BAD_ARGUMENTS),
    ("arguments must be a json object", BAD_ARGUMENTS),
    ("step cap reached", STEP_CAP),
)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) when there is no data."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    high = 1.0 if successes >= n else min(1.0, centre + half)
    return low, high


def newcombe_interval(
    s1: int, n1: int, s2: int, n2: int, z: float = Z95
) -> tuple[float, float, float]:
    """Difference p1 - p2 and its 95% interval (Newcombe's hybrid score, method 10).

    Built from the two arms' Wilson intervals, so it agrees with the per-arm numbers in the
    report. The arms share tasks; treating them as independent gives a slightly wider interval
    than a paired one, which errs on the side of "no proven difference".
    """
    if n1 <= 0 or n2 <= 0:
        return math.nan, -1.0, 1.0
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = wilson_interval(s1, n1, z)
    l2, u2 = wilson_interval(s2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, max(-1.0, low), min(1.0, high)


def tool_error_kind(content: str | None) -> str | None:
    """The step error a tool message reports (`{"error": ...}`), or None when it succeeded."""
    if not content or not content.lstrip().startswith("{"):
        return None
    try:
        payload = json.loads(content)
    except ValueError:
        return None
    if not isinstance(payload, dict) or "error" not in payload or len(payload) != 1:
        return None
    text = str(payload["error"]).lower()
    return next(
        (kind for prefix, kind in _TOOL_ERROR_KINDS if text.startswith(prefix)), "tool_error"
    )


def step_errors(messages: Sequence[Message]) -> list[str]:
    """Failed steps, in order, read back from the messages (logs carry no step labels)."""
    errors: list[str] = []
    for i, message in enumerate(messages):
        if message.role == "tool":
            kind = tool_error_kind(message.content)
            if kind is not None:
                errors.append(kind)
        elif (
            message.role == "user" and i > 1 and (message.content or "").startswith(FORMAT_FEEDBACK)
        ):
            errors.append(BAD_FORMAT)
    return errors


def classify_failure(trajectory: Trajectory) -> str | None:
    """The failure label of a trajectory: its own `failure` when set (rollouts), else read from
    the messages with the same rules the rollout engine applies (`failure_label`)."""
    if trajectory.success:
        return None
    if trajectory.failure:
        return trajectory.failure
    last = trajectory.messages[-1]
    answered = last.role == "assistant" and not last.tool_calls
    return failure_label(
        False, "answer" if answered else STEP_CAP, step_errors(trajectory.messages)
    )


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), ROUND) if values else None


def _cost(trajectory: Trajectory, pricing: Pricing | None) -> float:
    """Cost at `pricing` from the recorded token usage, or the logged cost without prices."""
    if pricing is None:
        return trajectory.cost_usd
    usage = trajectory.usage
    return cost_usd(usage.prompt_tokens, usage.completion_tokens, pricing)


def cut_by_turn_limit(
    trajectory: Trajectory, max_turns: int, terminating: frozenset[str] = frozenset()
) -> bool:
    """The loop's turn limit ended the episode: it has `max_turns` assistant turns, the last
    of them not a final answer, and the environment did not end it (no step-cap error, no
    successful call to one of the `terminating` tools)."""
    if trajectory.steps < max_turns or not trajectory.messages:
        return False
    last = trajectory.messages[-1]
    if last.role == "assistant" and not last.tool_calls:
        return False  # answered on the last turn
    if last.role != "tool":
        return True  # a malformed last turn
    if tool_error_kind(last.content) == STEP_CAP:
        return False
    called = [m for m in trajectory.messages if m.role == "assistant" and m.tool_calls]
    names = {c.function.name for c in called[-1].tool_calls or ()} if called else set()
    return not (names & terminating and tool_error_kind(last.content) is None)


def summarize(
    trajectories: Sequence[Trajectory],
    pricing: Pricing | None = None,
    tokens: bool = True,
    max_turns: int | None = None,
    terminating: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """One arm's metrics block (`M`). `pricing` re-prices from token usage (else logged cost);
    `tokens=False` leaves out token fields (logs that never recorded usage); `max_turns`, the
    turn limit the arm ran under, adds `cut_by_turn_limit` (how many episodes it cut;
    `terminating`: the environment's terminating tools, whose call is not a cut)."""
    n = len(trajectories)
    wins = sum(t.success for t in trajectories)
    low, high = wilson_interval(wins, n)
    steps = [t.steps for t in trajectories]
    block: dict[str, Any] = {
        "tsr": round(wins / n, ROUND) if n else None,
        "tsr_ci_low": round(low, ROUND),
        "tsr_ci_high": round(high, ROUND),
        "n": n,
        "steps_mean": _mean(steps),
        "steps_median": float(statistics.median(steps)) if steps else None,
    }
    if tokens:
        block["tokens_in"] = _mean([t.usage.prompt_tokens for t in trajectories])
        block["tokens_out"] = _mean([t.usage.completion_tokens for t in trajectories])
    cost = _mean([_cost(t, pricing) for t in trajectories])
    block["cost_per_task_usd"] = round(cost, 8) if cost is not None else None
    block["latency_s"] = _mean([t.latency_s for t in trajectories])
    block["per_family"] = per_family(trajectories)
    block["failures"] = failure_counts(trajectories)
    if max_turns is not None:
        block["cut_by_turn_limit"] = sum(
            cut_by_turn_limit(t, max_turns, terminating) for t in trajectories
        )
    return block


def per_family(trajectories: Sequence[Trajectory]) -> dict[str, dict[str, Any]]:
    """TSR and count per task family, families sorted by name."""
    total: Counter[str] = Counter()
    wins: Counter[str] = Counter()
    for t in trajectories:
        total[t.family] += 1
        wins[t.family] += int(t.success)
    return {
        family: {"tsr": round(wins[family] / total[family], ROUND), "n": total[family]}
        for family in sorted(total)
    }


def failure_counts(trajectories: Sequence[Trajectory]) -> dict[str, int]:
    """Failed tasks per taxonomy label; every label is present (stable keys for metrics diffs)."""
    counts: dict[str, int] = dict.fromkeys(FAILURE_LABELS, 0)
    for t in trajectories:
        label = classify_failure(t)
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
    return counts


def _sub(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return round(float(a) - float(b), 8)
    return None


def deltas(
    candidate: Mapping[str, Any],
    prompt_only: Mapping[str, Any],
    production: Mapping[str, Any],
    floor: Mapping[str, Any] | None = None,
) -> dict[str, float | None]:
    """Candidate minus baseline; positive TSR deltas and negative step/cost deltas are good.
    With a `floor` block: each arm's TSR over the floor too (what it adds to doing nothing)."""
    over_floor = {}
    if floor is not None:
        over_floor = {
            "tsr_vs_floor": _sub(candidate.get("tsr"), floor.get("tsr")),
            "prompt_only_tsr_vs_floor": _sub(prompt_only.get("tsr"), floor.get("tsr")),
            "production_tsr_vs_floor": _sub(production.get("tsr"), floor.get("tsr")),
        }
    return {
        "tsr_vs_prompt_only": _sub(candidate.get("tsr"), prompt_only.get("tsr")),
        "tsr_vs_production": _sub(candidate.get("tsr"), production.get("tsr")),
        "steps_vs_production": _sub(candidate.get("steps_mean"), production.get("steps_mean")),
        "cost_vs_production": _sub(
            candidate.get("cost_per_task_usd"), production.get("cost_per_task_usd")
        ),
        **over_floor,
    }


def tsr_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, float, float]:
    """TSR difference a - b with its Newcombe 95% interval, from two `M` blocks."""
    s1 = round((a.get("tsr") or 0.0) * a.get("n", 0))
    s2 = round((b.get("tsr") or 0.0) * b.get("n", 0))
    return newcombe_interval(s1, int(a.get("n", 0)), s2, int(b.get("n", 0)))


def flatten(payload: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves as `a.b.c` keys (MLflow metrics); None and strings are left out."""
    out: dict[str, float] = {}
    for key, value in payload.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        elif isinstance(value, bool) or (isinstance(value, int | float) and not math.isnan(value)):
            out[name] = float(value)
    return out


def group_by_family(trajectories: Sequence[Trajectory]) -> dict[str, list[Trajectory]]:
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajectories:
        groups[t.family].append(t)
    return dict(groups)
