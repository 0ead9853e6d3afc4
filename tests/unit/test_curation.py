"""Curation: each golden rule, its drop count, exact and near-duplicate removal."""

from __future__ import annotations

import io
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracetune.config import CurateParams
from tracetune.trajectories.curation import (
    RULES,
    curate,
    error_retries,
    exact_key,
    golden_failures,
    judge_chunk,
    near_key,
    redundant_calls,
    retries_and_errors,
    words_only,
)
from tracetune.trajectories.tool_errors import DEFAULT_RULE, ToolErrorRule


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


# --- tool errors whatever their shape (issue 18, item 4) ------------------------------------
def text_result(i: int, content: str) -> dict:
    return {"role": "tool", "tool_call_id": f"call_{i}", "content": content}


@pytest.mark.parametrize(
    "content",
    [
        "Error: order O-9 not found",
        "error: invalid arguments: 'order_id' is required",
        "  Error fetching the order (HTTP 503)",
        "Traceback (most recent call last):\n  File ...\nKeyError: 'x'",
        '{"error": {"message": "rate limited", "code": 429}}',
        '{"isError": true, "content": [{"type": "text", "text": "boom"}]}',
    ],
)
def test_error_results_in_every_shape_are_retries_when_called_again(content: str) -> None:
    messages = [call(1, "get_order", {"order_id": "O-9"}), text_result(1, content)]
    messages.append(call(2, "get_order", {"order_id": "O-1"}))
    assert error_retries(messages) == 1
    rec = record()
    rec["messages"][2:2] = [call(2, "get_order", {"order_id": "O-9"}), text_result(2, content)]
    assert golden_failures(rec, CurateParams()) == ["error_retries"]


@pytest.mark.parametrize(
    "content",
    [
        '{"order_id": "O-1", "error": null}',  # a success that names its error field
        '{"errors": [], "status": "shipped"}',
        "Errors in the address were corrected; the order shipped.",
        "The order O-1 has no error: it shipped.",
    ],
)
def test_successful_results_are_not_errors(content: str) -> None:
    messages = [call(1, "get_order", {"order_id": "O-1"}), text_result(1, content)]
    messages.append(call(2, "get_order", {"order_id": "O-2"}))
    assert error_retries(messages) == 0


def test_the_rule_is_configurable_and_takes_what_the_environment_declares() -> None:
    from tracetune.config import ParamsError, ToolErrorParams, parse_params
    from tracetune.environments.support_desk import SupportDesk
    from tracetune.trajectories.tool_errors import build_rule

    class FailingDesk(SupportDesk):
        tool_error_patterns = (r"^FAILED\b",)
        tool_error_keys = ("fault",)

    env = FailingDesk()
    rule = build_rule(ToolErrorParams(), env)
    assert rule.matches("FAILED to reach the warehouse") and rule.matches('{"fault": "db down"}')
    assert rule.matches("Error: x")  # the defaults stay
    assert not build_rule(ToolErrorParams(from_environment=False), env).matches("FAILED: x")
    own = build_rule(ToolErrorParams(text_patterns=[r"^oops\b"], json_keys=["problem"]))
    assert own.matches("oops, no such order") and own.matches('{"problem": "x"}')
    assert not own.matches("Error: x") and not own.matches('{"error": "x"}')
    retried = [call(1, "get_order", {}), text_result(1, "oops, no"), call(2, "get_order", {})]
    assert error_retries(retried, own) == 1 and error_retries(retried) == 0
    with pytest.raises(ParamsError, match=r"tool_errors\.text_patterns"):
        parse_params({"tool_errors": {"text_patterns": ["^(unclosed"]}})


def test_foreign_harness_plain_text_errors_are_flagged_like_json_ones() -> None:
    """Issue 18: runs that call again after a plain-text `Error: ...` result were flagged 0
    times. The foreign copies (text errors, no `error_retries` label) must be flagged exactly
    as their JSON-error originals are."""
    from foreign_support import foreign_runs

    foreign, ours = foreign_runs(200)
    expected = sum(error_retries(r["messages"]) > 0 for r in ours)
    assert expected >= 20  # the simulator's error_retry fault rate makes plenty
    out = io.StringIO()
    params = CurateParams(require_success=False, step_limit=100)
    report = curate((json.dumps(r) for r in foreign), params, out)
    assert report.failing["error_retries"] == expected
    assert report.as_dict()["with_tool_errors"] >= expected


