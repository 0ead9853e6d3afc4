"""The raw gate's row in one pass over the messages equals the column functions' values."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tracetune.data.features import (
    _message_columns,
    bad_arguments,
    orphan_tool_messages,
    raw_row,
    roles_ok,
    tool_calls,
    unanswered_calls,
    unknown_tools,
)
from tracetune.trajectories.tool_errors import DEFAULT_RULE, ToolErrorRule

KNOWN = frozenset({"find_order", "get_customer"})
_IDS = st.sampled_from(["c1", "c2", "c3", None, 7])
_ARGS = st.one_of(
    st.sampled_from(['{"order_id": "O-1"}', "{broken", "[1, 2]", '"text"', "", "null"]),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2),
    st.none(),
    st.integers(),
)
_CALL = st.fixed_dictionaries(
    {"id": _IDS},
    optional={
        "function": st.fixed_dictionaries(
            {},
            optional={
                "name": st.sampled_from(["find_order", "nope", "", None]),
                "arguments": _ARGS,
            },
        )
    },
)
_CONTENT = st.one_of(
    st.sampled_from(
        ["ok", "Error: not found", '{"error": "boom"}', '{"error": null}', "  error: x", "", "{x"]
    ),
    st.none(),
    st.lists(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.sampled_from(["Error", "a"])}),
        max_size=2,
    ),
)
_MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"role": st.just("assistant")},
        optional={
            "content": _CONTENT,
            "tool_calls": st.one_of(st.none(), st.lists(_CALL, max_size=3)),
        },
    ),
    st.fixed_dictionaries(
        {"role": st.just("tool")}, optional={"tool_call_id": _IDS, "content": _CONTENT}
    ),
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "developer", "function", None])},
        optional={"content": _CONTENT},
    ),
    st.sampled_from(["not a message", 3]),
)
_RECORD = st.fixed_dictionaries(
    {"messages": st.lists(_MESSAGE, max_size=8)},
    optional={
        "trajectory_id": st.sampled_from(["t-1", "", None]),
        "steps": st.one_of(st.integers(0, 6), st.none(), st.just("2")),
        "usage": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {},
                optional={
                    "prompt_tokens": st.one_of(st.integers(0, 9), st.none(), st.just(True)),
                    "completion_tokens": st.one_of(st.integers(0, 9), st.floats(0, 9)),
                    "estimated": st.booleans(),
                },
            ),
        ),
        "cost_usd": st.one_of(st.floats(-1, 1), st.none()),
        "cost_estimated": st.booleans(),
        "timestamp": st.sampled_from(["2026-11-01T00:00:00+00:00", "2026-11-01T00:00:00", "x"]),
    },
)
_RULES = (DEFAULT_RULE, ToolErrorRule(json_keys=("error",), text_patterns=()))


def _messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in record.get("messages") or () if isinstance(m, dict)]


def _reference_columns(
    messages: list[dict[str, Any]], rule: ToolErrorRule
) -> tuple[int, int, int, int, int, int, int, int]:
    """The message columns as first written: one column function (one walk) each."""
    calls = tool_calls(messages)
    return (
        int(roles_ok(messages)),
        len(calls),
        bad_arguments(calls),
        unknown_tools(calls, KNOWN),
        unanswered_calls(messages),
        orphan_tool_messages(messages),
        rule.count(messages),
        sum(1 for m in messages if m.get("role") == "assistant"),
    )


def _row_columns(row: dict[str, Any]) -> tuple[Any, ...]:
    names = ("roles_ok", "tool_calls", "bad_arguments", "unknown_tools", "unanswered_calls")
    return (*(row[n] for n in names), row["orphan_tool_messages"], row["tool_errors"])


@settings(max_examples=600, deadline=None)
@given(_RECORD, st.sampled_from(_RULES))
def test_one_pass_row_equals_the_column_functions(
    record: dict[str, Any], rule: ToolErrorRule
) -> None:
    """Unknown roles before and after an assistant turn, repeated and missing call ids,
    answers before their call, broken and non-string arguments, error results of every shape:
    every column is what the per-column functions give, in the same key order."""
    messages = _messages(record)
    reference = _reference_columns(messages, rule)
    assert _message_columns(messages, KNOWN, rule) == reference
    row = raw_row(record, KNOWN, 3, rule, "s")
    assert _row_columns(row) == reference[:7]
    steps = record.get("steps")
    assert row["steps_consistent"] == int(steps == reference[7])


def test_one_pass_row_on_simulated_trajectories(sim_lines: list[str]) -> None:
    """The same rows on the simulator's logged trajectories (every family, retries, errors)."""
    records = []
    for line in sim_lines:
        try:
            value = json.loads(line)
        except ValueError:
            continue  # the simulator's corrupt lines
        if isinstance(value, dict):
            records.append(value)
    assert len(records) > 100
    for record in records:
        reference = _reference_columns(_messages(record), DEFAULT_RULE)
        assert _row_columns(raw_row(record, KNOWN, 1)) == reference[:7]
