"""The tool-environment interface: the heart of "verifiable".

One environment serves the log simulator, RLVR rewards and evaluation, so what is rewarded is
what is measured. Third parties implement `Environment` (or `FixedTaskEnvironment` for a fixed
list of tasks) and name their class by dotted path in params.yaml (`environment.class_path`);
nothing else in tracetune needs to change. The contract, with what is optional and what each
default does, is in docs/environments.md; `tests/unit/test_env_conformance.py` checks it.
"""

from __future__ import annotations

import importlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import jsonschema


@lru_cache(maxsize=1024)
def _validator(schema_json: str) -> jsonschema.Draft202012Validator:
    """A checked validator for one tool schema (keyed by its canonical JSON; validators are
    stateless, so environments share them)."""
    schema = json.loads(schema_json)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@dataclass(frozen=True)
class Task:
    """One task instance. `check` holds what the verifier needs (never a reference trajectory)."""

    id: str
    family: str
    goal: str
    check: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Call:
    """A tool call as the agent emitted it. `arguments` may be a JSON string (possibly broken)."""

    name: str
    arguments: str | dict[str, Any]
    id: str = "call_0"


@dataclass(frozen=True)
class Observation:
    """What the agent sees after a call. `error` set: the call failed, the episode goes on.

    `done`: the episode is over after this result (the step cap, or a terminating tool such as
    a hand-off to a human); every loop stops asking the agent for turns.
    """

    content: str
    error: str | None = None
    done: bool = False

    def as_tool_message(self, tool_call_id: str) -> dict[str, Any]:
        return {"role": "tool", "tool_call_id": tool_call_id, "content": self.content}


@dataclass(frozen=True)
class Outcome:
    success: bool
    reward: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AskUser:
    """What a `Solver` yields to speak to the user instead of calling a tool: an assistant
    message with `text` and no tool call (a question: "which order?", "shall I cancel it?").

    The loop asks `Environment.user_reply` for the user's answer and sends the solver a
    `Reply`; when the user has nothing more to say (None) the episode ends there, `text` is its
    final answer, and the solver is closed.
    """

    text: str


@dataclass(frozen=True)
class Reply:
    """What a `Solver` receives for an `AskUser`: the user's next message."""

    text: str


class ToolError(Exception):
    """Raised inside a tool for an expected failure (unknown id, bad state): shown to the agent."""


class NoOracleError(LookupError):
    """The environment has no reference solver for a task (`Environment.oracle` gave None)."""


# A reference solver (the oracle): yields each `Call`, receives that call's parsed result (a
# dict: the tool's JSON object, `{"result": value}` for any other value, `{"error": ...}` for a
# failed call) and returns the final answer. `Environment.oracle(task)` gives one per task.
# To speak to the user mid-episode (ask for a missing detail, ask for a "yes") it yields
# `AskUser(text)` and receives a `Reply` with the user's answer (`Environment.user_reply`):
#
#     reply = yield AskUser("Which order is it?")
#     order = yield Call("get_order", {"order_id": re.search(r"O-\d+", reply.text)[0]})
#     return f"Order {order['order_id']} is {order['status']}."
#
# The sent value is typed `Any` because it depends on what was yielded (a dict for a `Call`, a
# `Reply` for an `AskUser`).
Solver = Generator[Call | AskUser, Any, str]

# The declared split names the pipeline reads (`Environment.splits`): logged episodes of a
# `test` task are held out and evaluated, those of a `train` task train.
TRAIN_SPLIT = "train"
HELDOUT_SPLIT = "test"

# How an episode ended (EpisodeRecord.ended_by).
ENDED_ANSWER = "answer"  # the agent wrote a final answer (a turn without a tool call)
ENDED_TERMINATED = "terminated"  # a terminating tool ran (a hand-off): no final answer
ENDED_STEP_CAP = "step_cap"  # the environment's `max_steps` calls were spent
ENDED_TURN_CAP = "turn_cap"  # the loop's assistant-turn limit was reached


