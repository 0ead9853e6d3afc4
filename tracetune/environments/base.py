"""The tool-environment interface: the heart of "verifiable".

One environment serves the log simulator, RLVR rewards and evaluation, so what is rewarded is
what is measured. Third parties implement `Environment` and name their class by dotted path in
params.yaml (`environment.class_path`); nothing else in tracetune needs to change.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jsonschema

from tracetune.environments.bounds import (
    MAX_ARGUMENT_CHARS,
    OutOfBounds,
    check_name,
    parse_arguments,
    shown,
    to_json,
)


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
    """What the agent sees after a call. `error` set: the call failed, the episode goes on."""

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


class ToolError(Exception):
    """Raised inside a tool for an expected failure (unknown id, bad state): shown to the agent."""


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
    the prompt the model reads is the same either way."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    grounded: Mapping[str, Grounded] = field(default_factory=dict)

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

        The default searches a large seeded draw; environments with structured ids override it.
        """
        for task in self.tasks(5000, seed=0):
            if task.id == task_id:
                return task
        raise KeyError(f"task {task_id!r} not found in {self.name}")

    # --- shared plumbing ----------------------------------------------------------------
    def tool_schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self._registry.values()]

    def grounded_arguments(self) -> dict[str, dict[str, Grounded]]:
        """Tool name -> argument -> grounding rule, for the tools that declare any."""
        return {t.name: dict(t.grounded) for t in self._registry.values() if t.grounded}

    def tool_names(self) -> list[str]:
        return list(self._registry)

    def reset(self, task: Task) -> list[dict[str, Any]]:
        """Start an episode; returns the opening messages (system + user)."""
        self.task = task
        self.calls_made = 0
        self.errors = 0
        self.call_log = []
        self.observations = []
        self._reset(task)
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": task.goal},
        ]

    def step(self, call: Call) -> Observation:
        if self.task is None:
            raise RuntimeError("call reset(task) before step()")
        if self.calls_made >= self.max_steps:
            return Observation(_err("step cap reached"), error="step_cap", done=True)
        self.calls_made += 1
        obs = self._execute(call)
        if obs.error:
            self.errors += 1
        key = _call_key(call)
        self.call_log.append((call.name, key, obs.error is None))
        self.observations.append(obs.content)
        return obs

    def _execute(self, call: Call) -> Observation:
        name = call.name
        tool = self._registry.get(name) if isinstance(name, str) else None
        if tool is None:
            known = ", ".join(self._registry)
            problem = _name_problem(name)
            if problem:
                return Observation(_err(f"{problem}; known: {known}"), "unknown_tool")
            return Observation(
                _err(f"unknown tool '{shown(name)}'; known: {known}"), "unknown_tool"
            )
        args = parse_arguments(call.arguments)
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
        try:
            return Observation(to_json(result))
        except (TypeError, ValueError) as exc:  # NaN, Infinity or a non-JSON object: a tool bug
            return Observation(_err(f"tool result is not JSON: {exc}"), "tool_exception")


def _err(message: str) -> str:
    return json.dumps({"error": message})


def _name_problem(name: object) -> str | None:
    try:
        check_name(name)
    except OutOfBounds as exc:
        return str(exc)
    return None


def _call_key(call: Call) -> str:
    """What makes two calls "the same call" (redundant-call detection), bounded in size: a
    refused name or refused arguments are keyed by a digest, never kept whole."""
    name = call.name if _name_problem(call.name) is None else _digest(call.name)
    args = parse_arguments(call.arguments)
    if isinstance(args, dict):
        canon = json.dumps(args, sort_keys=True)
    elif isinstance(call.arguments, str) and len(call.arguments) <= MAX_ARGUMENT_CHARS:
        canon = call.arguments
    else:
        canon = _digest(call.arguments)
    return f"{name}:{canon}"


def _digest(value: object) -> str:
    text = value if isinstance(value, str) else repr(type(value))
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


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


def iter_families(tasks: Sequence[Task]) -> Iterator[str]:
    seen: set[str] = set()
    for task in tasks:
        if task.family not in seen:
            seen.add(task.family)
            yield task.family
