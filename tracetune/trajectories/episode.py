"""Scripted episodes: drive an environment with a solver generator and record the trajectory.

The oracle and the production-log simulator share this loop; model agents use the rollout engine
in `tracetune.agent`, which writes the same `Trajectory` records.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from tracetune.environments.base import Call, Environment, Observation, Outcome, Task

Solver = Generator[Call, dict[str, Any], str]


@dataclass
class EpisodeRecord:
    """The raw result of one episode, before it is dressed as a `Trajectory`."""

    task: Task
    messages: list[dict[str, Any]]
    outcome: Outcome
    final_answer: str | None
    error_retries: int = 0
    observations: list[Observation] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "assistant")


def assistant_call_message(call: Call, call_id: str) -> dict[str, Any]:
    args = call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": args}}
        ],
    }


def observation_payload(obs: Observation) -> dict[str, Any]:
    try:
        value = json.loads(obs.content)
    except json.JSONDecodeError:
        return {"error": obs.content}
    return value if isinstance(value, dict) else {"result": value}


CallHook = Callable[[Call, int], list[Call]]


def run_scripted(
    env: Environment, task: Task, solver: Solver, before_call: CallHook | None = None
) -> EpisodeRecord:
    """Run `solver` to its answer. `before_call(call, k)` may prepend faulty calls (simulator)."""
    messages = env.reset(task)
    observations: list[Observation] = []
    retries = 0
    k = 0
    try:
        call = next(solver)
        while True:
            extra = before_call(call, k) if before_call else []
            for bad in [*extra, call]:
                k += 1
                messages.append(assistant_call_message(bad, f"call_{k}"))
                obs = env.step(bad)
                observations.append(obs)
                messages.append(obs.as_tool_message(f"call_{k}"))
                if bad is not call and obs.error:
                    retries += 1
            call = solver.send(observation_payload(observations[-1]))
    except StopIteration as stop:
        answer: str | None = stop.value
    messages.append({"role": "assistant", "content": answer})
    return EpisodeRecord(task, messages, env.verify(answer), answer, retries, observations)
