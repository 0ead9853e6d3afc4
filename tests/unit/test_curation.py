"""Curation: each golden rule, its drop count, exact and near-duplicate removal."""

from __future__ import annotations

import io
import json

import pytest

from tracetune.config import CurateParams
from tracetune.trajectories.curation import (
    RULES,
    curate,
    error_retries,
    exact_key,
    golden_failures,
    near_key,
    redundant_calls,
)


def call(i: int, name: str, args: dict | str) -> dict:
    arguments = args if isinstance(args, str) else json.dumps(args)
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ],
    }


def result(i: int, content: dict) -> dict:
    return {"role": "tool", "tool_call_id": f"call_{i}", "content": json.dumps(content)}


def record(tid: str = "t-1", task: str = "order_status:O-1:What i", **changes: object) -> dict:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is the status of order O-1?"},
        call(1, "get_order", {"order_id": "O-1"}),
        result(1, {"order_id": "O-1", "status": "shipped"}),
        {"role": "assistant", "content": "Order O-1 is shipped."},
    ]
    base = {"trajectory_id": tid, "task_id": task, "family": "order_status", "messages": messages}
    return base | {"success": True, "steps": 2, "error_retries": 0} | changes


def test_redundant_calls_compare_canonical_arguments() -> None:
    msgs = [
        call(1, "get_order", '{"order_id": "O-1", "x": 1}'),
        result(1, {}),
        call(2, "get_order", '{"x": 1, "order_id": "O-1"}'),
    ]
    assert redundant_calls(msgs) == 1
    assert (
        redundant_calls(
            [call(1, "get_order", {"order_id": "O-1"}), call(2, "get_order", {"order_id": "O-2"})]
        )
        == 0
    )


def test_error_retries_are_errors_followed_by_another_call() -> None:
    retry = [
        call(1, "get_order", "{bad"),
        result(1, {"error": "bad json"}),
        call(2, "get_order", {}),
    ]
    assert error_retries(retry) == 1
    reported = [
        call(1, "get_order", {"order_id": "O-9"}),
        result(1, {"error": "not found"}),
        {"role": "assistant", "content": "Order O-9 was not found."},
    ]
    assert error_retries(reported) == 0


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({"success": False}, "success"),
        ({"steps": 15}, "step_limit"),
        ({"error_retries": 1}, "error_retries"),
    ],
)
def test_each_rule_catches_its_fault(changes: dict, rule: str) -> None:
    assert golden_failures(record(**changes), CurateParams()) == [rule]


def test_redundant_and_empty_turn_rules() -> None:
    redundant = record()
    redundant["messages"][3:3] = [call(2, "get_order", {"order_id": "O-1"}), result(2, {})]
    assert golden_failures(redundant, CurateParams()) == ["redundant_calls"]
    empty = record()
    empty["messages"].append({"role": "assistant", "content": "  "})
    assert golden_failures(empty, CurateParams()) == ["empty_turns"]
    assert golden_failures(empty, CurateParams(drop_empty_turns=False)) == []


def test_rules_can_be_switched_off() -> None:
    loose = CurateParams(require_success=False, step_limit=100, max_error_retries=5)
    assert golden_failures(record(success=False, steps=20, error_retries=2), loose) == []


def test_pseudonymised_rule_is_opt_in() -> None:
    rec = record()
    rec["messages"][1]["content"] += " I'm user_0123456789@example.invalid"
    text = json.dumps(rec)
    assert golden_failures(rec, CurateParams(), text) == []
    assert golden_failures(rec, CurateParams(keep_pseudonymised=False), text) == ["pseudonymised"]


def test_duplicate_keys() -> None:
    a = record("t-1")
    copy = record("t-1-dup")  # a re-logged session: other id, same episode
    assert exact_key(a) == exact_key(copy)
    near = record("t-2")
    near["messages"][4]["content"] = "order o-1 is SHIPPED"
    near["messages"][2]["tool_calls"][0]["id"] = "abc"
    assert exact_key(a) != exact_key(near) and near_key(a) == near_key(near)
    other = record("t-3", task="order_status:O-2:What i")
    other["messages"][1]["content"] = "What is the status of order O-2?"
    assert near_key(other) != near_key(a)


def test_curate_reports_drops_per_rule_and_writes_the_rest() -> None:
    near = record("t-4")
    near["messages"][4]["content"] = "Order O-1 is shipped!!"
    lines = [
        record("t-1"),
        record("t-2", success=False),
        record("t-3", steps=20),
        record("t-1-dup"),
        near,
        record("t-5", task="order_status:O-1:Status"),  # same episode logged under another id
    ]
    out = io.StringIO()
    report = curate((json.dumps(r) for r in lines), CurateParams(), out)
    kept = [json.loads(x)["trajectory_id"] for x in out.getvalue().splitlines()]
    assert kept == ["t-1"]
    summary = report.as_dict()
    assert summary["input"] == 6 and summary["kept"] + summary["dropped"] == 6
    assert summary["dropped_by_rule"] == dict.fromkeys(RULES, 0) | {
        "success": 1,
        "step_limit": 1,
        "exact_duplicate": 1,
        "near_duplicate": 2,
    }
