"""Evaluation metrics on hand-made trajectories: TSR, Wilson/Newcombe intervals, steps, cost,
tokens, per-family rates and the failure taxonomy (from labels and from raw log messages)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tracetune.agent.rollout import FORMAT_FEEDBACK
from tracetune.config import Pricing
from tracetune.evaluation.metrics import (
    classify_failure,
    deltas,
    failure_counts,
    flatten,
    newcombe_interval,
    summarize,
    tool_error_kind,
    wilson_interval,
)
from tracetune.evaluation.report import render_report
from tracetune.trajectories.schema import Trajectory

SYSTEM = {"role": "system", "content": "sys"}
USER = {"role": "user", "content": "What is the status of order O-1?"}


def call(name: str, args: str = "{}", cid: str = "c1") -> dict[str, Any]:
    fn = {"name": name, "arguments": args}
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": cid, "type": "function", "function": fn}]}  # fmt: skip


def tool(content: Any, cid: str = "c1") -> dict[str, Any]:
    text = content if isinstance(content, str) else json.dumps(content)
    return {"role": "tool", "tool_call_id": cid, "content": text}


def answer(text: str = "It is shipped.") -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def traj(
    success: bool,
    messages: list[dict[str, Any]] | None = None,
    family: str = "order_status",
    tokens: tuple[int, int] = (100, 10),
    cost: float = 0.001,
    latency: float = 1.0,
    failure: str | None = None,
) -> Trajectory:
    msgs = messages or [SYSTEM, USER, call("get_order"), tool({"status": "shipped"}), answer()]
    return Trajectory(
        trajectory_id=f"t{id(msgs)}",
        task_id="order_status:O-1:0",
        family=family,
        timestamp=datetime(2026, 11, 1, tzinfo=UTC),
        model="m",
        messages=msgs,  # type: ignore[arg-type]
        success=success,
        steps=sum(m["role"] == "assistant" for m in msgs),
        usage={"prompt_tokens": tokens[0], "completion_tokens": tokens[1]},  # type: ignore[arg-type]
        cost_usd=cost,
        latency_s=latency,
        failure=failure,
    )


def test_wilson_interval_known_values() -> None:
    # Reference values (Newcombe 1998, table I): 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775.
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    low, high = wilson_interval(10, 10)
    assert round(low, 4) == 0.7225 and high == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_newcombe_difference_interval_known_values() -> None:
    # Newcombe 1998 (table II, example a): 56/70 vs 48/80 -> +0.2, 95% CI 0.0524 to 0.3339.
    d, low, high = newcombe_interval(56, 70, 48, 80)
    assert round(d, 4) == 0.2
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def test_summarize_counts_tsr_steps_tokens_cost_and_latency() -> None:
    long = [SYSTEM, USER, call("get_order"), tool({"a": 1}), call("get_order", cid="c2"),
            tool({"a": 1}, "c2"), answer()]  # fmt: skip
    data = [
        traj(True, tokens=(100, 10), cost=0.002, latency=1.0),
        traj(True, long, tokens=(300, 30), cost=0.004, latency=3.0),
        traj(False, family="cancel_order", tokens=(200, 20), cost=0.003, latency=2.0),
        traj(False, family="cancel_order", failure="bad_format", latency=2.0),
    ]
    m = summarize(data)
    assert m["n"] == 4 and m["tsr"] == 0.5
    low, high = wilson_interval(2, 4)
    assert m["tsr_ci_low"] == round(low, 6) and m["tsr_ci_high"] == round(high, 6)
    assert m["steps_mean"] == pytest.approx((2 + 3 + 2 + 2) / 4)
    assert m["steps_median"] == 2.0
    assert m["tokens_in"] == pytest.approx(175.0) and m["tokens_out"] == pytest.approx(17.5)
    assert m["cost_per_task_usd"] == pytest.approx((0.002 + 0.004 + 0.003 + 0.001) / 4)
    assert m["latency_s"] == pytest.approx(2.0)
    assert m["per_family"] == {"cancel_order": {"tsr": 0.0, "n": 2},
                               "order_status": {"tsr": 1.0, "n": 2}}  # fmt: skip
    assert m["failures"]["bad_format"] == 1 and m["failures"]["wrong_answer"] == 1
    assert sum(m["failures"].values()) == 2


def test_pricing_reprices_from_token_usage() -> None:
    data = [traj(True, tokens=(1000, 500), cost=9.0), traj(True, tokens=(3000, 1500), cost=9.0)]
    priced = summarize(data, Pricing(prompt_per_1k=0.001, completion_per_1k=0.002))
    assert priced["cost_per_task_usd"] == pytest.approx((0.002 + 0.006) / 2)
    assert summarize(data)["cost_per_task_usd"] == pytest.approx(9.0)  # logged cost


def test_summarize_of_nothing_is_defined() -> None:
    m = summarize([])
    assert m["n"] == 0 and m["tsr"] is None and m["steps_mean"] is None
    assert (m["tsr_ci_low"], m["tsr_ci_high"]) == (0.0, 1.0)
    assert m["per_family"] == {} and set(m["failures"].values()) == {0}


@pytest.mark.parametrize(
    ("messages", "label"),
    [
        ([SYSTEM, USER, call("get_order"), tool({"status": "shipped"}), answer("pending")],
         "wrong_answer"),
        ([SYSTEM, USER, call("lookup"), tool({"error": "unknown tool 'lookup'; known: a"}),
          answer()], "unknown_tool"),
        ([SYSTEM, USER, call("get_order", "{"),
          tool({"error": "arguments are not valid JSON: x at char 1"}), answer()],
         "bad_arguments"),
        ([SYSTEM, USER, call("get_order"), tool({"error": "invalid arguments: 'order_id' is a "
                                                "required property"}), answer()],
         "bad_arguments"),
        ([SYSTEM, USER, call("get_order"), tool({"error": "order O-1 not found"}), answer()],
         "tool_error_unhandled"),
        ([SYSTEM, USER, answer("<tool_call>{</tool_call>"),
          {"role": "user", "content": FORMAT_FEEDBACK + " (malformed)"}, answer()],
         "bad_format"),
        ([SYSTEM, USER, call("get_order"), tool({"status": "x"}), call("get_order", cid="c2"),
          tool({"error": "step cap reached"}, "c2")], "step_cap"),
    ],
)  # fmt: skip
def test_failure_taxonomy_from_log_messages(messages: list[dict[str, Any]], label: str) -> None:
    assert classify_failure(traj(False, messages)) == label


def test_own_failure_label_wins_and_successes_have_none() -> None:
    assert classify_failure(traj(False, failure="step_cap")) == "step_cap"
    assert classify_failure(traj(True, failure="bad_format")) is None
    counts = failure_counts([traj(True), traj(False, failure="unknown_tool")])
    assert counts["unknown_tool"] == 1 and sum(counts.values()) == 1


def test_tool_error_kind_reads_the_one_tool_error_predicate() -> None:
    """The report's failure taxonomy sees the errors curation sees (issue 18, item 4)."""
    assert tool_error_kind('{"error": "unknown tool \'x\'"}') == "unknown_tool"
    assert tool_error_kind('{"error": "order O-1 not found"}') == "tool_error"
    assert tool_error_kind('{"status": "error"}') is None
    assert tool_error_kind('{"error": "x", "order": 1}') == "tool_error"  # as curation says
    assert tool_error_kind('{"error": null, "order": 1}') is None  # a success naming its field
    assert tool_error_kind("Error: order O-1 not found") == "tool_error"  # plain text
    assert tool_error_kind("error: invalid arguments: 'x' is required") == "tool_error"
    assert tool_error_kind("not json") is None
    assert tool_error_kind("Errors are rare here") is None


