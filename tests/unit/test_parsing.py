"""The tool-call parser: calls out, every malformed output a reported error, never a crash."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracetune.agent.parsing import (
    ERR_ARGUMENTS,
    ERR_JSON,
    ERR_NAME,
    ERR_NESTED,
    ERR_NOT_OBJECT,
    ERR_UNEXPECTED_CLOSE,
    ERR_UNTERMINATED,
    ParsedCall,
    ParsedTurn,
    parse_assistant_output,
    to_openai_message,
)
from tracetune.agent.template import assistant_texts


def call_block(name: str, arguments: object) -> str:
    payload = json.dumps({"name": name, "arguments": arguments})
    return f"<tool_call>\n{payload}\n</tool_call>"


def test_final_answer_without_tool_call() -> None:
    turn = parse_assistant_output("Order O-1 is shipped.<|im_end|>")
    assert turn == ParsedTurn(content="Order O-1 is shipped.", raw="Order O-1 is shipped.")
    assert turn.is_final


def test_single_call_arguments_become_a_json_string() -> None:
    turn = parse_assistant_output(call_block("get_thing", {"thing_id": "X-48213", "n": 2.5}))
    assert turn.error is None and turn.content is None and not turn.is_final
    assert turn.tool_calls == [
        ParsedCall(name="get_thing", arguments='{"thing_id": "X-48213", "n": 2.5}', id="call_0")
    ]


def test_several_calls_and_text_around_them() -> None:
    text = "Let me check.\n" + call_block("a", {"x": 1}) + "\n" + call_block("b", {}) + "<|im_end|>"
    turn = parse_assistant_output(text, id_prefix="call_3")
    assert turn.error is None
    assert turn.content == "Let me check."
    assert [(c.name, c.arguments, c.id) for c in turn.tool_calls] == [
        ("a", '{"x": 1}', "call_3_0"),
        ("b", "{}", "call_3_1"),
    ]


def test_double_encoded_and_missing_arguments_are_accepted() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"k\\": \\"v\\"}"}</tool_call>'
    assert parse_assistant_output(text).tool_calls[0].arguments == '{"k": "v"}'
    assert (
        parse_assistant_output('<tool_call>{"name": "f"}</tool_call>').tool_calls[0].arguments
        == "{}"
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>', ERR_JSON),
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}', ERR_UNTERMINATED),
        ('{"name": "f"}</tool_call>', ERR_UNEXPECTED_CLOSE),
        ("<tool_call><tool_call>{}</tool_call></tool_call>", ERR_NESTED),
        ("<tool_call>[1, 2]</tool_call>", ERR_NOT_OBJECT),
        ('<tool_call>{"arguments": {}}</tool_call>', ERR_NAME),
        ('<tool_call>{"name": "", "arguments": {}}</tool_call>', ERR_NAME),
        ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', ERR_NAME),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', ERR_ARGUMENTS),
        ('<tool_call>{"name": "f", "arguments": "not json"}</tool_call>', ERR_ARGUMENTS),
        ('<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>', ERR_JSON),
        ("<tool_call>" + "[" * 5000 + "</tool_call>", ERR_JSON),
    ],
)
def test_malformed_output_is_an_error_with_the_raw_text(text: str, error: str) -> None:
    turn = parse_assistant_output(text)
    assert turn.error is not None and turn.error.startswith(error)
    assert turn.tool_calls == [] and not turn.is_final
    assert turn.content == text.strip()  # the agent sees what it wrote


def test_never_evaluates_python() -> None:
    turn = parse_assistant_output(
        '<tool_call>{"name": "f", "arguments": __import__("os")}</tool_call>'
    )
    assert turn.error is not None and turn.error.startswith(ERR_JSON)


def test_to_openai_message() -> None:
    turn = parse_assistant_output(call_block("get_thing", {"id": "K-0093"}), id_prefix="c7")
    assert to_openai_message(turn) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c7_0",
                "type": "function",
                "function": {"name": "get_thing", "arguments": '{"id": "K-0093"}'},
            }
        ],
    }
    assert to_openai_message(parse_assistant_output("Done.")) == {
        "role": "assistant",
        "content": "Done.",
    }


FRAGMENTS = st.sampled_from(
    [
        "<tool_call>",
        "</tool_call>",
        "<|im_end|>",
        "{",
        "}",
        '"name"',
        '"arguments"',
        ":",
        ",",
        '"f"',
        "[",
        "]",
        "\n",
        " ",
        "NaN",
        "null",
        '"',
        "\\",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(st.one_of(FRAGMENTS, st.text(max_size=5))).map("".join)))
def test_parser_never_raises(text: str) -> None:
    turn = parse_assistant_output(text)
    assert (turn.error is None) or (turn.tool_calls == [])
    for call in turn.tool_calls:
        assert isinstance(json.loads(call.arguments), dict) and call.name
    to_openai_message(turn)


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**9), 10**9),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
ARGS = st.dictionaries(
    st.text(min_size=1, max_size=10),
    st.one_of(JSON_SCALARS, st.lists(JSON_SCALARS, max_size=3)),
    max_size=4,
)
NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(NAMES, ARGS), min_size=1, max_size=3),
    st.sampled_from([None, "", "Checking."]),
)
def test_round_trip_through_the_chat_template(
    calls: list[tuple[str, dict[str, object]]], content: str | None
) -> None:
    """What the template renders for an assistant turn parses back to the same calls."""
    message = {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for i, (n, a) in enumerate(calls)
        ],
    }
    (rendered,) = assistant_texts([{"role": "user", "content": "hi"}, message])
    assert rendered.endswith("<|im_end|>")
    turn = parse_assistant_output(rendered)
    assert turn.error is None
    assert turn.content == (content or None)
    assert [(c.name, json.loads(c.arguments)) for c in turn.tool_calls] == [
        (n, json.loads(json.dumps(a))) for n, a in calls
    ]
