"""The promotion gate: pure functions from evaluation metrics and params to a verdict.

Why pure: the verdict is stored on the model version and must be reproducible from its inputs
(the eval file, the gate params, the champion's stored metrics), and it must be testable without
a registry. Every check yields one readable line, passed or not, so that the version's tags say
*why* it passed or failed.

Confidence intervals (`use_confidence_intervals`): a TSR floor is checked against the lower 95%
bound of the candidate's TSR; a comparison with a baseline or the champion uses Newcombe's
hybrid score interval for the difference of two proportions, which is built from the two arms'
own (Wilson) intervals, the very numbers the evaluation writes. The arms share their tasks, so
treating them as independent makes the interval a little wider than a paired one: the gate errs
on the side of not promoting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from tracetune.config import GateParams

Z95 = 1.959963984540054
CANDIDATE, PROMPT_ONLY, PRODUCTION, CHAMPION = (
    "candidate",
    "baseline_prompt_only",
    "baseline_production",
    "champion",
)
FLOOR = "baseline_floor"  # doing nothing: answer at once, no tool (absent in older eval files)


class EvalMetricsError(ValueError):
    """The evaluation file lacks what the gate needs (a malformed or foreign file)."""


@dataclass(frozen=True)
class Rate:
    """A success rate with its 95% interval over `n` tasks."""

    p: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Check:
    """One gate rule: what was observed, the threshold, and a line saying why."""

    name: str
    passed: bool
    observed: float | None
    threshold: float | None
    reason: str


@dataclass(frozen=True)
class Verdict:
    """The gate's decision; `reasons` has one line per check, failures first."""

    passed: bool
    checks: tuple[Check, ...]
    champion_version: str | None = None

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    @property
    def reasons(self) -> list[str]:
        ordered = sorted(self.checks, key=lambda c: c.passed)
        return [("PASS " if c.passed else "FAIL ") + c.reason for c in ordered]

    @property
    def label(self) -> str:
        return "passed" if self.passed else "failed"

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.label,
            "failed": self.failed,
            "reasons": self.reasons,
            "champion_version": self.champion_version,
            "checks": [asdict(c) for c in self.checks],
        }


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval; used only when an arm carries no interval of its own."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _number(arm: Mapping[str, Any], key: str, where: str) -> float:
    value = arm.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise EvalMetricsError(f"{where}.{key} is missing or not a number: {value!r}")
    return float(value)


def rate_of(arm: Mapping[str, Any], where: str = "arm") -> Rate:
    """An arm's TSR and interval; an absent interval is recomputed from `n` (Wilson)."""
    p = _number(arm, "tsr", where)
    n = int(_number(arm, "n", where))
    if isinstance(arm.get("tsr_ci_low"), int | float) and isinstance(
        arm.get("tsr_ci_high"), int | float
    ):
        low, high = float(arm["tsr_ci_low"]), float(arm["tsr_ci_high"])
    else:
        low, high = wilson(p, n)
    return Rate(p=p, low=min(low, p), high=max(high, p), n=n)


def diff_interval(a: Rate, b: Rate) -> tuple[float, float, float]:
    """(a - b, lower, upper): Newcombe's hybrid score interval from the arms' intervals."""
    d = a.p - b.p
    lower = d - math.hypot(a.p - a.low, b.high - b.p)
    upper = d + math.hypot(a.high - a.p, b.p - b.low)
    return d, lower, upper


def validate_eval(metrics: Mapping[str, Any]) -> None:
    """Fail early, naming the key, when an eval file cannot be judged."""
    for arm in (CANDIDATE, PROMPT_ONLY, PRODUCTION):
        block = metrics.get(arm)
        if not isinstance(block, Mapping):
            raise EvalMetricsError(f"eval metrics lack the '{arm}' block")
        rate_of(block, arm)
        for key in ("steps_mean", "cost_per_task_usd"):
            _number(block, key, arm)


def _floor_check(name: str, value: float, floor: float, what: str) -> Check:
    ok = value >= floor
    return Check(name, ok, value, floor, f"{what} {value:.3f} {'>=' if ok else '<'} {floor:.3f}")