@dataclass(frozen=True)
class EpisodeRecord:
    """Everything one episode did, as the verifier sees it (`Environment.verify_episode`).

    `messages` are the whole conversation in the OpenAI chat format: the opening system and
    user messages, every assistant message (tool calls and text), every tool result and any
    later user turn. `final_answer` is the last assistant text when the episode ended by an
    answer, else None. The world's final state is the environment's own (verification runs
    on the environment the episode ran in).
    """

    task: Task
    messages: tuple[dict[str, Any], ...]
    final_answer: str | None
    ended_by: str = ENDED_ANSWER

    def assistant_messages(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("role") == "assistant"]

    def user_messages(self) -> list[str]:
        """Every user turn's text, the task's goal first."""
        return [str(m.get("content") or "") for m in self.messages if m.get("role") == "user"]

    def calls(self) -> list[tuple[Call, str | None]]:
        """Every tool call in order, with the content of its tool result (None: no result)."""
        results = {
            m.get("tool_call_id"): str(m.get("content") or "")
            for m in self.messages
            if m.get("role") == "tool"
        }
        out: list[tuple[Call, str | None]] = []
        for message in self.assistant_messages():
            for tc in message.get("tool_calls") or ():
                fn = tc.get("function") or {}
                call = Call(str(fn.get("name") or ""), fn.get("arguments") or "", tc.get("id", ""))
                out.append((call, results.get(tc.get("id"))))
        return out


# A number standing alone in text: ids such as O-10423 or C-0042 are not numbers. What a
# verifier reads as an amount, and what a `Grounded(number=True)` argument may take.
STANDALONE_NUMBER = re.compile(r"(?<![\w.-])-?\d+(?:\.\d+)?(?![\w-])")


@dataclass(frozen=True)
class Grounded:
    """How one argument is grounded: `pattern`, a regex its value matches in the conversation
    (e.g. `O-\\d+`); `number`, a JSON number among the conversation's standalone numbers.
    Neither: a run of words of a user or tool message (a product name)."""

    pattern: str | None = None
    number: bool = False


