"""A third-party environment through the real commands and loops (issue 19, items 1, 2, 4).

`examples/ticket_desk_env.py` is loaded by dotted path as a user would: `tracetune env oracle`
and `tracetune simulate-logs` run on its oracle (they were hard-wired to the built-in one), an
environment without an oracle gets a one-line refusal, a fixed list behaves as documented, a
hand-off tool ends the episode, and a string a tool returns reaches the agent verbatim.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.params_support import paths_under
from tracetune.cli import app
from tracetune.environments.base import (
    Call,
    EpisodeRecord,
    NoOracleError,
    declared_splits,
    draw_tasks,
    load_environment,
)
from tracetune.trajectories.episode import run_scripted

EXAMPLES = Path(__file__).parents[2] / "examples"
runner = CliRunner()


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))


def write_params(root: Path, class_path: str, **extra: object) -> Path:
    params = {"environment": {"class_path": class_path}, "paths": paths_under(root), **extra}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_env_oracle_runs_a_third_party_oracle(tmp_path: Path) -> None:
    params = write_params(tmp_path, "ticket_desk_env.TicketDesk")
    result = runner.invoke(app, ["env", "oracle", "--params", str(params), "--n", "200"])
    assert result.exit_code == 0, result.output
    assert "oracle TSR: 1.000 (13/13; the fixed list has 13 tasks)" in result.output


def test_env_oracle_says_when_there_is_no_oracle(tmp_path: Path) -> None:
    params = write_params(tmp_path, "unit_converter_env.UnitConverter")
    result = runner.invoke(app, ["env", "oracle", "--params", str(params), "--n", "5"])
    assert result.exit_code == 1
    assert "has no oracle" in result.output and "Traceback" not in result.output
    assert "KeyError" not in result.output


def test_simulate_logs_plays_a_third_party_oracle_with_faults(tmp_path: Path) -> None:
    faults = {"wrong_tool": 0.3, "error_retry": 0.3, "early_answer": 0.3, "wrong_answer": 0.2,
              "corrupt_line": 0.0, "duplicate_session": 0.0}  # fmt: skip
    params = write_params(
        tmp_path, "ticket_desk_env.TicketDesk", simulate={"files": 1, "faults": faults}
    )
    out = tmp_path / "logs"
    result = runner.invoke(
        app, ["simulate-logs", "--params", str(params), "--n", "60", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for p in out.glob("*.jsonl") for x in p.read_text().splitlines()]
    assert len({r["trajectory_id"] for r in records}) == 60
    assert {r["environment"] for r in records} == {"ticket_desk"}
    assert len({r["task_id"] for r in records}) == 13  # the list, visited again and again
    metrics = json.loads((tmp_path / "metrics" / "simulate.json").read_text())
    rates = metrics["fault_rates"]
    assert rates["early_answer"] > 0 and rates["wrong_tool"] > 0
    assert 0 < metrics["tsr"] < 1  # faults fail some episodes, the oracle solves the rest
    env = load_environment("ticket_desk_env.TicketDesk")
    called = {
        tc["function"]["name"]
        for r in records
        for m in r["messages"]
        for tc in m.get("tool_calls") or ()
    }
    assert called - set(env.tool_names())  # wrong tools were really called


def test_simulate_logs_refuses_without_an_oracle_and_keeps_old_logs(tmp_path: Path) -> None:
    params = write_params(tmp_path, "unit_converter_env.UnitConverter")
    out = tmp_path / "logs"
    out.mkdir()
    (out / "old.jsonl").write_text("{}\n")
    result = runner.invoke(
        app, ["simulate-logs", "--params", str(params), "--n", "5", "--out", str(out)]
    )
    assert result.exit_code == 1
    assert "cannot simulate logs" in result.output and "has no oracle" in result.output
    assert (out / "old.jsonl").exists()


def test_a_fixed_list_contract() -> None:
    env = load_environment("ticket_desk_env.TicketDesk")
    assert env.task_count() == 13 and env.families() == ["lookup", "priority", "handoff"]
    assert env.tasks(5, seed=1) == env.tasks(5, seed=1) != env.tasks(5, seed=2)
    with pytest.raises(ValueError, match="fixed list of 13 tasks: cannot give 14"):
        env.tasks(14, seed=0)
    with pytest.raises(ValueError, match="fixed list of 4 tasks of families"):
        env.tasks(5, seed=0, families=["lookup"])
    assert len(draw_tasks(env, 30, seed=0)) == 13
    repeated = draw_tasks(env, 30, seed=0, repeat=True)
    assert len(repeated) == 30 and {t.id for t in repeated} == {t.id for t in env.tasks(13, seed=0)}
    declared = declared_splits(env)
    assert declared is not None and declared["keep-103"] == "test"


def test_string_results_reach_the_agent_verbatim() -> None:
    env = load_environment("ticket_desk_env.TicketDesk")
    env.reset(env.task_by_id("lookup-101"))
    obs = env.step(Call("get_ticket", {"ticket_id": "T-101"}))
    assert obs.content == "T-101 | status: open | priority: low | Printer on floor 2 jams"


def test_a_hand_off_ends_the_episode() -> None:
    env = load_environment("ticket_desk_env.TicketDesk")
    task = env.task_by_id("human-106")
    episode = run_scripted(env, task, env.require_oracle(task))
    assert episode.ended_by == "terminated" and episode.outcome.success
    assert episode.messages[-1] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "T-106 handed to a human agent",
    }
    after = env.step(Call("set_priority", {"ticket_id": "T-106", "priority": "low"}))
    assert after.done and after.error == "ended"
    assert vars(env)["tickets"]["T-106"]["priority"] == "urgent"  # nothing ran after


def test_the_episode_verifier_wants_the_lookup_in_the_episode() -> None:
    env = load_environment("ticket_desk_env.TicketDesk")
    task = env.task_by_id("lookup-105")
    solved = run_scripted(env, task, env.require_oracle(task))
    assert solved.outcome.success
    env.reset(task)
    answer_only = EpisodeRecord(task, tuple(solved.messages[:2]), solved.final_answer)
    assert not env.verify_episode(answer_only).success  # the right word, never looked up
    assert not env.verify(solved.final_answer).success


def test_require_oracle_names_the_environment() -> None:
    env = load_environment("unit_converter_env.UnitConverter")
    with pytest.raises(NoOracleError, match="'unit_converter' has no oracle"):
        env.require_oracle(env.tasks(1, seed=0)[0])


def test_calls_after_a_hand_off_in_the_same_turn_never_run() -> None:
    """A model may write a hand-off and another call in one turn: the second gets a result
    saying it did not run (every call has one), and the world is as the hand-off left it."""
    from collections.abc import Sequence

    from tracetune.agent.rollout import (
        EnvPool,
        RolloutConfig,
        TurnOutput,
        TurnRequest,
        run_rollouts,
    )

    def block(name: str, arguments: dict[str, str]) -> str:
        return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"

    class HandOffThenWrite:
        name = "hasty"

        def generate(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]:
            text = block("hand_off", {"ticket_id": "T-106", "reason": "asked"}) + "\n"
            text += block("set_priority", {"ticket_id": "T-106", "priority": "low"})
            return [TurnOutput(text, 10, 10) for _ in requests]

    env = load_environment("ticket_desk_env.TicketDesk")
    task = env.task_by_id("human-106")
    (result,) = run_rollouts(
        [task], HandOffThenWrite(), EnvPool(lambda: env), RolloutConfig(), progress=False
    )
    assert result.ended_by == "terminated" and len(result.turns) == 1
    tools = [m for m in result.trajectory.messages if m.role == "tool"]
    assert [t.content for t in tools] == [
        "T-106 handed to a human agent",
        '{"error": "not run: the episode had ended"}',
    ]
    assert vars(env)["tickets"]["T-106"]["priority"] == "urgent"
    assert result.outcome.success  # the hand-off was right; the stray write never happened


def test_a_list_without_families_has_one_family_per_declared_split() -> None:
    from collections.abc import Mapping, Sequence

    from tracetune.environments.base import FixedTaskEnvironment, Outcome, Task, Tool

    class Quiz(FixedTaskEnvironment):
        name = "quiz"

        def _tools(self) -> Sequence[Tool]:
            params = {"type": "object", "properties": {}, "additionalProperties": False}
            return [Tool("noop", "Does nothing.", params, lambda: "ok", read_only=True)]

        def all_tasks(self) -> Sequence[Task]:
            return [Task(f"q{i}", "", f"Question {i}?") for i in range(5)]

        def splits(self) -> Mapping[str, Sequence[str]]:
            return {"train": ["q0", "q1", "q2"], "test": ["q3"]}

        def _reset(self, task: Task) -> None:
            pass

        def verify(self, final_answer: str | None) -> Outcome:
            return Outcome(False, 0.0)

    quiz = Quiz()
    assert quiz.families() == ["train", "test", "all"]
    assert quiz.task_by_id("q3").family == "test"
    assert {t.id for t in quiz.tasks(3, seed=0, families=["train"])} == {"q0", "q1", "q2"}