def test_tool_error_verdict_cache_keeps_verdicts_and_stays_out_of_pickles() -> None:
    """`ToolErrorRule.matches` caches per text (curation asks twice per message): the cached
    answer is the computed one, each rule keeps its own, the cache is bounded, and it does not
    travel to curation's workers with the rule."""
    import pickle

    from tracetune.trajectories import tool_errors

    rule = tool_errors.ToolErrorRule()
    strict = tool_errors.ToolErrorRule(json_keys=("failed",), text_patterns=())
    for _ in range(2):  # computed, then cached
        assert rule.matches('{"error": "order not found"}')
        assert not rule.matches('{"error": null, "ok": true}')
        assert rule.matches("Error: timeout")
        assert not strict.matches("Error: timeout")  # another rule, its own verdict
        assert strict.matches('{"failed": true}')
    assert pickle.loads(pickle.dumps(rule)).__dict__.get("_verdicts") is None
    for i in range(tool_errors._VERDICTS_LIMIT + 5):
        rule.matches(f'{{"i": {i}}}')
    assert len(rule._verdicts) <= tool_errors._VERDICTS_LIMIT
    assert rule.matches('{"error": "order not found"}')


def _parsed_verdict(rule: object, text: str) -> bool:
    """The rule's answer the slow way: parse every JSON object, else the text patterns."""
    import re

    from tracetune.trajectories.tool_errors import ToolErrorRule, _json_object, _truthy

    assert isinstance(rule, ToolErrorRule)
    payload = _json_object(text)
    if payload is not None:
        return any(_truthy(payload.get(key)) for key in rule.json_keys)
    return any(re.search(p, text) for p in rule.text_patterns)


@pytest.mark.parametrize(
    "text",
    [
        '{"order_id": "O-1", "status": "shipped"}',
        '{"error": "order O-9 not found"}',
        '{"error": null, "result": 1}',
        '{"\\u0065rror": "escaped key"}',
        '{"note": "the word \\"error\\" in a value"}',
        '{"isError": true, "content": []}',
        "  {not json at all Error",
        "{ FAILED: not JSON }",
        '{"fault": 1}',
        "Error: timeout",
        "FAILED to reach the service",
        "all good",
    ],
)
def test_tool_error_rule_without_a_key_in_the_text_answers_as_parsing_would(text: str) -> None:
    """Results naming none of the rule's keys skip the JSON parse; the verdict is the parsed
    one (escaped keys, invalid JSON that a text pattern matches, custom keys and patterns)."""
    from tracetune.trajectories.tool_errors import ToolErrorRule

    for rule in (
        ToolErrorRule(),
        ToolErrorRule(json_keys=("fault",), text_patterns=(r"FAILED", r"^\s*\{ FAILED")),
        ToolErrorRule(json_keys=("error",), text_patterns=()),
    ):
        assert rule._matches(text) == _parsed_verdict(rule, text), (rule, text)


_WORDISH = st.text(st.sampled_from([*"aZ09_ \t\n|.,:;{}[]\"'-+@/\\\x00\x7f", "é", "ß", "٣"]))


@settings(max_examples=400, deadline=None)
@given(st.one_of(_WORDISH, st.text(st.characters(max_codepoint=127)), st.text()))
def test_words_only_is_the_regex(text: str) -> None:
    """The ASCII fast path of `near_key`'s normalisation gives what the regex gave, on ASCII
    and non-ASCII text alike (whitespace, punctuation, control characters, Unicode digits)."""
    assert words_only(text) == re.sub(r"\W+", " ", text).strip()
    assert words_only(text.lower()) == re.sub(r"\W+", " ", text.lower()).strip()


