"""BFCL multi-turn through tracetune (issue 19, item 6): the open proof of the environment
contract on a benchmark we did not write.

Real BFCL classes, tasks, reference answers and checkers from the installed `bfcl-eval`; the
whole module skips, saying how to install it, where it is absent. The contract checks common
to every environment are in test_env_conformance.py (parametrised over this adapter too).
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

pytest.importorskip(
    "bfcl_eval", reason="BFCL tests need bfcl-eval: pip install --no-deps bfcl-eval==2026.3.23"
)

from tests.params_support import paths_under
from tracetune.agent.rollout import EnvPool, RolloutConfig, ScriptedPolicy, run_rollouts
from tracetune.cli import app
from tracetune.environments import bfcl
from tracetune.environments.base import AskUser, Call, Solver, Task, declared_splits
from tracetune.environments.bfcl import BfclMultiTurn, _reference_solver
from tracetune.evaluation.harness import FLOOR_ANSWER, do_nothing
from tracetune.trajectories.episode import run_scripted

REPO = Path(__file__).parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def env() -> BfclMultiTurn:
    return BfclMultiTurn()


def solve(env: BfclMultiTurn, task: Task, turns: list[list[Call]]) -> Any:
    return run_scripted(env, task, _reference_solver(turns)).outcome


# --- the fixed list, its split and its tools ---------------------------------------------
def test_the_base_category_is_the_task_list(env: BfclMultiTurn) -> None:
    tasks = env.all_tasks()
    assert len(tasks) == env.task_count() == 200
    assert tasks[0].id == "multi_turn_base_0"
    assert tasks[0].goal.startswith("Move 'final_report.pdf' within document directory")
    assert tasks[0].family == "GorillaFileSystem+TwitterAPI"
    assert len(env.user_turns(tasks[0])) == 4
    assert env.max_turns == env.max_steps + 7  # the longest task has 7 user turns


def test_the_declared_split_is_every_fifth_task(env: BfclMultiTurn) -> None:
    declared = declared_splits(env)
    assert declared is not None
    test = sorted(i for i, s in declared.items() if s == "test")
    assert len(test) == 40 and len(declared) == 200
    assert all(int(i.rsplit("_", 1)[1]) % 5 == 4 for i in test)
    assert declared == declared_splits(BfclMultiTurn())  # deterministic
    car = BfclMultiTurn(classes=["VehicleControlAPI"])
    assert declared_splits(car) == {i: declared[i] for i in car.splits()["train"]} | {
        i: declared[i] for i in car.splits()["test"]
    }  # a subset keeps each task's side


def test_classes_restrict_tasks_and_tools() -> None:
    car = BfclMultiTurn(classes=["VehicleControlAPI"])
    assert car.task_count() == 19 and car.families() == ["VehicleControlAPI"]
    assert len(car.tool_names()) == 22 and "startEngine" in car.tool_names()
    assert "ls" not in car.tool_names()
    with pytest.raises(ValueError, match="unknown BFCL classes"):
        BfclMultiTurn(classes=["NoSuchAPI"])


def test_compact_drops_only_the_class_preamble() -> None:
    full = BfclMultiTurn(classes=["VehicleControlAPI"])
    short = BfclMultiTurn(classes=["VehicleControlAPI"], compact=True)
    pairs = zip(full.tool_schemas(), short.tool_schemas(), strict=True)
    for long_schema, short_schema in pairs:
        long_fn, short_fn = long_schema["function"], short_schema["function"]
        assert long_fn["parameters"] == short_fn["parameters"]
        assert long_fn["description"].startswith("This tool belongs to the vehicle control")
        assert long_fn["description"].endswith(short_fn["description"])
        assert "belongs to" not in short_fn["description"] and short_fn["description"]
    assert len(json.dumps(short.tool_schemas())) < 0.7 * len(json.dumps(full.tool_schemas()))
    assert short._fresh().compact  # the verdict's replays are built alike


def test_func_docs_become_valid_function_schemas(env: BfclMultiTurn) -> None:
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in env.tool_schemas()}
    assert len(schemas) == 128
    for parameters in schemas.values():
        jsonschema.Draft202012Validator.check_schema(parameters)
    # BFCL's own words for the types: dict -> object, float -> number, tuple -> array
    add = schemas["add"]
    assert add["properties"]["a"]["type"] == "number" and add["required"] == ["a", "b"]
    assert add["additionalProperties"] is False
    converted = bfcl.to_json_schema(
        {"type": "dict", "properties": {"p": {"type": "tuple", "items": {"type": "float"}}}}
    )
    assert converted["properties"]["p"] == {"type": "array", "items": {"type": "number"}}
    with pytest.raises(ValueError, match="unknown BFCL parameter type"):
        bfcl.to_json_schema({"type": "dict", "properties": {"p": {"type": "complex"}}})


def test_reference_calls_take_parameter_names() -> None:
    def sort(self: object, file_name: str, reverse: bool = False) -> None: ...

    call = bfcl.parse_reference_call("sort('final_report.pdf')", inspect.signature(sort))
    assert call == Call("sort", {"file_name": "final_report.pdf"})
    call = bfcl.parse_reference_call("sort(file_name='a', reverse=True)", inspect.signature(sort))
    assert call.arguments == {"file_name": "a", "reverse": True}
    with pytest.raises(ValueError):  # parsed, never evaluated
        bfcl.parse_reference_call("sort(__import__('os').getcwd())", inspect.signature(sort))


def test_tools_run_the_real_methods_on_the_episodes_state(env: BfclMultiTurn) -> None:
    task = env.task_by_id("multi_turn_base_0")
    env.reset(task)
    assert env.step(Call("pwd", {})).content == '{"current_working_directory": "/workspace"}'
    assert env.step(Call("cd", {"folder": "document"})).error is None
    listing = json.loads(env.step(Call("ls", {})).content)
    assert set(listing["current_directory_content"]) == {"final_report.pdf", "previous_report.pdf"}
    # a class the task does not involve, and a function the task excludes, are refused
    assert env.step(Call("startEngine", {"ignitionMode": "START"})).error == "tool_error"
    assert "not available" in env.step(Call("cp", {"source": "a", "destination": "b"})).content
    env.reset(task)  # a fresh episode starts from the task's initial state again
    assert env.step(Call("pwd", {})).content == '{"current_working_directory": "/workspace"}'


def test_the_user_gives_each_turn_once_and_ignores_harness_messages(env: BfclMultiTurn) -> None:
    task = env.task_by_id("multi_turn_base_1")
    turns = env.user_turns(task)
    messages = env.reset(task)
    messages.append({"role": "assistant", "content": "Listed."})
    assert env.user_reply(messages) == turns[1]
    messages += [{"role": "user", "content": turns[1]}, {"role": "assistant", "content": "x"}]
    messages.append({"role": "user", "content": "Your last message could not be parsed (x)"})
    messages.append({"role": "assistant", "content": "Moved."})
    assert env.user_reply(messages) == turns[2]  # format feedback is not a user turn
    for turn in turns[2:]:
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": "ok"}]
    assert env.user_reply(messages) is None


# --- the oracle, the floor and the verdict -----------------------------------------------
def test_the_oracle_solves_every_base_task(env: BfclMultiTurn) -> None:
    """Oracle TSR 1.000 over all 200 tasks, each user turn through the user hook."""
    failed = []
    for task in env.all_tasks():
        episode = run_scripted(env, task, env.require_oracle(task))
        users = [m for m in episode.messages if m["role"] == "user"]
        assert len(users) == len(env.user_turns(task))
        if not episode.outcome.success:
            failed.append((task.id, episode.outcome.details))
    assert failed == []


def test_the_oracle_through_the_rollout_engine() -> None:
    """The loop evaluation and RLVR use: model text parsed, the user asked after each reply."""
    car = BfclMultiTurn(classes=["VehicleControlAPI"])
    tasks = car.all_tasks()
    config = RolloutConfig(max_turns=car.max_turns, batch_size=8)
    pool = EnvPool(lambda: BfclMultiTurn(classes=["VehicleControlAPI"]))
    results = run_rollouts(tasks, ScriptedPolicy(car.require_oracle), pool, config, progress=False)
    assert [r.outcome.success for r in results] == [True] * len(tasks)


def test_the_do_nothing_floor_is_zero(env: BfclMultiTurn) -> None:
    """The floor evaluation measures (answer at once, no call; and answering every later user
    turn without a call): BFCL's every task needs a call, so it solves none."""

    def says_ok(task: Task) -> Solver:
        for _ in env.user_turns(task)[1:]:
            yield AskUser("OK.")
        return "OK."

    tasks = env.all_tasks()
    # as evaluation's `run_floor` plays it: through the rollout engine, every user turn given
    config = RolloutConfig(max_turns=env.max_turns, batch_size=16)
    floor = run_rollouts(tasks, ScriptedPolicy(do_nothing), EnvPool(BfclMultiTurn), config,
                         progress=False)  # fmt: skip
    assert len(floor) == 200 and sum(r.outcome.success for r in floor) == 0
    assert all(not r.trajectory.messages[2].tool_calls for r in floor)  # it answered at once
    # ... and declined every later request the same way (a finished solver used to answer
    # BFCL's second turn with "(solver failed: RuntimeError)").
    for r in floor:
        said = [m.content for m in r.trajectory.messages if m.role == "assistant"]
        assert set(said) == {FLOOR_ANSWER}, said
        users = sum(m.role == "user" for m in r.trajectory.messages)
        assert len(said) == users and r.ended_by == "answer"
    outcomes = [run_scripted(env, t, says_ok(t)).outcome for t in tasks]
    assert sum(o.success for o in outcomes) == 0
    assert {o.details["error_type"] for o in outcomes} == {"multi_turn:empty_turn_model_response"}


