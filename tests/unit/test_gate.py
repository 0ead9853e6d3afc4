"""The promotion gate: each rule, the confidence-interval logic, and the verdict's reasons."""

from __future__ import annotations

import math
from typing import Any

import pytest

from tracetune.config import GateParams
from tracetune.registry.gate import (
    EvalMetricsError,
    Rate,
    diff_interval,
    evaluate_gate,
    rate_of,
    wilson,
)


def arm(tsr: float, n: int = 200, steps: float = 3.0, cost: float = 0.001) -> dict[str, Any]:
    low, high = wilson(tsr, n)
    return {
        "tsr": tsr,
        "tsr_ci_low": low,
        "tsr_ci_high": high,
        "n": n,
        "steps_mean": steps,
        "steps_median": steps,
        "tokens_in": 900,
        "tokens_out": 60,
        "cost_per_task_usd": cost,
        "latency_s": 0.1,
        "per_family": {},
        "failures": {},
    }


def metrics(
    tsr: float = 0.85, prompt: float = 0.1, prod: float = 0.73, n: int = 200, **kw: Any
) -> dict[str, Any]:
    return {
        "model": "sft",
        "model_path": "models/sft",
        "n_tasks": n,
        "candidate": arm(tsr, n, **kw),
        "baseline_prompt_only": arm(prompt, n),
        "baseline_production": arm(prod, n),
        "delta": {},
    }


GATE = GateParams()


def test_a_clear_winner_passes_every_check_with_a_reason_each() -> None:
    verdict = evaluate_gate(metrics(), GATE)
    assert verdict.passed and verdict.label == "passed" and verdict.failed == []
    assert len(verdict.reasons) == 7
    assert all(r.startswith("PASS ") for r in verdict.reasons)
    assert "no current champion" in verdict.reasons[-1]
    assert "PASS no do-nothing floor measured" in verdict.reasons  # an eval file from before


def test_a_gain_that_doing_nothing_also_gets_is_no_gain() -> None:
    """Candidate 0.85 against prompt-only 0.10: a winner, until the floor shows that doing
    nothing scores 0.83 on these tasks (issue 19: the whole gain was tasks solved by no-ops)."""
    honest = metrics() | {"baseline_floor": arm(0.0)}
    assert evaluate_gate(honest, GATE).passed
    flattered = metrics() | {"baseline_floor": arm(0.83)}
    verdict = evaluate_gate(flattered, GATE)
    assert verdict.failed == ["margin_vs_floor"]
    assert any(r.startswith("FAIL TSR gain vs doing nothing") for r in verdict.reasons)


@pytest.mark.parametrize(
    ("kwargs", "failed"),
    [
        ({"tsr": 0.45, "prod": 0.3}, "min_tsr"),
        ({"steps": 12.0}, "max_steps_per_task"),
        ({"cost": 0.02}, "max_cost_per_task_usd"),
        ({"prompt": 0.84}, "margin_vs_prompt_only"),
        ({"prod": 0.9}, "margin_vs_production"),
    ],
)
def test_each_rule_can_fail_alone(kwargs: dict[str, Any], failed: str) -> None:
    verdict = evaluate_gate(metrics(**kwargs), GATE)
    assert not verdict.passed
    assert verdict.failed == [failed]
    assert verdict.reasons[0].startswith("FAIL ")  # failures are listed first


def test_confidence_intervals_make_a_small_lucky_eval_fail() -> None:
    """10/10 beats production (0.73) by point estimate, not by the lower bound of the gain."""
    small = metrics(tsr=1.0, n=10)
    assert evaluate_gate(small, GATE.model_copy(update={"use_confidence_intervals": False})).passed
    verdict = evaluate_gate(small, GATE)
    assert "margin_vs_production" in verdict.failed


def test_champion_non_inferiority_uses_the_margin() -> None:
    champion = arm(0.90)
    slightly_worse = evaluate_gate(metrics(tsr=0.88), GATE, champion, "3")
    assert slightly_worse.passed and slightly_worse.champion_version == "3"
    much_worse = evaluate_gate(metrics(tsr=0.80, prod=0.5), GATE, champion, "3")
    assert much_worse.failed == ["champion_non_inferiority"]
    assert "champion v3" in much_worse.reasons[0]


def test_the_eval_files_own_champion_arm_wins_over_stored_metrics() -> None:
    """An evaluation that ran the champion on the same tasks is the better comparison."""
    m = metrics(tsr=0.85) | {"champion": arm(0.99, 200)}
    verdict = evaluate_gate(m, GATE, arm(0.5), "2")
    assert verdict.failed == ["champion_non_inferiority"]


def test_missing_blocks_and_values_are_named() -> None:
    with pytest.raises(EvalMetricsError, match="baseline_production"):
        evaluate_gate({"candidate": arm(0.8), "baseline_prompt_only": arm(0.1)}, GATE)
    bad = metrics()
    bad["candidate"]["tsr"] = None
    with pytest.raises(EvalMetricsError, match=r"candidate\.tsr"):
        evaluate_gate(bad, GATE)


def test_rate_without_interval_is_computed_from_n() -> None:
    rate = rate_of({"tsr": 0.5, "n": 100})
    low, high = wilson(0.5, 100)
    assert (rate.low, rate.high) == (low, high)
    assert 0.40 < low < 0.41 and 0.59 < high < 0.60


def test_newcombe_difference_interval() -> None:
    """Newcombe (1998) example: 56/70 vs 48/80 -> diff 0.2, 95% CI about (0.0524, 0.3339)."""
    a_low, a_high = wilson(56 / 70, 70)
    b_low, b_high = wilson(48 / 80, 80)
    d, low, high = diff_interval(Rate(0.8, a_low, a_high, 70), Rate(0.6, b_low, b_high, 80))
    assert math.isclose(d, 0.2)
    assert low == pytest.approx(0.0524, abs=5e-4)
    assert high == pytest.approx(0.3339, abs=5e-4)


def test_verdict_as_dict_is_json_ready() -> None:
    import json

    payload = evaluate_gate(metrics(steps=20), GATE).as_dict()
    assert json.loads(json.dumps(payload))["verdict"] == "failed"
    assert payload["failed"] == ["max_steps_per_task"]
