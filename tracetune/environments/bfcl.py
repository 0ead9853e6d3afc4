"""BFCL multi-turn (the Berkeley Function-Calling Leaderboard, `bfcl-eval`, Apache-2.0) as a
tracetune environment: the open proof that a third-party benchmark plugs in through
`environment.class_path` alone (docs/environments.md, "Bring your own environment").

Only BFCL's multi-turn parts are used, read from the installed `bfcl_eval` package:

- tools: the classes under `bfcl_eval/eval_checker/multi_turn_eval/func_source_code` (a file
  system, messaging, a social feed, tickets, trading, travel booking, a car, maths); every call
  runs the real method on the episode's own instances, loaded from the task's `initial_config`;
- schemas: `data/multi_turn_func_doc`, converted to OpenAI function schemas (`to_json_schema`);
- tasks: `BFCL_v4_multi_turn_base.json` (200 tasks), their later user turns given by the user
  hook (`user_reply`) and their reference calls (`possible_answer/`) played by `oracle(task)`;
- verdict: BFCL's own state and response checks (`multi_turn_checker.state_checker` and
  `response_checker`), applied after every user turn as BFCL's `multi_turn_checker` does.

`bfcl-eval`'s pins clash with ours (numpy 1.26, many API clients), so it is installed without
its dependencies: `pip install --no-deps bfcl-eval==2026.3.23` plus the `bfcl` extra (mpmath,
for its maths tools). Nothing here is imported at tracetune's import time.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tracetune.environments.base import (
    AskUser,
    Call,
    EpisodeRecord,
    FixedTaskEnvironment,
    Outcome,
    Solver,
    Task,
    Tool,
    ToolError,
)

INSTALL_HINT = "pip install --no-deps bfcl-eval==2026.3.23 && pip install '.[bfcl]'"
CATEGORY = "multi_turn_base"
# The multi-turn classes of BFCL's base category (its memory and web-search classes need
# heavy dependencies and no base task uses them).
CLASSES = (
    "GorillaFileSystem",
    "MathAPI",
    "MessageAPI",
    "TwitterAPI",
    "TicketAPI",
    "TradingBot",
    "TravelAPI",
    "VehicleControlAPI",
)
# The declared split: every fifth task by its BFCL index (`multi_turn_base_4`, `_9`, ...) is
# held out for testing, the rest train. Stable across installs and subsets of classes.
TEST_EVERY = 5
# BFCL parameter types -> JSON Schema types ("any": no constraint).
_TYPES = {
    "dict": "object",
    "float": "number",
    "integer": "integer",
    "string": "string",
    "boolean": "boolean",
    "array": "array",
    "tuple": "array",
}
ERROR_PREFIX = "Error during execution: "
# Lookups that change no public state and give the same result when repeated (so the log
# simulator's redundant calls and runaway loops may repeat them): every maths tool, and these.
# Random readings (the car's speed, the outside temperature) are left out: a repeat draws anew.
# `tests/unit/test_bfcl.py` checks the claim by repeating every one in every reference episode.
READ_ONLY = frozenset(
    {
        "cat", "diff", "du", "grep", "ls", "pwd", "tail", "wc",
        "get_message_stats", "get_user_id", "list_users", "message_get_login_status",
        "search_messages", "view_messages_sent",
        "get_tweet", "get_tweet_comments", "get_user_stats", "get_user_tweets",
        "list_all_following", "posting_get_login_status", "search_tweets",
        "get_ticket", "get_user_tickets", "ticket_get_login_status",
        "filter_stocks_by_price", "get_account_info", "get_available_stocks", "get_current_time",
        "get_order_details", "get_order_history", "get_stock_info", "get_symbol_by_name",
        "get_transaction_history", "get_watchlist", "trading_get_login_status",
        "compute_exchange_rate", "get_all_credit_cards", "get_booking_history",
        "get_budget_fiscal_year", "get_credit_card_balance", "get_flight_cost",
        "get_nearest_airport_by_city", "list_all_airports", "travel_get_login_status",
        "check_tire_pressure", "displayCarStatus", "display_log", "estimate_distance",
        "estimate_drive_feasibility_by_mileage", "find_nearest_tire_shop", "gallon_to_liter",
        "get_zipcode_based_on_city", "liter_to_gallon",
    }
)  # fmt: skip


def bfcl_root() -> Path:
    """Where the installed `bfcl_eval` package lives; a clear error when it is absent."""
    try:
        import bfcl_eval
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"the BFCL environment needs bfcl-eval, installed without its dependencies: "
            f"{INSTALL_HINT}"
        ) from exc
    return Path(bfcl_eval.__file__).parent


@functools.lru_cache(maxsize=4)
def load_entries(category: str = CATEGORY) -> tuple[dict[str, Any], ...]:
    """BFCL's tasks of `category`, each with its `ground_truth` (the reference calls per user
    turn, from `possible_answer/`) merged in; in BFCL's order."""
    data = bfcl_root() / "data"
    answers = {
        row["id"]: row["ground_truth"]
        for row in _jsonl(data / "possible_answer" / f"BFCL_v4_{category}.json")
    }
    out = []
    for row in _jsonl(data / f"BFCL_v4_{category}.json"):
        if row["id"] not in answers:
            raise ValueError(f"BFCL task {row['id']} has no possible answer")
        if len(answers[row["id"]]) != len(row["question"]):
            raise ValueError(f"BFCL task {row['id']}: answer turns differ from user turns")
        out.append({**row, "ground_truth": answers[row["id"]]})
    return tuple(out)


