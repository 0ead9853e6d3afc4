"""The environment contract (docs/environments.md), checked on every environment we ship.

Each case is a real environment: the built-in `support_desk`, the fixed-list third-party example
`examples/ticket_desk_env.py` (declared splits, an oracle, a hand-off tool, an episode verifier)
and the minimal `examples/unit_converter_env.py` (no oracle: the oracle checks are skipped, the
rest still applies). A new environment joins by adding one line to `CASES`
(and, when it needs an optional package, one to `NEEDS`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tracetune.agent.rollout import EnvPool, RolloutConfig, ScriptedPolicy, run_rollouts
from tracetune.environments.base import (
    ENDED_TERMINATED,
    Call,
    Environment,
    EpisodeRecord,
    Outcome,
    declared_splits,
    load_environment,
)
from tracetune.trajectories.episode import run_scripted

EXAMPLES = Path(__file__).parents[2] / "examples"
CASES = {
    "support_desk": "tracetune.environments.support_desk.SupportDesk",
    "ticket_desk": "ticket_desk_env.TicketDesk",
    "unit_converter": "unit_converter_env.UnitConverter",
    # BFCL multi-turn (tracetune/environments/bfcl.py): skipped where bfcl-eval is absent.
    "bfcl_multi_turn": "tracetune.environments.bfcl.BfclMultiTurn",
}
# Cases that need an optional package: the case skips, saying how to install it, without it.
NEEDS = {"bfcl_multi_turn": ("bfcl_eval", "pip install --no-deps bfcl-eval==2026.3.23")}
SAMPLE = 40


@pytest.fixture(params=sorted(CASES))
def env(request: pytest.FixtureRequest) -> Iterator[Environment]:
    if request.param in NEEDS:
        module, install = NEEDS[request.param]
        pytest.importorskip(module, reason=f"{request.param} needs {module}: {install}")
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield load_environment(CASES[request.param])
    finally:
        sys.path.remove(str(EXAMPLES))


def sample_size(env: Environment) -> int:
    count = env.task_count()
    return SAMPLE if count is None else min(SAMPLE, count)


def test_tool_schemas_are_valid_function_schemas(env: Environment) -> None:
    schemas = env.tool_schemas()
    names = [s["function"]["name"] for s in schemas]
    assert schemas and len(set(names)) == len(names)
    for schema in schemas:
        assert schema["type"] == "function"
        assert schema["function"]["description"].strip()
        parameters = schema["function"]["parameters"]
        jsonschema.Draft202012Validator.check_schema(parameters)
        assert parameters["type"] == "object"
        json.dumps(schema)  # what the prompt carries must serialise


def test_tasks_are_deterministic_per_seed_and_distinct(env: Environment) -> None:
    n = sample_size(env)
    first, again = env.tasks(n, seed=3), env.tasks(n, seed=3)
    assert first == again
    assert len(first) == n and len({t.id for t in first}) == n
    assert all(t.goal.strip() and t.family for t in first)


def test_task_by_id_round_trips(env: Environment) -> None:
    for task in env.tasks(sample_size(env), seed=5):
        assert env.task_by_id(task.id) == task
    with pytest.raises(KeyError):
        env.task_by_id("no-such-task:at:all")


def test_families_cover_the_tasks_and_filter_them(env: Environment) -> None:
    families = env.families()
    assert families and len(set(families)) == len(families)
    assert {t.family for t in env.tasks(sample_size(env), seed=0)} <= set(families)
    for family in families:
        count = env.task_count([family])
        n = 2 if count is None else min(2, count)
        assert {t.family for t in env.tasks(n, seed=1, families=[family])} == {family}
    with pytest.raises(ValueError):
        env.tasks(1, seed=0, families=["no_such_family"])


def test_a_fixed_list_gives_at_most_itself(env: Environment) -> None:
    count = env.task_count()
    if count is None:
        pytest.skip(f"{env.name} generates tasks: no fixed list")
    everything = env.tasks(count, seed=0)
    assert len({t.id for t in everything}) == count
    with pytest.raises(ValueError, match=str(count)):
        env.tasks(count + 1, seed=0)


def test_declared_splits_name_known_tasks_once(env: Environment) -> None:
    declared = declared_splits(env)  # raises if an id is in two splits
    if declared is None:
        pytest.skip(f"{env.name} declares no split")
    for task_id in declared:
        env.task_by_id(task_id)
    assert set(declared.values()) >= {"train", "test"}


def test_the_oracle_solves_what_it_claims(env: Environment) -> None:
    tasks = env.tasks(sample_size(env), seed=11)
    if env.oracle(tasks[0]) is None:
        pytest.skip(f"{env.name} has no oracle")
    scripted = [run_scripted(env, t, env.require_oracle(t)) for t in tasks]
    assert [e.task.id for e in scripted if not e.outcome.success] == []
    # The same oracle through the rollout engine: the parser, the loop and the turn limit
    # that evaluation and RLVR use (written as model text, so a harness bug shows here).
    policy = ScriptedPolicy(env.require_oracle)
    config = RolloutConfig(max_turns=env.max_turns, batch_size=8)
    results = run_rollouts(tasks, policy, EnvPool(type(env)), config, progress=False)
    assert sum(r.outcome.success for r in results) == len(tasks)
    for episode, result in zip(scripted, results, strict=True):
        assert result.ended_by == episode.ended_by


def test_the_oracle_solves_as_much_behind_the_pseudonymisation(env: Environment) -> None:
    """Evaluation, RLVR and serving put the environment behind the ingest's PII scrub
    (`ingest.pii.at_serving`): whatever the environment, the same oracle, reading pseudonyms
    and sending values that are restored on the way in, must solve the same tasks."""
    from tracetune.config import PiiParams
    from tracetune.environments.pseudonymised import PseudonymisedEnvironment
    from tracetune.trajectories.pii import Scrubber

    tasks = env.tasks(min(12, sample_size(env)), seed=3)
    if env.oracle(tasks[0]) is None:
        pytest.skip(f"{env.name} has no oracle")
    scrubber = Scrubber(PiiParams(), b"conformance key, long enough", remember=True)
    policy = ScriptedPolicy(env.require_oracle)
    config = RolloutConfig(max_turns=env.max_turns, batch_size=4)
    wrapped = run_rollouts(
        tasks, policy, lambda: PseudonymisedEnvironment(type(env)(), scrubber), config,
        progress=False,
    )  # fmt: skip
    assert [t.id for t, r in zip(tasks, wrapped, strict=True) if not r.outcome.success] == []


def test_hostile_arguments_become_error_observations(env: Environment) -> None:
    task = env.tasks(1, seed=0)[0]
    hostile: list[str | dict[str, object]] = ["{not json", "[1, 2]", '"a string"', "null"]
    for schema in env.tool_schemas():
        name = schema["function"]["name"]
        properties = schema["function"]["parameters"].get("properties", {})
        attempts: list[str | dict[str, object]] = [*hostile, {"no_such_argument": 1}]
        if properties:  # `{}` is a valid call of a tool without parameters (BFCL's `pwd`)
            attempts.append({k: {"$ne": [1]} for k in properties})
        for arguments in attempts:
            env.reset(task)  # each attempt on a fresh episode: the step cap is not the point
            obs = env.step(Call(name, arguments))
            assert obs.error is not None, (name, arguments, obs.content)
            assert "error" in json.loads(obs.content)
    env.reset(task)
    obs = env.step(Call("rm -rf /", {}))
    assert obs.error == "unknown_tool"


def test_the_verifier_sees_the_whole_episode(env: Environment) -> None:
    """Every loop hands `verify_episode` every message: each assistant turn, call and tool
    result, and the final answer (spied on one environment instance, which still judges)."""
    tasks = env.tasks(min(6, sample_size(env)), seed=2)
    if env.oracle(tasks[0]) is None:
        pytest.skip(f"{env.name} has no oracle")
    seen: list[EpisodeRecord] = []
    judge = env.verify_episode

    def spy(episode: EpisodeRecord) -> Outcome:
        seen.append(episode)
        return judge(episode)

    env.verify_episode = spy  # type: ignore[method-assign]
    scripted = run_scripted(env, tasks[0], env.require_oracle(tasks[0]))
    assert list(seen[-1].messages) == scripted.messages
    assert seen[-1].final_answer == scripted.final_answer
    assert len(seen[-1].calls()) == sum(1 for m in scripted.messages if m["role"] == "tool")

    pool = EnvPool(lambda: env)
    config = RolloutConfig(max_turns=env.max_turns, batch_size=1)
    results = run_rollouts(tasks, ScriptedPolicy(env.require_oracle), pool, config, progress=False)
    records = seen[1:]
    assert len(records) == len(results)
    for record, result in zip(records, results, strict=True):
        logged = [m.model_dump(exclude_none=True) for m in result.trajectory.messages]
        assert [m["role"] for m in record.messages] == [m["role"] for m in logged]
        assert [m.get("content") for m in record.messages] == [m.get("content") for m in logged]
        assert record.ended_by == result.ended_by
        assert record.task.id == result.trajectory.task_id


def test_terminating_tools_end_every_loop(env: Environment) -> None:
    tasks = env.tasks(sample_size(env), seed=4)
    if env.oracle(tasks[0]) is None:
        pytest.skip(f"{env.name} has no oracle")
    ended = [run_scripted(env, t, env.require_oracle(t)) for t in tasks]
    handoffs = [e for e in ended if e.ended_by == ENDED_TERMINATED]
    if not handoffs:
        pytest.skip(f"no sampled task of {env.name} ends by a terminating tool")
    for episode in handoffs:
        assert episode.messages[-1]["role"] == "tool" and episode.final_answer is None
        run_scripted(env, episode.task, env.require_oracle(episode.task))
        assert env.step(Call(env.tool_names()[0], {})).error == "ended"  # nothing runs after
    policy = ScriptedPolicy(env.require_oracle)
    config = RolloutConfig(max_turns=env.max_turns, batch_size=4)
    results = run_rollouts([e.task for e in handoffs], policy, EnvPool(type(env)), config,
                           progress=False)  # fmt: skip
    assert {r.ended_by for r in results} == {ENDED_TERMINATED}
    assert all(r.outcome.success and r.trajectory.final_answer is None for r in results)