def test_a_missing_call_fails_by_state_or_response(env: BfclMultiTurn) -> None:
    for task in env.tasks(30, seed=3):
        turns = env.reference_calls(task)
        last = max(i for i, t in enumerate(turns) if t)
        shortened = [list(t) for t in turns]
        shortened[last] = shortened[last][:-1]
        outcome = solve(env, task, shortened)
        assert not outcome.success and outcome.details["turn"] == last, (task.id, outcome)


def test_a_wrong_value_fails_the_state_check(env: BfclMultiTurn) -> None:
    task = env.task_by_id("multi_turn_base_0")
    turns = env.reference_calls(task)
    assert turns[0][1] == Call("mkdir", {"dir_name": "temp"})
    turns[0][1] = Call("mkdir", {"dir_name": "tmp"})
    outcome = solve(env, task, turns)
    assert not outcome.success
    assert outcome.details["error_type"] == "multi_turn:instance_state_mismatch"
    assert outcome.details["turn"] == 0


def test_verify_alone_judges_the_final_state(env: BfclMultiTurn) -> None:
    """`verify` (what a loop without the episode could call) compares the final states."""
    task = env.task_by_id("multi_turn_base_0")
    run_scripted(env, task, env.require_oracle(task))
    assert env.verify(None).success
    turns = env.reference_calls(task)
    solve(env, task, [turns[0], turns[1], turns[2], turns[3][:1]])  # previous_report not moved
    assert not env.verify(None).success