@functools.lru_cache(maxsize=16)
def load_func_docs(class_name: str) -> tuple[dict[str, Any], ...]:
    """BFCL's function docs of one class (`data/multi_turn_func_doc`)."""
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    path = bfcl_root() / "data" / "multi_turn_func_doc"
    return tuple(_jsonl(path / MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def to_json_schema(spec: Mapping[str, Any], *, top: bool = True) -> dict[str, Any]:
    """A BFCL parameter spec as JSON Schema: BFCL writes `dict`, `float` and `tuple` where
    JSON Schema has `object`, `number` and `array`. The top level rejects unknown arguments
    (BFCL's methods would raise on them anyway)."""
    out: dict[str, Any] = {}
    kind = spec.get("type")
    if kind in _TYPES:
        out["type"] = _TYPES[kind]
    elif kind not in (None, "any"):
        raise ValueError(f"unknown BFCL parameter type {kind!r}")
    for key in ("description", "enum", "default"):
        if key in spec:
            out[key] = spec[key]
    if "items" in spec:
        out["items"] = to_json_schema(spec["items"], top=False)
    if "properties" in spec:
        out["properties"] = {
            name: to_json_schema(sub, top=False) for name, sub in spec["properties"].items()
        }
    if spec.get("required"):
        out["required"] = list(spec["required"])
    if top:
        out.setdefault("type", "object")
        out.setdefault("properties", {})
        out["additionalProperties"] = False
    return out


def compact_description(description: str) -> str:
    """A BFCL tool description without its class preamble (the same for every tool of a class)."""
    head, sep, tail = description.partition("Tool description: ")
    return tail.strip() if sep and head.startswith("This tool belongs to") else description


def parse_reference_call(text: str, signature: inspect.Signature) -> Call:
    """One of BFCL's reference calls (`mv(source='a', destination='b')`, `sort('f.pdf')`) as
    a `Call` with named arguments: positional arguments take the method's parameter names.
    Only literals are accepted (the text is parsed, never evaluated)."""
    node = ast.parse(text.strip(), mode="eval").body
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"not a plain function call: {text!r}")
    names = [p for p in signature.parameters if p != "self"]
    if len(node.args) > len(names):
        raise ValueError(f"too many positional arguments: {text!r}")
    args: dict[str, Any] = {
        name: ast.literal_eval(value) for name, value in zip(names, node.args, strict=False)
    }
    for keyword in node.keywords:
        if keyword.arg is None:
            raise ValueError(f"**kwargs in a reference call: {text!r}")
        args[keyword.arg] = ast.literal_eval(keyword.value)
    return Call(node.func.id, _jsonable(args))


def _jsonable(value: Any) -> Any:
    """Tuples as lists: a call's arguments travel as JSON."""
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def bfcl_result(value: Any) -> str:
    """A method's return value as BFCL's executor writes it (`multi_turn_utils`): a string as
    is, a dict as JSON (keys in the method's order), anything else by `str`. What the agent
    reads and what the response check compares."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def split_of(task_id: str) -> str:
    """`test` for every `TEST_EVERY`-th BFCL index, else `train` (ids without an index: by a
    hash of the id, so the rule still holds for another category's ids)."""
    suffix = task_id.rsplit("_", 1)[-1]
    if suffix.isdigit():
        index = int(suffix)
    else:
        index = int(hashlib.sha256(task_id.encode()).hexdigest(), 16)
    return "test" if index % TEST_EVERY == TEST_EVERY - 1 else "train"


class BfclMultiTurn(FixedTaskEnvironment):
    """BFCL's multi-turn base category: 200 tasks over 8 stateful API classes.

    `classes` restricts the environment to tasks whose classes are all among them (and to their
    tools): a smaller prompt for small models, e.g. `["VehicleControlAPI"]` (19 tasks, 22
    tools). A task's family is its classes joined by `+` (`TravelAPI+TwitterAPI`).
    """

    name = "bfcl_multi_turn"
    system_prompt = (
        "You are an assistant that acts through the given tools (a file system, messaging, a "
        "social feed, support tickets, trading, travel booking, a car's controls, maths). The "
        "user makes one request after another: call the tools each request needs, then reply "
        "in plain text. Use exactly the names and values the user gives."
    )

    def __init__(
        self, max_steps: int = 30, classes: Sequence[str] | None = None, compact: bool = False
    ) -> None:
        chosen = tuple(classes) if classes else CLASSES
        unknown = sorted(set(chosen) - set(CLASSES))
        if unknown:
            raise ValueError(f"unknown BFCL classes {unknown}; known: {', '.join(CLASSES)}")
        self.classes = chosen
        self.compact = compact
        self._instances: dict[str, Any] = {}
        self._entry: dict[str, Any] = {}
        entries = [e for e in load_entries() if set(e["involved_classes"]) <= set(chosen)]
        if not entries:
            raise ValueError(f"no BFCL {CATEGORY} task uses only the classes {list(chosen)}")
        self._entries = {e["id"]: e for e in entries}
        self._user_turns = max(len(e["question"]) for e in entries)
        super().__init__(max_steps=max_steps)

    # --- tasks ------------------------------------------------------------------------
    def all_tasks(self) -> Sequence[Task]:
        return [_task(entry) for entry in self._entries.values()]

    def splits(self) -> Mapping[str, Sequence[str]]:
        out: dict[str, list[str]] = {"train": [], "test": []}
        for task_id in self._entries:
            out[split_of(task_id)].append(task_id)
        return out

    @property
    def max_turns(self) -> int:
        """Every call may take a turn, and every user turn ends with a reply."""
        return self.max_steps + self._user_turns

    def user_turns(self, task: Task) -> list[str]:
        """The task's user messages in order (BFCL gives one message per turn)."""
        return [_turn_text(turn) for turn in self._entries[task.id]["question"]]

    def user_reply(self, messages: Sequence[dict[str, Any]]) -> str | None:
        """BFCL's next scripted user turn, or None after the last. Which turns were given is
        read from the conversation (other user messages, such as a harness's format feedback,
        are not turns), so replaying a conversation gives the same user."""
        if self.task is None:
            raise RuntimeError("user_reply() before reset()")
        turns = self.user_turns(self.task)
        given = len(_turn_spans(messages, turns))
        return turns[given] if given < len(turns) else None

    # --- tools ------------------------------------------------------------------------
    def _tools(self) -> Sequence[Tool]:
        tools = []
        for class_name in self.classes:
            cls = _bfcl_class(class_name)
            for doc in load_func_docs(class_name):
                method = doc["name"]
                if not callable(getattr(cls, method, None)):
                    raise ValueError(f"BFCL doc names {class_name}.{method}, which is missing")
                tools.append(
                    Tool(
                        name=method,
                        description=compact_description(doc["description"])
                        if self.compact
                        else doc["description"],
                        parameters=to_json_schema(doc["parameters"]),
                        fn=self._tool_fn(class_name, method),
                        read_only=class_name == "MathAPI" or method in READ_ONLY,
                    )
                )
        return tools

    def _tool_fn(self, class_name: str, method: str) -> Callable[..., str]:
        def run(**arguments: Any) -> str:
            return self._invoke(class_name, method, arguments)

        return run

    def _invoke(self, class_name: str, method: str, arguments: dict[str, Any]) -> str:
        """Run the real method on this episode's instance. Failures inside the method come
        back as BFCL's executor reports them (`Error during execution: ...`), as text."""
        if class_name not in self._instances:
            raise ToolError(f"{method} is not available in this task ({class_name} is not used)")
        if method in self._entry.get("excluded_function", ()):
            raise ToolError(f"{method} is not available in this task")
        try:
            value = getattr(self._instances[class_name], method)(**arguments)
        except Exception as exc:  # BFCL shows the agent its own methods' failures as text
            return f"{ERROR_PREFIX}{exc}"
        return bfcl_result(value)

    def _reset(self, task: Task) -> None:
        from bfcl_eval.constants.executable_backend_config import STATELESS_CLASSES

        self._entry = self._entries[task.id]
        self._instances = {}
        for class_name in self._entry["involved_classes"]:
            instance = _bfcl_class(class_name)()
            if class_name not in STATELESS_CLASSES:
                config = self._entry["initial_config"].get(class_name, {})
                instance._load_scenario(copy.deepcopy(config), long_context=False)
            self._instances[class_name] = instance

    # --- the oracle -------------------------------------------------------------------
    def reference_calls(self, task: Task) -> list[list[Call]]:
        """BFCL's reference calls, per user turn, with named arguments."""
        methods = {
            method: inspect.signature(getattr(_bfcl_class(c), method))
            for c in self._entries[task.id]["involved_classes"]
            for method in _public_methods(_bfcl_class(c))
        }
        turns = []
        for turn in self._entries[task.id]["ground_truth"]:
            calls = []
            for text in turn:
                name = text.split("(", 1)[0].strip()
                if name not in methods:
                    raise ValueError(f"{task.id}: reference call {text!r} names no tool")
                calls.append(parse_reference_call(text, methods[name]))
            turns.append(calls)
        return turns

    def oracle(self, task: Task) -> Solver:
        return _reference_solver(self.reference_calls(task))

    # --- the verdict ------------------------------------------------------------------
    def verify(self, final_answer: str | None) -> Outcome:
        """The final state alone: this episode's instances against the reference calls' (the
        whole episode's verdict, turn by turn, is `verify_episode`)."""
        if self.task is None:
            raise RuntimeError("verify before reset()")
        reference = self._fresh()
        reference.reset(self.task)
        for turn in self.reference_calls(self.task):
            for call in turn:
                reference.step(call)
        return _state_outcome(self._instances, reference._instances, turn=None)

    def verify_episode(self, episode: EpisodeRecord) -> Outcome:
        """BFCL's `multi_turn_checker`, on a replay of the episode: after each user turn whose
        reference is not empty, the agent must have called a tool in that turn, every class's
        public state must equal the reference calls' state, and every reference result must be
        among the agent's results so far (in any order)."""
        task = episode.task
        reference_turns = self.reference_calls(task)
        agent_turns = _calls_per_turn(episode.messages, self.user_turns(task))
        agent, reference = self._fresh(), self._fresh()
        agent.reset(task)
        reference.reset(task)
        agent_results: list[str] = []
        for index, reference_calls in enumerate(reference_turns):
            calls = agent_turns[index] if index < len(agent_turns) else []
            agent_results += [agent.step(call).content for call in calls]
            expected = [reference.step(call).content for call in reference_calls]
            if not reference_calls:
                continue
            if not calls:
                return _failure(
                    "multi_turn:empty_turn_model_response",
                    f"no tool call in turn {index}",
                    index,
                )
            state = _state_outcome(agent._instances, reference._instances, turn=index)
            if not state.success:
                return state
            from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import (
                response_checker,
            )

            response = response_checker(agent_results, expected, index)
            if not response["valid"]:
                return _failure(
                    response["error_type"],
                    response["error_message"],
                    index,
                    missing=response["details"]["missing_items"],
                )
        return Outcome(True, 1.0, {"turns": len(reference_turns)})

    def _fresh(self) -> BfclMultiTurn:
        """A new environment like this one, for replays (the verdict never touches the
        episode's own instances)."""
        return type(self)(max_steps=self.max_steps, classes=self.classes, compact=self.compact)


def _task(entry: Mapping[str, Any]) -> Task:
    classes = sorted(entry["involved_classes"])
    return Task(
        id=entry["id"],
        family="+".join(classes),
        goal=_turn_text(entry["question"][0]),
        check={
            "involved_classes": classes,
            "user_turns": len(entry["question"]),
            "excluded_function": list(entry.get("excluded_function", [])),
        },
    )


def _turn_text(turn: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(str(m["content"]) for m in turn if m.get("role") == "user")


@functools.lru_cache(maxsize=16)
def _bfcl_class(class_name: str) -> type:
    import importlib

    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING

    bfcl_root()  # the install hint when bfcl-eval is absent
    cls: type = getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name]), class_name)
    return cls