def test_a_conversation_that_goes_on_after_its_answer_answered() -> None:
    """A foreign log ends with the user's goodbye: its failure is a wrong answer, not a step
    cap (the final answer is the last assistant message with text)."""
    messages = [
        {"role": "user", "content": "status of O-1?"},
        {"role": "assistant", "content": "It shipped."},
        {"role": "user", "content": "thanks, bye"},
    ]
    assert classify_failure(traj(False, messages)) == "wrong_answer"


def test_deltas_and_flatten() -> None:
    cand = {"tsr": 0.8, "steps_mean": 2.0, "cost_per_task_usd": 0.0001}
    base = {"tsr": 0.3}
    prod = {"tsr": 0.7, "steps_mean": 3.5, "cost_per_task_usd": 0.002}
    d = deltas(cand, base, prod)
    assert d["tsr_vs_prompt_only"] == pytest.approx(0.5)
    assert d["tsr_vs_production"] == pytest.approx(0.1)
    assert d["steps_vs_production"] == pytest.approx(-1.5)
    assert d["cost_vs_production"] == pytest.approx(-0.0019)
    assert deltas({"tsr": None}, base, {})["tsr_vs_prompt_only"] is None
    flat = flatten({"candidate": {"tsr": 0.5, "per_family": {"a": {"n": 3}}, "x": None}})
    assert flat == {"candidate.tsr": 0.5, "candidate.per_family.a.n": 3.0}


def test_report_shows_each_arm_with_intervals() -> None:
    arm = summarize([traj(True), traj(False)])
    payload = {"model": "sft", "model_path": "models/sft", "n_tasks": 2, "candidate": arm,
               "baseline_prompt_only": summarize([traj(False), traj(False)]),
               "baseline_production": summarize([]), "delta": deltas(arm, arm, {})}  # fmt: skip
    text = render_report(payload, {"max_turns": 8}, ["../../eval_plots/sft/tsr.png"])
    assert "# Evaluation: `sft`" in text
    assert "50.0% [" in text and "n/a (no data)" in text
    assert "+50.0 pts [" in text  # candidate vs prompt-only difference with its interval
    assert "![tsr](../../eval_plots/sft/tsr.png)" in text


def test_estimated_usage_is_marked_in_the_block_and_the_report() -> None:
    """Issue 18: usage tracetune estimated (logs without any) is marked in the reports."""
    estimated = traj(False)
    estimated.usage.estimated = True
    estimated.cost_estimated = True
    block = summarize([traj(True), estimated])
    assert block["usage_estimated"] == 0.5
    assert "usage_estimated" not in summarize([traj(True)])
    plain = summarize([traj(True)])
    payload = {"model": "sft", "model_path": "m", "n_tasks": 2, "candidate": plain,
               "baseline_prompt_only": plain, "baseline_production": block,
               "delta": deltas(block, block, {})}  # fmt: skip
    rows = [line for line in render_report(payload, {}, []).splitlines() if "estimated" in line]
    assert [r.split("|")[1].strip() for r in rows] == [
        "tokens in per task",
        "tokens out per task",
        "cost per task (USD)",
    ]
    assert all(r.count("estimated: 50.0% of tasks") == 1 for r in rows)  # production's only