def test_calls_in_the_wrong_turn_fail(env: BfclMultiTurn) -> None:
    """All the work in the first turn: the state after turn 0 is ahead of the reference."""
    task = env.task_by_id("multi_turn_base_0")
    turns = env.reference_calls(task)
    early = [[c for t in turns for c in t]] + [[] for _ in turns[1:]]
    outcome = solve(env, task, early)
    assert not outcome.success and outcome.details["turn"] == 0


def test_read_only_tools_can_be_repeated(env: BfclMultiTurn) -> None:
    """What `read_only` claims (the simulator repeats only these): every read-only call of
    every reference episode, made twice, changes no verdict."""
    read_only = env.read_only_tools()
    assert "ls" in read_only and "add" in read_only and "mv" not in read_only
    assert "get_current_speed" not in read_only  # a random reading
    for task in env.all_tasks():
        turns = [
            [c for call in t for c in ([call, call] if call.name in read_only else [call])]
            for t in env.reference_calls(task)
        ]
        assert solve(env, task, turns).success, task.id


def test_without_bfcl_eval_the_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bfcl_eval", None)  # what an absent package imports as
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps bfcl-eval"):
        bfcl.bfcl_root()


# --- the commands, with params pointing at the adapter -----------------------------------
def bfcl_params(root: Path, **extra: Any) -> Path:
    """params-bfcl.yaml with every path under `root`."""
    params = yaml.safe_load((REPO / "params-bfcl.yaml").read_text())
    params["paths"] = paths_under(root)
    params["ingest"]["source"] = str(root / "data/raw_logs")
    for key, value in extra.items():
        params[key] = {**params.get(key, {}), **value}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def read_logs(folder: Path) -> list[dict[str, Any]]:
    """The readable sessions of simulated logs (the injected corrupt lines are not)."""
    out = []
    for line in (x for p in sorted(folder.glob("*.jsonl")) for x in p.read_text().splitlines()):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def test_params_bfcl_differs_from_params_only_where_it_says() -> None:
    """params-bfcl.yaml is params.yaml with BFCL's blocks: the rest stays in step."""
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    ours = yaml.safe_load((REPO / "params-bfcl.yaml").read_text())
    changed = {
        ("environment", "class_path"), ("environment", "max_steps"), ("environment", "kwargs"),
        ("simulate", "n_trajectories"), ("simulate", "faults"), ("gates", "curated"),
        ("curate", "step_limit"), ("registry", "gate"), ("base_model", "build"),
        ("sft", "max_length"),
    }  # fmt: skip
    for section, value in base.items():
        for key, sub in value.items() if isinstance(value, dict) else [(None, value)]:
            if (section, key) not in changed:
                mine = ours[section] if key is None else ours[section][key]
                assert mine == sub, (section, key)
    faults = {k: v for k, v in ours["simulate"]["faults"].items() if k != "early_answer"}
    assert faults | {"skip_user_turn": 0.2} == base["simulate"]["faults"]
    build = ours["base_model"]["build"] | {"max_positions": 2048}
    assert build == base["base_model"]["build"]


