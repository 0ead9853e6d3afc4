"""Scripted episodes: drive an environment with a solver generator and record the trajectory.

The oracle and the production-log simulator share this loop; model agents use the rollout engine
in `tracetune.agent`, which writes the same `Trajectory` records.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tracetune.environments.base import (
    ENDED_ANSWER,
    ENDED_STEP_CAP,
    ENDED_TERMINATED,
    AskUser,
    Call,
    Environment,
    EpisodeRecord,
    Observation,
    Outcome,
    Reply,
    Solver,
    Task,
)

__all__ = [
    "ScriptedEpisode",
    "Solver",
    "assistant_call_message",
    "observation_payload",
    "run_scripted",
]


@dataclass
class ScriptedEpisode:
    """The raw result of one scripted episode, before it is dressed as a `Trajectory`."""

    task: Task
    messages: list[dict[str, Any]]
    outcome: Outcome
    final_answer: str | None
    error_retries: int = 0
    observations: list[Observation] = field(default_factory=list)
    ended_by: str = ENDED_ANSWER

    @property
    def steps(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "assistant")

    def record(self) -> EpisodeRecord:
        """What the verifier sees (`Environment.verify_episode`)."""
        return EpisodeRecord(self.task, tuple(self.messages), self.final_answer, self.ended_by)


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
    """A tool result as a solver receives it: the JSON object, `{"result": value}` for any
    other value (a plain string a tool returned verbatim included), `{"error": text}` when
    the call failed with a message that is not JSON."""
    try:
        value = json.loads(obs.content)
    except json.JSONDecodeError:
        return {"error": obs.content} if obs.error else {"result": obs.content}
    return value if isinstance(value, dict) else {"result": value}


CallHook = Callable[[Call, int], list[Call]]


class UserKeptTalking(RuntimeError):
    """The user spoke after the solver's final answer: the solver and the conversation
    disagree on whose turn it is (e.g. a fault that skipped a turn of a scripted user whose
    later turns are new requests, not answers)."""


def run_scripted(
    env: Environment, task: Task, solver: Solver, before_call: CallHook | None = None
) -> ScriptedEpisode:
    """Run `solver` to its answer. `before_call(call, k)` may prepend faulty calls (simulator).

    The episode also ends when a call's observation says `done` (a terminating tool, the step
    cap): the solver is not asked again and there is no final answer. An `AskUser` the solver
    yields becomes an assistant message; the environment's user (`Environment.user_reply`)
    answers it with a user message sent back as a `Reply`, or ends the episode (that message
    is then the final answer). The user is also asked after the solver's returned answer, which
    must end the conversation: a solver that expects more from the user yields `AskUser`.
    """
    messages = env.reset(task)
    observations: list[Observation] = []
    retries = 0
    k = 0
    answer: str | None = None
    ended_by = ENDED_ANSWER
    try:
        step = next(solver)
        while ended_by == ENDED_ANSWER:
            if isinstance(step, AskUser):
                messages.append({"role": "assistant", "content": step.text})
                reply = env.user_reply(tuple(messages))
                if reply is None:
                    answer = step.text
                    solver.close()
                    break
                messages.append({"role": "user", "content": reply})
                step = solver.send(Reply(reply))
                continue
            call = step
            extra = before_call(call, k) if before_call else []
            for bad in [*extra, call]:
                k += 1
                messages.append(assistant_call_message(bad, f"call_{k}"))
                obs = env.step(bad)
                observations.append(obs)
                messages.append(obs.as_tool_message(f"call_{k}"))
                if bad is not call and obs.error:
                    retries += 1
                if obs.done:
                    ended_by = ENDED_STEP_CAP if obs.error else ENDED_TERMINATED
                    break
            if ended_by == ENDED_ANSWER:
                step = solver.send(observation_payload(observations[-1]))
    except StopIteration as stop:
        answer = stop.value
        messages.append({"role": "assistant", "content": answer})
        if env.user_reply(tuple(messages)) is not None:
            raise UserKeptTalking(
                f"task {task.id}: the user replied to the solver's final answer; a solver that "
                "expects a reply yields AskUser(text)"
            ) from None
    if ended_by != ENDED_ANSWER:
        solver.close()
    episode = ScriptedEpisode(task, messages, Outcome(False, 0.0), answer, retries, observations)
    episode.ended_by = ended_by
    episode.outcome = env.verify_episode(episode.record())
    return episode
