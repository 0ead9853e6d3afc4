"""The rollout engine with scripted policies: the harness itself must be exact.

An oracle that plays through the engine (its calls written as `<tool_call>` text, parsed,
executed, verified) must score 100%; malformed turns, unknown tools and caps must end up as
failed steps and labelled failures, never as exceptions.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tracetune.agent.rollout import (
    BAD_FORMAT,
    FORMAT_FEEDBACK,
    EnvPool,
    RolloutConfig,
    ScriptedPolicy,
    TurnOutput,
    TurnRequest,
    env_factory_from_params,
    failure_label,
    run_rollouts,
)
from tracetune.config import EnvironmentParams, Pricing
from tracetune.environments.base import Call, Task
from tracetune.environments.support_desk import FAMILIES, SupportDesk, oracle_solver
from tracetune.trajectories.io import read_trajectories

ENV = EnvironmentParams()


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return SupportDesk().tasks(40, seed=11)


def test_oracle_scores_100_percent_through_the_harness(tasks: list[Task], tmp_path: Path) -> None:
    out = tmp_path / "rollouts.jsonl"
    results = run_rollouts(
        tasks,
        ScriptedPolicy(oracle_solver),
        env_factory_from_params(ENV),
        RolloutConfig(batch_size=8),
        pricing=Pricing(),
        progress=False,
        out_path=out,
    )
    assert {t.family for t in tasks} == set(FAMILIES)  # every family is exercised
    assert [r.trajectory.task_id for r in results] == [t.id for t in tasks]
    failed = [(r.trajectory.task_id, r.outcome.details) for r in results if not r.outcome.success]
    assert failed == []
    for r in results:
        traj = r.trajectory
        assert traj.success and traj.failure is None and r.ended_by == "answer"
        assert traj.steps == sum(m.role == "assistant" for m in traj.messages)
        assert traj.usage.completion_tokens > 0 and traj.cost_usd > 0
        assert traj.messages[-1].content == traj.final_answer
    # Written in the production-log schema, read back by the same reader as the logs.
    assert [t.trajectory_id for t in read_trajectories(out)] == [
        r.trajectory.trajectory_id for r in results
    ]


def test_batched_and_sequential_scripted_rollouts_agree(tasks: list[Task]) -> None:
    pool = EnvPool(env_factory_from_params(ENV))

    def run(batch: int) -> list[Any]:
        results = run_rollouts(
            tasks[:12], ScriptedPolicy(oracle_solver), pool, RolloutConfig(batch_size=batch),
            progress=False,
        )  # fmt: skip
        return [r.trajectory.model_dump(exclude={"timestamp", "latency_s"}) for r in results]

    assert run(1) == run(5)


class ScriptPolicy:
    """Replays fixed texts per turn (the last one repeats), whatever the task."""

    name = "script"

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)

    def generate(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]:
        return [TurnOutput(self.texts[min(r.turn, len(self.texts) - 1)], 10, 5) for r in requests]


def call_text(name: str, arguments: Any) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def status_task() -> Task:
    return next(t for t in SupportDesk().tasks(30, seed=1) if t.family == "order_status")


def one(texts: Sequence[str], task: Task, **config: Any) -> Any:
    envs = env_factory_from_params(ENV, max_steps=config.pop("steps", 15))
    [result] = run_rollouts(
        [task], ScriptPolicy(texts), envs, RolloutConfig(**config), progress=False
    )
    return result


def test_malformed_turn_is_a_failed_step_the_agent_sees_and_can_recover_from() -> None:
    task = status_task()
    order = task.params["args"][0]
    status = task.check["word"]
    texts = ['<tool_call>{"name": "get_order", "arguments": {', call_text(
        "get_order", {"order_id": order}), f"Order {order} is {status}."]  # fmt: skip
    result = one(texts, task)
    messages = result.trajectory.messages
    assert messages[2].role == "assistant" and messages[2].tool_calls is None
    assert messages[3].role == "user" and messages[3].content.startswith(FORMAT_FEEDBACK)
    assert result.step_errors == [BAD_FORMAT]
    assert result.trajectory.success  # it recovered
    assert result.trajectory.error_retries == 1
    assert result.trajectory.steps == 3


@pytest.mark.parametrize(
    ("texts", "label", "ended_by"),
    [
        (["<tool_call>not json</tool_call>"], "bad_format", "turn_cap"),
        ([call_text("lookup_record", {"id": "x"}), "It is shipped."], "unknown_tool", "answer"),
        ([call_text("get_order", {"order": "x"}), "It is shipped."], "bad_arguments", "answer"),
        ([call_text("get_order", {"order_id": "O-1"})], "step_cap", "step_cap"),
    ],
)
def test_failures_are_labelled_never_raised(texts: list[str], label: str, ended_by: str) -> None:
    task = status_task()
    if label == "bad_arguments":  # make the answer wrong too: the label is the first fault
        task = Task(task.id, task.family, task.goal, {"word": "refunded"}, task.params)
    result = one(texts, task, max_turns=4, steps=2)
    assert not result.trajectory.success
    assert result.trajectory.failure == label
    assert result.ended_by == ended_by
    if ended_by == "turn_cap":
        assert result.trajectory.steps == 4


def test_wrong_answer_and_unhandled_tool_error_labels() -> None:
    assert failure_label(False, "answer", []) == "wrong_answer"
    assert failure_label(False, "answer", ["tool_error"]) == "tool_error_unhandled"
    assert failure_label(False, "turn_cap", ["tool_error"]) == "step_cap"
    assert failure_label(False, "answer", ["tool_error", "bad_arguments"]) == "bad_arguments"
    assert failure_label(True, "answer", ["bad_format"]) is None


def test_a_failing_solver_ends_its_episode_not_the_rollout() -> None:
    def broken(task: Task) -> Generator[Call, dict[str, Any], str]:
        yield Call("get_order", {"order_id": "O-10001"})
        raise RuntimeError("solver bug")

    results = run_rollouts(
        SupportDesk().tasks(3, seed=2), ScriptedPolicy(broken), env_factory_from_params(ENV),
        progress=False,
    )  # fmt: skip
    assert len(results) == 3
    assert all(not r.trajectory.success for r in results)