def test_env_oracle_and_simulate_logs_run_on_bfcl(tmp_path: Path) -> None:
    params = bfcl_params(tmp_path, simulate={"files": 1, "n_trajectories": 80})
    result = runner.invoke(app, ["env", "oracle", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "oracle TSR: 1.000 (19/19; the fixed list has 19 tasks)" in result.output

    result = runner.invoke(app, ["simulate-logs", "--params", str(params)])
    assert result.exit_code == 0, result.output
    records = read_logs(tmp_path / "data/raw_logs")
    assert {r["environment"] for r in records} == {"bfcl_multi_turn"}
    car = BfclMultiTurn(classes=["VehicleControlAPI"])
    assert {r["task_id"] for r in records} <= {t.id for t in car.all_tasks()}
    several = [r for r in records if sum(m["role"] == "user" for m in r["messages"]) > 1]
    assert several  # the later user turns are in the logs
    metrics = json.loads((tmp_path / "metrics" / "simulate.json").read_text())
    assert metrics["trajectories"] == 80 and 0 < metrics["tsr"] <= 1

    result = runner.invoke(app, ["data", "ingest", "--params", str(params)])
    assert result.exit_code == 0, result.output
    batches = list((tmp_path / "data/ingested/batches").glob("*.jsonl"))
    ingested = [json.loads(x) for p in batches for x in p.read_text().splitlines()]
    quarantined = metrics["corrupt_lines"]
    assert len(ingested) + quarantined == metrics["lines"]  # accepted + quarantined = read


@pytest.mark.slow
def test_simulated_bfcl_logs_pass_the_data_gates(tmp_path: Path) -> None:
    """simulate -> ingest -> raw gate -> curate -> split -> curated gate, as dvc.yaml runs
    them, with params-bfcl.yaml (the declared split decides the held-out tasks)."""
    params = bfcl_params(tmp_path)
    for command in (
        ["simulate-logs"],
        ["data", "ingest"],
        ["data", "validate-raw"],
        ["data", "curate"],
        ["data", "split"],
        ["data", "validate-curated"],
    ):
        result = runner.invoke(app, [*command, "--params", str(params)])
        assert result.exit_code == 0, (command, result.output)
    heldout = json.loads((tmp_path / "data/curated/heldout_tasks.json").read_text())
    test_ids = set(BfclMultiTurn(classes=["VehicleControlAPI"]).splits()["test"])
    assert {t["task_id"] for t in heldout["tasks"]} == test_ids


def test_early_answers_with_a_multi_turn_user_answer_every_later_turn(tmp_path: Path) -> None:
    """The simulator's early-answer fault with BFCL's several user turns: the agent stops
    calling and gives the same answer to every later request (it raised "the user replied to
    the solver's final answer" before), and BFCL's verdict fails those sessions."""
    # skip_user_turn stays off, as params-bfcl.yaml has it: BFCL's later turns are new requests
    faults = {
        "early_answer": 0.5,
        "corrupt_line": 0.0,
        "duplicate_session": 0.0,
        "skip_user_turn": 0.0,
    }
    params = bfcl_params(tmp_path, simulate={"files": 1, "n_trajectories": 40, "faults": faults})
    result = runner.invoke(app, ["simulate-logs", "--params", str(params)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics" / "simulate.json").read_text())
    assert metrics["fault_rates"]["early_answer"] > 0.2
    assert 0 < metrics["tsr"] < 1
    records = read_logs(tmp_path / "data/raw_logs")
    car = BfclMultiTurn(classes=["VehicleControlAPI"])
    for record in records:  # every session still hears every user turn
        users = [m for m in record["messages"] if m["role"] == "user"]
        assert len(users) == len(car.user_turns(car.task_by_id(record["task_id"])))


def test_the_simulator_cannot_skip_a_turn_of_a_user_who_goes_on(env: BfclMultiTurn) -> None:
    """`skip_user_turn` makes the simulated agent act without waiting for an answer; BFCL's
    later user turns are new requests, so no answer can be skipped: every episode is logged
    without that fault (it used to crash simulate-logs with "the user replied to the
    solver's final answer")."""
    import random

    from tracetune.config import FaultRates, SimulateParams
    from tracetune.trajectories.simulator import SKIP_USER_TURN, simulate_episode

    rates = FaultRates().model_copy(update={SKIP_USER_TURN: 1.0})
    params = SimulateParams().model_copy(update={"faults": rates})
    for task in env.all_tasks()[:12]:
        record, faults = simulate_episode(env, task, random.Random(task.id), params)
        assert SKIP_USER_TURN not in faults
        assert record.ended_by in ("answer", "terminated", "step_cap")
        users = [m for m in record.messages if m["role"] == "user"]
        assert len(users) == len(env.user_turns(task))  # every request was put and answered