@dataclass(frozen=True)
class Tool:
    """`grounded`: arguments whose value can only be one the conversation already shows (an
    id, an email); the agent runtime may decode them under that constraint
    (`tracetune.agent.grounding`, `environment.grounded_arguments`). Not part of the schema:
    the prompt the model reads is the same either way.

    `terminates`: a successful call ends the episode after its result (a hand-off to a human,
    "submit"): the observation has `done=True` and no loop asks the agent for another turn.
    A call that fails (bad arguments, a `ToolError`) does not end it.

    `read_only`: a call changes nothing (a lookup), so repeating it is harmless; the log
    simulator's redundant calls and runaway loops repeat only these.

    `fn` returns any JSON-serialisable value; a `str` is passed to the agent verbatim (ids are
    not quoted, a JSON text keeps its key order), anything else is serialised as JSON.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    grounded: Mapping[str, Grounded] = field(default_factory=dict)
    terminates: bool = False
    read_only: bool = False

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class Environment(ABC):
    """Base class: subclasses register tools and tasks; the call plumbing lives here.

    Subclasses implement `_tools`, `tasks`, `_reset` and `verify`. `step` validates the call
    against the tool's JSON schema, runs the tool, and turns every failure into an observation
    the agent can recover from; after `max_steps` calls the episode is over.

    Optional, each with a default that keeps the simple case simple: `families`, `task_by_id`,
    `task_count`, `splits` (declared train/test task ids), `oracle` (a reference solver),
    `verify_episode` (a verdict on the whole episode), `max_turns`.
    """

    name: str = "environment"
    system_prompt: str = "You are a helpful assistant with tools."

    def __init__(self, max_steps: int = 15) -> None:
        self.max_steps = max_steps
        self.task: Task | None = None
        self.calls_made = 0
        self.errors = 0
        self.call_log: list[tuple[str, str, bool]] = []
        self.observations: list[str] = []  # every tool result of the episode, errors included
        self.terminated = False  # a terminating tool ran: the episode is over
        self._registry: dict[str, Tool] = {t.name: t for t in self._tools()}
        # Schemas are checked once per process, not per call or per environment: evaluation and
        # RLVR build one environment per episode, and the check dominated their set-up time.
        self._validators = {
            t.name: _validator(json.dumps(t.parameters, sort_keys=True))
            for t in self._registry.values()
        }

    # --- what subclasses provide -------------------------------------------------------
    @abstractmethod
    def _tools(self) -> Sequence[Tool]: ...

    @abstractmethod
    def tasks(self, n: int, seed: int, families: Sequence[str] | None = None) -> list[Task]:
        """`n` distinct task instances, deterministic for `seed`."""

    @abstractmethod
    def _reset(self, task: Task) -> None:
        """Restore the world state the task starts from."""

    @abstractmethod
    def verify(self, final_answer: str | None) -> Outcome:
        """Judge the episode from the final answer and/or the world state."""

    def families(self) -> list[str]:
        return sorted({t.family for t in self.tasks(200, seed=0)})

    def task_by_id(self, task_id: str) -> Task:
        """Rebuild a task from its id: evaluation re-runs held-out tasks named in the logs.

        The default searches a large seeded draw; environments with structured ids override it
        (a `FixedTaskEnvironment` looks the id up in an index). Raises KeyError when unknown.
        """
        for task in self.tasks(5000, seed=0):
            if task.id == task_id:
                return task
        raise KeyError(f"task {task_id!r} not found in {self.name}")

    def task_count(self, families: Sequence[str] | None = None) -> int | None:
        """How many distinct tasks `tasks()` can give (None: unbounded, a generator of tasks)."""
        return None

    def splits(self) -> Mapping[str, Sequence[str]] | None:
        """Task ids the environment itself declares as splits, e.g. `{"train": [...], "test":
        [...]}` (a benchmark's own train/test lists). None (the default): no declared split,
        the split stage decides by its seeded hash. When declared, logged trajectories of a
        `test` task are always held out and those of a `train` task never are; evaluation
        draws its tasks from `test` and RLVR from `train`."""
        return None

    def oracle(self, task: Task) -> Solver | None:
        """The reference solver for `task` (a `Solver` generator), or None when there is none.

        `tracetune env oracle` checks it reaches TSR 1.0 through the real tools, and
        `tracetune simulate-logs` plays it with injected faults as a production agent."""
        return None

    def verify_episode(self, episode: EpisodeRecord) -> Outcome:
        """Judge the whole episode: every assistant message, call, tool result and user turn,
        and the world's final state. Every loop (evaluation, RLVR rewards, the simulator, the
        oracle check) calls this; the default judges the final answer with `verify`, so an
        environment that needs no more than the answer and the state implements only that."""
        return self.verify(episode.final_answer)

    @property
    def max_turns(self) -> int:
        """Assistant turns an episode may take: by default one per allowed call plus the
        answer, so the step cap, not the loop, decides when a busy agent stops. Override (a
        class attribute is enough) when an episode needs more, e.g. several user turns."""
        return self.max_steps + 1

    def user_reply(self, messages: Sequence[dict[str, Any]]) -> str | None:
        """The user's next message, given the conversation so far (which ends with an
        assistant message without a tool call), or None: the user has nothing more to say and
        the episode ends with that message as its final answer.

        The default, None, is a single-turn user: the task's goal is the only user message.
        An environment whose tasks need a second user turn (a missing detail the agent must
        ask for, an explicit "yes" before a write, a benchmark's successive user turns)
        overrides it with a scripted user; `self.task` is the episode's task. Every loop
        calls it: evaluation and RLVR rollouts, serving, the oracle check and the simulator.
        Keep it a function of the conversation (a reply already given is in `messages`), so
        replaying a conversation gives the same user.
        """
        return None

    # --- shared plumbing ----------------------------------------------------------------
    def tool_schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self._registry.values()]

    def grounded_arguments(self) -> dict[str, dict[str, Grounded]]:
        """Tool name -> argument -> grounding rule, for the tools that declare any."""
        return {t.name: dict(t.grounded) for t in self._registry.values() if t.grounded}

    def tool_names(self) -> list[str]:
        return list(self._registry)

    def read_only_tools(self) -> set[str]:
        return {t.name for t in self._registry.values() if t.read_only}

    def terminating_tools(self) -> set[str]:
        return {t.name for t in self._registry.values() if t.terminates}

    def require_oracle(self, task: Task) -> Solver:
        """`oracle(task)`, or NoOracleError saying so in one line."""
        solver = self.oracle(task)
        if solver is None:
            raise NoOracleError(
                f"environment {self.name!r} has no oracle for task {task.id!r} "
                f"({type(self).__name__}.oracle returned None)"
            )
        return solver

    def reset(self, task: Task) -> list[dict[str, Any]]:
        """Start an episode; returns the opening messages (system + user)."""
        self.task = task
        self.calls_made = 0
        self.errors = 0
        self.call_log = []
        self.observations = []
        self.terminated = False
        self._reset(task)
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": task.goal},
        ]

    def step(self, call: Call) -> Observation:
        if self.task is None:
            raise RuntimeError("call reset(task) before step()")
        if self.terminated:
            return Observation(_err("the episode has ended"), error="ended", done=True)
        if self.calls_made >= self.max_steps:
            return Observation(_err("step cap reached"), error="step_cap", done=True)
        self.calls_made += 1
        obs = self._execute(call)
        if obs.error:
            self.errors += 1
        elif self._terminates(call.name):
            self.terminated = True
            obs = Observation(obs.content, None, done=True)
        key = _call_key(call)
        self.call_log.append((call.name, key, obs.error is None))
        self.observations.append(obs.content)
        return obs

    def _execute(self, call: Call) -> Observation:
        tool = self._registry.get(call.name)
        if tool is None:
            known = ", ".join(self._registry)
            return Observation(_err(f"unknown tool '{call.name}'; known: {known}"), "unknown_tool")
        args = _parse_arguments(call.arguments)
        if isinstance(args, str):
            return Observation(_err(args), "bad_arguments")
        problem = jsonschema.exceptions.best_match(self._validators[tool.name].iter_errors(args))
        if problem is not None:
            return Observation(_err(f"invalid arguments: {problem.message}"), "bad_arguments")
        try:
            result = tool.fn(**args)
        except ToolError as exc:
            return Observation(_err(str(exc)), "tool_error")
        except Exception as exc:  # a tool bug must not end the episode
            return Observation(_err(f"tool failed: {type(exc).__name__}: {exc}"), "tool_exception")
        return Observation(result_text(result))

    def _terminates(self, tool_name: str) -> bool:
        tool = self._registry.get(tool_name)
        return tool is not None and tool.terminates


def result_text(result: Any) -> str:
    """A tool's return value as the agent reads it: a string verbatim, anything else as JSON."""
    if isinstance(result, str):
        return result
    return json.dumps(result, ensure_ascii=False, sort_keys=True)


def _err(message: str) -> str:
    return json.dumps({"error": message})


def _parse_arguments(raw: str | dict[str, Any]) -> dict[str, Any] | str:
    """Arguments as a dict, or a message saying why they are unusable (never `eval`)."""
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        return f"arguments are not valid JSON: {exc.msg} at char {exc.pos}"
    if not isinstance(value, dict):
        return "arguments must be a JSON object"
    return value


def _call_key(call: Call) -> str:
    args = _parse_arguments(call.arguments)
    canon = json.dumps(args, sort_keys=True) if isinstance(args, dict) else str(call.arguments)
    return f"{call.name}:{canon}"


def load_environment(class_path: str, **kwargs: Any) -> Environment:
    """Instantiate an environment from `package.module:Class` or `package.module.Class`."""
    module_name, _, attr = class_path.replace(":", ".").rpartition(".")
    if not module_name:
        raise ValueError(f"environment.class_path '{class_path}' must be 'module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"cannot import environment module '{module_name}': {exc}") from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"module '{module_name}' has no attribute '{attr}'")
    env = cls(**kwargs)
    if not isinstance(env, Environment):
        raise TypeError(f"{class_path} is not a tracetune Environment subclass")
    return env


class FixedTaskEnvironment(Environment):
    """An environment whose tasks are a fixed list (a benchmark's train and test tasks).

    Subclasses provide `all_tasks()` (every task, in a stable order, ids unique) and, as for any
    environment, `_tools`, `_reset` and `verify` (or `verify_episode`). The contract the base
    implements, and `tests/unit/test_env_conformance.py` checks:

    - `tasks(n, seed, families=None)`: `n` distinct tasks of the list (of those families),
      a seeded sample, the same for the same seed; at most the whole list. Asking for more
      than exist raises ValueError saying how many there are, never repeats or invents tasks.
    - `task_by_id(id)`: an index lookup (KeyError when unknown), nothing drawn.
    - `families()`: the distinct families of the list, in order of first appearance. A task
      whose `family` is "" takes its declared split's name (`train`, `test`; `all` outside any
      split), so a list without families has one family per split (`splits()` must then not
      call `tasks()` or `task_by_id()`).
    - `task_count(families)`: how many `tasks()` can give.
    - `splits()`: override to declare the list's train/test ids (default None).
    """

    @abstractmethod
    def all_tasks(self) -> Sequence[Task]:
        """Every task of the environment, in a stable order."""

    def _task_index(self) -> dict[str, Task]:
        index: dict[str, Task] | None = getattr(self, "_fixed_index", None)
        if index is None:
            index = {}
            split_of: dict[str, str] | None = None
            for task in self.all_tasks():
                if not task.family:  # a list without families: one family per declared split
                    if split_of is None:
                        split_of = declared_splits(self) or {}
                    task = replace(task, family=split_of.get(task.id, "all"))
                if task.id in index:
                    raise ValueError(f"{self.name}: task id {task.id!r} appears twice")
                index[task.id] = task
            self._fixed_index = index
        return index

    def _pool(self, families: Sequence[str] | None) -> list[Task]:
        tasks = list(self._task_index().values())
        if not families:
            return tasks
        unknown = set(families) - {t.family for t in tasks}
        if unknown:
            raise ValueError(f"{self.name}: unknown task families {sorted(unknown)}")
        wanted = set(families)
        return [t for t in tasks if t.family in wanted]

    def tasks(self, n: int, seed: int, families: Sequence[str] | None = None) -> list[Task]:
        import random

        pool = self._pool(families)
        if n > len(pool):
            which = f" of families {sorted(families)}" if families else ""
            raise ValueError(
                f"{self.name} has a fixed list of {len(pool)} tasks{which}: cannot give {n}"
            )
        return random.Random(seed).sample(pool, n)

    def task_by_id(self, task_id: str) -> Task:
        try:
            return self._task_index()[task_id]
        except KeyError:
            raise KeyError(f"task {task_id!r} not found in {self.name}") from None

    def families(self) -> list[str]:
        return list(iter_families(list(self._task_index().values())))

    def task_count(self, families: Sequence[str] | None = None) -> int | None:
        return len(self._pool(families))


def draw_tasks(
    env: Environment,
    n: int,
    seed: int,
    families: Sequence[str] | None = None,
    *,
    repeat: bool = False,
) -> list[Task]:
    """`n` tasks where `env.tasks` may have fewer: for a fixed list, all of it (`repeat=False`)
    or whole seeded passes over it until `n` (`repeat=True`: production logs visit the same
    task again, and the simulator writes such logs). Unbounded environments: `env.tasks`."""
    count = env.task_count(families)
    if count is None or n <= count:
        return env.tasks(n, seed=seed, families=families)
    if not repeat or count == 0:
        return env.tasks(count, seed=seed, families=families)
    out: list[Task] = []
    rounds = 0
    while len(out) < n:
        out += env.tasks(count, seed=seed + rounds, families=families)[: n - len(out)]
        rounds += 1
    return out


def declared_splits(env: Environment) -> dict[str, str] | None:
    """Task id -> the split the environment declares it in (`train`, `test`, ...); None when
    the environment declares none. A task id in two splits is a contract breach: ValueError."""
    declared = env.splits()
    if not declared:
        return None
    out: dict[str, str] = {}
    for name, ids in declared.items():
        for task_id in ids:
            if out.setdefault(task_id, name) != name:
                raise ValueError(
                    f"{env.name}: task {task_id!r} is in splits {out[task_id]!r} and {name!r}"
                )
    return out


def iter_families(tasks: Sequence[Task]) -> Iterator[str]:
    seen: set[str] = set()
    for task in tasks:
        if task.family not in seen:
            seen.add(task.family)
            yield task.family