def _ceiling_check(name: str, value: float, ceiling: float, what: str, fmt: str) -> Check:
    ok = value <= ceiling
    sign = "<=" if ok else ">"
    return Check(name, ok, value, ceiling, f"{what} {value:{fmt}} {sign} max {ceiling:{fmt}}")


def tsr_floor(candidate: Rate, params: GateParams) -> Check:
    if params.use_confidence_intervals:
        return _floor_check("min_tsr", candidate.low, params.min_tsr, "TSR lower 95% bound")
    return _floor_check("min_tsr", candidate.p, params.min_tsr, "TSR")


def margin_check(
    name: str, candidate: Rate, other: Rate, margin: float, label: str, ci: bool
) -> Check:
    """Superiority by `margin` (negative: non-inferiority) over another arm."""
    d, lower, _ = diff_interval(candidate, other)
    observed = lower if ci else d
    ok = observed >= margin
    what = f"TSR gain vs {label}" + (" (lower 95% bound)" if ci else "")
    detail = f" [{candidate.p:.3f} vs {other.p:.3f}, diff {d:+.3f}]"
    sign = ">=" if ok else "<"
    return Check(name, ok, observed, margin, f"{what} {observed:+.3f} {sign} {margin:+.3f}{detail}")


def champion_check(
    candidate: Rate, champion: Rate | None, champion_version: str | None, params: GateParams
) -> Check:
    """Non-inferiority: the candidate may trail the champion by at most the margin."""
    if champion is None:
        return Check("champion_non_inferiority", True, None, None, "no current champion")
    check = margin_check(
        "champion_non_inferiority",
        candidate,
        champion,
        -params.champion_non_inferiority_margin,
        f"champion v{champion_version}" if champion_version else "champion",
        params.use_confidence_intervals,
    )
    return check


def floor_check(metrics: Mapping[str, Any], candidate: Rate, params: GateParams) -> Check:
    """The candidate must beat doing nothing: a gain the task set gives away is no gain."""
    block = metrics.get(FLOOR)
    if not isinstance(block, Mapping):
        return Check("margin_vs_floor", True, None, None, "no do-nothing floor measured")
    floor = rate_of(block, FLOOR)
    ci = params.use_confidence_intervals
    return margin_check(
        "margin_vs_floor", candidate, floor, params.min_margin_vs_floor, "doing nothing", ci
    )


def evaluate_gate(
    metrics: Mapping[str, Any],
    params: GateParams,
    champion: Mapping[str, Any] | None = None,
    champion_version: str | None = None,
) -> Verdict:
    """Judge an eval file (the `metrics/eval_<model>.json` shape) against the gate params.

    `champion` is the champion's candidate block: the eval file's own `champion` block when the
    evaluation ran the champion on the same tasks, else its metrics stored at registration.
    """
    validate_eval(metrics)
    cand = rate_of(metrics[CANDIDATE], CANDIDATE)
    ci = params.use_confidence_intervals
    block = metrics[CANDIDATE]
    if isinstance(metrics.get(CHAMPION), Mapping):
        champion = metrics[CHAMPION]
    champ = rate_of(champion, CHAMPION) if champion else None
    checks = (
        tsr_floor(cand, params),
        _ceiling_check(
            "max_steps_per_task",
            _number(block, "steps_mean", CANDIDATE),
            params.max_steps_per_task,
            "mean steps",
            ".2f",
        ),
        _ceiling_check(
            "max_cost_per_task_usd",
            _number(block, "cost_per_task_usd", CANDIDATE),
            params.max_cost_per_task_usd,
            "cost per task $",
            ".5f",
        ),
        margin_check(
            "margin_vs_prompt_only",
            cand,
            rate_of(metrics[PROMPT_ONLY], PROMPT_ONLY),
            params.min_margin_vs_prompt_only,
            "prompt-only",
            ci,
        ),
        margin_check(
            "margin_vs_production",
            cand,
            rate_of(metrics[PRODUCTION], PRODUCTION),
            params.min_margin_vs_production,
            "production",
            ci,
        ),
        floor_check(metrics, cand, params),
        champion_check(cand, champ, champion_version, params),
    )
    return Verdict(all(c.passed for c in checks), checks, champion_version)