def _public_methods(cls: type) -> list[str]:
    return [n for n, v in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")]


def _reference_solver(turns: list[list[Call]]) -> Solver:
    """Each turn's reference calls, then a short reply that hands the turn back to the user
    (the last reply is the final answer)."""
    for index, calls in enumerate(turns):
        last: Any = None
        for call in calls:
            last = yield call
        text = _turn_reply(calls, last)
        if index < len(turns) - 1:
            yield AskUser(text)
    return text


def _turn_reply(calls: Sequence[Call], last_result: Any) -> str:
    if not calls:
        return "I cannot do that with the tools I have."
    done = ", ".join(dict.fromkeys(call.name for call in calls))
    if isinstance(last_result, dict) and set(last_result) != {"result"}:
        shown = json.dumps(last_result, ensure_ascii=False)
    elif isinstance(last_result, dict):
        shown = str(last_result["result"])
    else:
        shown = ""
    return f"Done ({done}). {shown[:300]}".strip()


def _turn_spans(messages: Sequence[Mapping[str, Any]], turns: Sequence[str]) -> list[int]:
    """Positions in `messages` where each given user turn starts: the first user message, then
    each later user message that is the next scripted turn's text."""
    starts: list[int] = []
    for position, message in enumerate(messages):
        if message.get("role") != "user":
            continue
        expected = turns[len(starts)] if len(starts) < len(turns) else None
        if not starts or (expected is not None and message.get("content") == expected):
            starts.append(position)
    return starts


def _calls_per_turn(
    messages: Sequence[Mapping[str, Any]], turns: Sequence[str]
) -> list[list[Call]]:
    """The agent's tool calls grouped by the user turn they answer."""
    starts = _turn_spans(messages, turns)
    out: list[list[Call]] = [[] for _ in starts]
    turn = -1
    for position, message in enumerate(messages):
        if turn + 1 < len(starts) and position == starts[turn + 1]:
            turn += 1
        if message.get("role") != "assistant" or turn < 0:
            continue
        for tc in message.get("tool_calls") or ():
            fn = tc.get("function") or {}
            out[turn].append(
                Call(str(fn.get("name") or ""), fn.get("arguments") or "", tc.get("id", ""))
            )
    return out


def _state_outcome(
    agent: Mapping[str, Any], reference: Mapping[str, Any], turn: int | None
) -> Outcome:
    """BFCL's `state_checker`: every public attribute of every class equal to the reference."""
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import state_checker

    if set(agent) != set(reference):
        return _failure("multi_turn:instance_mismatch", "different classes", turn)
    result = state_checker(dict(agent), dict(reference))
    if result["valid"]:
        return Outcome(True, 1.0, {})
    differences = {k: repr(v)[:300] for k, v in result["details"]["differences"].items()}
    return _failure(result["error_type"], result["error_message"], turn, differences=differences)


def _failure(error_type: str, message: str, turn: int | None, **extra: Any) -> Outcome:
    details: dict[str, Any] = {"error_type": error_type, "reason": message, "turn": turn}
    details.update({k: _short(v) for k, v in extra.items()})
    return Outcome(False, 0.0, details)


def _short(value: Any) -> Any:
    text = json.dumps(value, default=repr)
    return value if len(text) <= 1000 else text[:1000]
