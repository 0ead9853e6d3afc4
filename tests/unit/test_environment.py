"""The built-in environment: tools really execute, failures become observations, outcomes verify."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from tracetune.environments import Call, Environment, Outcome, Task, Tool, load_environment
from tracetune.environments.bounds import MAX_ARGUMENT_CHARS
from tracetune.environments.support_desk import FAMILIES, SupportDesk, numbers_in, oracle_solver
from tracetune.trajectories.episode import run_scripted


def _payload(env: SupportDesk, name: str, **args: Any) -> dict[str, Any]:
    obs = env.step(Call(name, json.dumps(args)))
    return json.loads(obs.content) | ({"_error": obs.error} if obs.error else {})


@pytest.fixture
def started(env: SupportDesk) -> SupportDesk:
    env.reset(env.tasks(1, seed=0)[0])
    return env


def test_read_tools_return_rows_and_not_found_errors(started: SupportDesk) -> None:
    customer = _payload(started, "get_customer", customer_id="C-0001")
    assert customer["customer_id"] == "C-0001" and customer["tier"] in ("bronze", "silver", "gold")
    assert _payload(started, "find_customer", email=customer["email"])["customer_id"] == "C-0001"
    order = _payload(started, "get_order", order_id="O-10001")
    assert order["total_usd"] == round(
        sum(i["qty"] * i["unit_price_usd"] for i in order["items"]), 2
    )
    listing = _payload(started, "list_orders", customer_id=order["customer_id"])
    assert "O-10001" in [o["order_id"] for o in listing["orders"]]
    assert _payload(started, "search_products", query="kettle")["results"]
    missing = _payload(started, "get_order", order_id="O-99999")
    assert missing["_error"] == "tool_error" and "not found" in missing["error"]


def test_calculator_and_currency(started: SupportDesk) -> None:
    assert _payload(started, "calculate", expression="(10 + 2.5) * 2 - 1 / 4")["result"] == 24.75
    attack = _payload(started, "calculate", expression="__import__('os').system('true')")
    assert attack["_error"] == "tool_error"
    assert _payload(started, "calculate", expression="1/0")["_error"] == "tool_error"
    fx = _payload(started, "convert_currency", amount=100, from_currency="USD", to_currency="EUR")
    assert fx == {"amount": 92.0, "currency": "EUR"}


def test_write_tool_changes_state_and_enforces_rules(env: SupportDesk) -> None:
    task = env.tasks(1, seed=0, families=["cancel_order"])[0]
    env.reset(task)
    oid = task.params["args"][0]
    done = _payload(env, "update_order_status", order_id=oid, status="cancelled")
    assert done["status"] == "cancelled"
    again = _payload(env, "update_order_status", order_id=oid, status="cancelled")
    assert again["_error"] == "tool_error" and "only pending" in again["error"]
    assert env.verify(f"Order {oid} has been cancelled.").success
    env.reset(task)  # a new episode starts from the pristine world
    assert _payload(env, "get_order", order_id=oid)["status"] == "pending"


def test_bad_calls_become_observations(started: SupportDesk) -> None:
    assert started.step(Call("drop_tables", "{}")).error == "unknown_tool"
    assert started.step(Call("get_order", '{"order_id": "O-1')).error == "bad_arguments"
    assert started.step(Call("get_order", '{"order_id": 5}')).error == "bad_arguments"
    assert started.step(Call("get_order", '{"id": "O-10001"}')).error == "bad_arguments"
    assert started.step(Call("get_order", "[1, 2]")).error == "bad_arguments"
    bad = started.step(
        Call("convert_currency", {"amount": 1, "from_currency": "USD", "to_currency": "XXX"})
    )
    assert bad.error == "bad_arguments"
    assert started.step(Call("get_order", {"order_id": "O-10001"})).error is None


class _Buggy(SupportDesk):
    def _tools(self) -> Sequence[Tool]:
        def explode() -> dict[str, Any]:
            raise KeyError("bug inside the tool")

        empty = {"type": "object", "properties": {}, "additionalProperties": False}
        return [*super()._tools(), Tool("explode", "Always fails.", empty, explode)]


def test_exception_inside_tool_is_an_observation() -> None:
    env = _Buggy()
    env.reset(env.tasks(1, seed=0)[0])
    obs = env.step(Call("explode", "{}"))
    assert obs.error == "tool_exception" and "KeyError" in obs.content


def test_step_cap_ends_runaway_episodes() -> None:
    env = SupportDesk(max_steps=3)
    env.reset(env.tasks(1, seed=0)[0])
    for _ in range(3):
        assert not env.step(Call("get_order", {"order_id": "O-10001"})).done
    capped = env.step(Call("get_order", {"order_id": "O-10001"}))
    assert capped.done and capped.error == "step_cap"
    assert env.calls_made == 3


def test_at_least_six_tools_and_eight_families(env: SupportDesk) -> None:
    assert len(env.tool_schemas()) >= 6
    assert len(env.families()) >= 8
    for schema in env.tool_schemas():
        assert schema["type"] == "function" and schema["function"]["parameters"]["type"] == "object"


def test_tasks_are_deterministic_distinct_and_plentiful(env: SupportDesk) -> None:
    first = env.tasks(3000, seed=11)
    assert [t.id for t in first] == [t.id for t in env.tasks(3000, seed=11)]
    assert len({t.id for t in first}) == 3000
    assert {t.family for t in first} == set(FAMILIES)
    assert [t.id for t in env.tasks(50, seed=12)] != [t.id for t in first[:50]]


def test_oracle_reaches_full_tsr_on_every_family(env: SupportDesk) -> None:
    tasks = env.tasks(400, seed=5)
    records = [run_scripted(env, t, oracle_solver(t)) for t in tasks]
    failures = [(r.task.id, r.outcome.details) for r in records if not r.outcome.success]
    assert failures == []
    longest = max(sum(m["role"] == "tool" for m in r.messages) for r in records)
    assert longest >= 4  # some families chain 4+ tool results
    assert any(r.steps == 1 for r in records)  # some need no tool at all


def test_do_nothing_policy_scores_zero(env: SupportDesk) -> None:
    tasks = env.tasks(100, seed=5)
    for answer in (None, "", "I don't know."):
        wins = 0
        for task in tasks:
            env.reset(task)
            wins += env.verify(answer).success
        assert wins == 0


def test_verifier_rejects_wrong_answers_and_wrong_writes(env: SupportDesk) -> None:
    task = env.tasks(1, seed=0, families=["order_status"])[0]
    env.reset(task)
    status = task.check["word"]
    guessed = env.verify(f"It is {status}.")  # right word, but no tool ever returned it
    assert not guessed.success and "a guess" in guessed.details["reasons"][0]
    env.step(Call("get_order", {"order_id": task.params["args"][0]}))
    assert env.verify(f"It is {status}.").success
    other = next(s for s in ("pending", "shipped", "delivered") if s != status)
    assert not env.verify(f"It is {other}.").success
    assert not env.verify(f"It is {status} or {other}.").success  # hedging is not an answer
    cancel = env.tasks(2, seed=0, families=["cancel_order"])
    env.reset(cancel[0])
    env.step(
        Call(
            "update_order_status", {"order_id": cancel[1].params["args"][0], "status": "cancelled"}
        )
    )
    outcome = env.verify("Done, cancelled.")
    assert not outcome.success and any(
        "unexpected" in r or "should be" in r for r in outcome.details["reasons"]
    )


def test_amounts_must_come_out_of_a_tool(env: SupportDesk) -> None:
    task = env.tasks(1, seed=3, families=["customer_spend"])[0]
    env.reset(task)
    answer = f"They spent {task.check['number']:.2f} USD."
    assert not env.verify(answer).success  # the right number, computed by no tool
    assert run_scripted(env, task, oracle_solver(task)).outcome.success  # the tools' number


def test_numbers_in_ignores_ids() -> None:
    assert numbers_in("Order O-10423 of C-0042 costs 1,234.50 EUR, 3 items") == [1234.5, 3.0]


def test_third_party_environment_loads_by_dotted_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "examples"))
    env = load_environment("unit_converter_env.UnitConverter", seed_offset=1)
    task = env.tasks(1, seed=0)[0]
    env.reset(task)
    obs = env.step(
        Call(
            "convert",
            {
                "value": task.params["value"],
                "from_unit": task.params["from_unit"],
                "to_unit": task.params["to_unit"],
            },
        )
    )
    answer = f"{json.loads(obs.content)['value']:.2f}"
    assert env.verify(answer).success
    assert (
        env.step(Call("convert", {"value": 1, "from_unit": "mi", "to_unit": "parsec"})).error
        == "tool_error"
    )


@pytest.mark.parametrize(
    "path", ["nowhere.Env", "tracetune.environments.base.Nope", "json.JSONDecoder", "Env"]
)
def test_bad_environment_paths_fail_clearly(path: str) -> None:
    with pytest.raises((ValueError, TypeError)):
        load_environment(path)


class _Minimal(Environment):
    def _tools(self) -> Sequence[Tool]:
        return []

    def tasks(self, n: int, seed: int, families: Sequence[str] | None = None) -> list[Task]:
        return [Task(f"t{i}", "f", "goal") for i in range(n)]

    def _reset(self, task: Task) -> None:
        pass

    def verify(self, final_answer: str | None) -> Outcome:
        return Outcome(final_answer == "ok", 1.0 if final_answer == "ok" else -1.0)


def test_step_before_reset_is_a_programming_error() -> None:
    with pytest.raises(RuntimeError):
        _Minimal().step(Call("x", "{}"))


def test_tasks_rebuild_from_their_ids(env: SupportDesk) -> None:
    for task in env.tasks(300, seed=9):
        assert env.task_by_id(task.id) == task
    with pytest.raises(KeyError):
        env.task_by_id("order_status:O-00000:0")
    with pytest.raises(KeyError):
        env.task_by_id("teleport:now")


# --- hostile tool calls (issue 20, item 4): every one is an error observation, never a crash ---
HUGE_NAME = "n" * 10_000_000

FX = '{"amount": %s, "from_currency": "USD", "to_currency": "EUR"}'
HOSTILE_ARGUMENTS: list[tuple[str, str, object]] = [
    ("deep_list", "get_customer", "[" * 100_000 + "]" * 100_000),
    ("deep_object", "get_customer", '{"a":' * 50_000 + "1" + "}" * 50_000),
    ("deep_within_size", "get_customer", '{"customer_id": ' + "[" * 2_000 + "]" * 2_000 + "}"),
    ("deep_but_parsable", "get_customer", '{"customer_id": ' + "[" * 200 + "]" * 200 + "}"),
    ("big_int", "convert_currency", FX % ("9" * 5_000)),
    ("big_negative_int", "convert_currency", FX % ("-" + "9" * 30)),
    ("nan", "convert_currency", FX % "NaN"),
    ("infinity", "convert_currency", FX % "Infinity"),
    ("minus_infinity", "convert_currency", FX % "-Infinity"),
    ("overflowing_float", "convert_currency", FX % "1e999"),
    ("huge_float", "convert_currency", FX % "1e300"),
    ("huge_string", "get_customer", '{"customer_id": "' + "C" * 1_000_000 + '"}'),
    ("many_values", "get_customer", '{"customer_id": [' + ",".join(["1"] * 20_000) + "]}"),
    ("null", "get_customer", "null"),
    ("list", "get_customer", "[1, 2]"),
    ("py_null", "get_customer", None),
    ("py_list", "get_customer", ["C-0001"]),
    ("py_int", "get_customer", 7),
    (
        "py_nan",
        "convert_currency",
        {"amount": float("nan"), "from_currency": "USD", "to_currency": "EUR"},
    ),
    (
        "py_inf",
        "convert_currency",
        {"amount": float("inf"), "from_currency": "USD", "to_currency": "EUR"},
    ),
    (
        "py_big_int",
        "convert_currency",
        {"amount": 10**5000, "from_currency": "USD", "to_currency": "EUR"},
    ),
    ("py_set", "get_customer", {"customer_id": {"C-0001"}}),
    ("py_int_key", "get_customer", {1: "C-0001"}),
]


def _deep_dict(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _assert_error_observation(obs: Any, error: str) -> None:
    assert obs.error == error
    assert len(obs.content) < 2_000, "an error observation must stay small"
    payload = json.loads(obs.content, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert set(payload) == {"error"}


@pytest.mark.parametrize(
    ("label", "tool", "arguments"), HOSTILE_ARGUMENTS, ids=[h[0] for h in HOSTILE_ARGUMENTS]
)
def test_hostile_arguments_become_error_observations(
    started: SupportDesk, label: str, tool: str, arguments: Any
) -> None:
    obs = started.step(Call(tool, arguments))
    _assert_error_observation(obs, "bad_arguments")
    assert started.errors == 1 and started.call_log[-1][2] is False
    assert len(started.call_log[-1][1]) < MAX_ARGUMENT_CHARS + 200, "a bounded call-log key"


def test_arguments_nested_deeper_than_the_stack_as_a_dict(started: SupportDesk) -> None:
    obs = started.step(Call("get_customer", _deep_dict(100_000)))
    _assert_error_observation(obs, "bad_arguments")
    assert "nested deeper" in json.loads(obs.content)["error"]


@pytest.mark.parametrize(
    "name", [HUGE_NAME, None, ["get_customer"], 7], ids=["10MB", "None", "list", "int"]
)
def test_hostile_tool_names_are_refused_and_never_echoed_whole(
    started: SupportDesk, name: Any
) -> None:
    obs = started.step(Call(name, '{"customer_id": "C-0001"}'))
    _assert_error_observation(obs, "unknown_tool")
    assert len(started.call_log[-1][0] if isinstance(name, str) else "") <= len(HUGE_NAME)
    assert len(started.call_log[-1][1]) < 200


def test_long_unknown_tool_name_is_truncated_in_the_message(started: SupportDesk) -> None:
    obs = started.step(Call("x" * 100, "{}"))
    message = json.loads(obs.content)["error"]
    assert obs.error == "unknown_tool" and "x" * 64 in message and "x" * 65 not in message


def test_numbers_in_bounds_still_work(started: SupportDesk) -> None:
    fx = _payload(started, "convert_currency", amount=1e12, from_currency="USD", to_currency="USD")
    assert fx["currency"] == "USD" and "_error" not in fx


class _NanTool(Environment):
    """A tool that returns a non-finite float: its result must not be written as `NaN`."""

    name = "nan_env"

    def _tools(self) -> Sequence[Tool]:
        return [
            Tool("ratio", "", {"type": "object", "properties": {}}, lambda: {"r": float("nan")}),
            Tool("blob", "", {"type": "object", "properties": {}}, lambda: {"b": object()}),
        ]

    def tasks(self, n: int, seed: int, families: Sequence[str] | None = None) -> list[Task]:
        return [Task(f"t{i}", "f", "goal") for i in range(n)]

    def _reset(self, task: Task) -> None:
        pass

    def verify(self, final_answer: str | None) -> Outcome:
        return Outcome(False, 0.0)


@pytest.mark.parametrize("tool", ["ratio", "blob"])
def test_tool_results_are_strict_json(tool: str) -> None:
    env = _NanTool()
    env.reset(env.tasks(1, seed=0)[0])
    _assert_error_observation(env.step(Call(tool, "{}")), "tool_exception")


def test_call_problem_verdict_cache_gives_the_same_answer_and_stays_bounded() -> None:
    """The verdict cache of `call_problem` (an ingest speed-up) never changes a verdict: a
    hostile text is refused the second time too, a name is checked on every call, and the
    cache neither grows past its limit nor keeps long texts."""
    from tracetune.environments import bounds

    hostile = '{"n": ' + "9" * 40 + "}"
    first = bounds.call_problem("lookup", hostile)
    assert first is not None and "beyond" in first
    assert bounds.call_problem("lookup", hostile) == first  # from the cache, same verdict
    assert bounds.call_problem("lookup", '{"n": 1}') is None
    assert bounds.call_problem("x" * 200, '{"n": 1}') is not None  # cached args, bad name
    long_ok = json.dumps({"note": "y" * 2_000})
    assert bounds.call_problem("lookup", long_ok) is None
    assert long_ok not in bounds._VERDICTS
    for i in range(bounds._VERDICTS_LIMIT + 5):
        bounds.call_problem("lookup", f'{{"i": {i}}}')
    assert len(bounds._VERDICTS) <= bounds._VERDICTS_LIMIT
    assert bounds.call_problem("lookup", hostile) == first


def _parsed_problem(arguments: str) -> str | None:
    """The bounds verdict the slow way: always decode (strict, bounded) and walk."""
    from tracetune.environments import bounds

    try:
        bounds.check_value(bounds.decode_arguments(arguments))
    except bounds.OutOfBounds as exc:
        return str(exc)
    except json.JSONDecodeError:
        return None
    return None


@pytest.mark.parametrize(
    "arguments",
    [
        '{"order_id": "O-10299"}',
        '{"amount": 999999999999999}',
        '{"amount": 9999999999999999}',
        '{"amount": -1234567890123456.5}',
        '{"x": 1e999}',
        '{"x": 1E3}',
        '{"x": NaN}',
        '{"x": -Infinity}',
        '{"x": "text with NaN and 1e9 inside a string"}',
        "[" * 32 + "]" * 32,
        "[" * 33 + "]" * 33,
        '{"a": [' + "[" * 31 + "]" * 31 + "]}",
        '{"unclosed": [1, 2',
        "not json",
        '{"id": "12345678901234567"}',
    ],
)
def test_short_arguments_skip_parsing_only_when_no_bound_can_break(arguments: str) -> None:
    """Short argument texts with no long digit run, exponent, non-finite constant or deep
    bracketing are not parsed; every text gets the verdict that decoding it gives."""
    from tracetune.environments import bounds

    assert bounds._arguments_problem(arguments) == _parsed_problem(arguments), arguments
    if bounds._surely_in_bounds(arguments):
        assert _parsed_problem(arguments) is None