def test_disk_set_add_many_answers_as_add_one_at_a_time() -> None:
    """`DiskSet.add_many` (curation's dedupe asks it once per chunk) says what `add` per key
    said: a key of an earlier call or repeated within the list is not new; over 500 keys too."""
    import random

    from tracetune.trajectories.io import DiskSet

    rng = random.Random(3)
    one, many = DiskSet(), DiskSet()
    for size in (0, 1, 499, 500, 501, 1300):
        keys = [f"k{rng.randrange(1800)}" for _ in range(size)]
        assert many.add_many(keys) == [one.add(key) for key in keys]
    assert len(many) == len(one)


@pytest.mark.parametrize(("exact", "near"), [(True, True), (False, True), (True, False)])
def test_dedupe_per_chunk_drops_what_one_at_a_time_dropped(exact: bool, near: bool) -> None:
    """Exact and near copies inside one chunk and across chunks (chunk of 2): the first stays,
    every later copy is dropped under the rule one-at-a-time dedupe named (a near key is only
    asked when the exact key was new)."""
    a, exact_copy = record("t-1"), record("t-1-dup")
    near_copy = record("t-2")
    near_copy["messages"][4]["content"] = "order o-1 is SHIPPED"
    other = record("t-3", task="order_status:O-2:x")
    other["messages"][1]["content"] = "Where is order O-2?"
    other["messages"][4]["content"] = "Order O-2 is late."
    again = [a | {"trajectory_id": "t-4"}, other | {"trajectory_id": "t-5"}]
    lines = [json.dumps(r) for r in (a, exact_copy, other, near_copy, *again)]
    params = CurateParams(dedupe_exact=exact, dedupe_near=near)
    out = io.StringIO()
    report = curate(lines, params, out, workers=1, chunk=2)
    expected_dropped = {
        (True, True): {"exact_duplicate": 3, "near_duplicate": 1},
        (False, True): {"near_duplicate": 4},
        (True, False): {"exact_duplicate": 3},
    }[(exact, near)]
    assert {k: v for k, v in report.as_dict()["dropped_by_rule"].items() if v} == expected_dropped
    assert report.kept == 6 - sum(expected_dropped.values())


_TOOL_CONTENT = st.sampled_from(["ok", "Error: no", '{"error": "x"}', '{"error": null}', "", None])
_CURATION_MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"role": st.just("tool")},
        optional={"content": st.one_of(_TOOL_CONTENT, st.lists(st.just({"text": "Error"})))},
    ),
    st.fixed_dictionaries(
        {"role": st.just("assistant")},
        optional={"tool_calls": st.sampled_from([None, [], [{"id": "c"}]]), "content": st.text()},
    ),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", None])}),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_CURATION_MESSAGE, max_size=10))
def test_retries_and_errors_is_both_walks(messages: list[dict]) -> None:
    """One walk gives what `error_retries` and the rule's `count` give walking alone."""
    for rule in (DEFAULT_RULE, ToolErrorRule(json_keys=(), text_patterns=(r"^Error",))):
        assert retries_and_errors(messages, rule) == (
            error_retries(messages, rule),
            rule.count(messages),
        )


def test_judged_lines_name_rules_and_errors_as_before(sim_lines: list[str]) -> None:
    """Each simulated trajectory's verdict: the golden rules it fails and its failed calls, as
    `golden_failures` and the rule's own count say (every setting of the rules)."""
    records = []
    for line in sim_lines:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("steps"), int):  # what ingest lets in
            records.append((line, value))
    assert len(records) > 100
    for params in (CurateParams(), CurateParams(keep_pseudonymised=False, max_error_retries=1)):
        lines = [line for line, _ in records]
        judged = judge_chunk((lines, params, DEFAULT_RULE))
        for (line, record), item in zip(records, judged, strict=True):
            messages = [m for m in record["messages"] if isinstance(m, dict)]
            assert item.failures == golden_failures(record, params, line, DEFAULT_RULE)
            assert item.tool_errors == DEFAULT_RULE.count(messages)
