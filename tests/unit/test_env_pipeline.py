"""The pipeline honours what an environment declares (issue 19, items 1, 4 and 5).

Declared train/test splits decide the split stage, the evaluation set and RLVR's tasks; the
defaults name no family of any one environment; the evaluation's turn limit comes from the
environment and the episodes it cuts are counted; the do-nothing floor is measured through
the same engine and verifier as every other arm. Real environments, real rollouts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tracetune.agent.rollout import EnvPool, RolloutConfig, ScriptedPolicy, run_rollouts
from tracetune.config import SplitParams, load_params, parse_params
from tracetune.environments.base import Environment, declared_splits, load_environment
from tracetune.environments.support_desk import SupportDesk
from tracetune.evaluation import harness
from tracetune.evaluation.metrics import deltas, summarize
from tracetune.evaluation.report import render_report
from tracetune.training.grpo import training_tasks
from tracetune.trajectories.split import declared_test_tasks, read_heldout_tasks, split_curated

REPO = Path(__file__).parents[2]
EXAMPLES = REPO / "examples"


@pytest.fixture
def desk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Environment]:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    yield load_environment("ticket_desk_env.TicketDesk")


def logged_line(task_id: str, family: str, k: int = 0) -> str:
    return json.dumps(
        {"trajectory_id": f"{task_id}#{k}", "task_id": task_id, "family": family, "messages": []}
    )


# --- item 1: declared splits and family-free defaults ------------------------------------------
def test_the_split_honours_declared_splits(desk: Environment, tmp_path: Path) -> None:
    """Every test-split task is held out and every train-split task trains, whatever the hash
    says (a 0.5 held-out fraction would otherwise put about half on each side)."""
    declared = declared_splits(desk)
    assert declared is not None
    tasks = desk.tasks(13, seed=0)
    lines = [logged_line(t.id, t.family, k) for t in tasks for k in range(2)]
    params = SplitParams(heldout_fraction=0.5, seed=3)
    report = split_curated(lines, tmp_path, params, declared, test_tasks=declared_test_tasks(desk))
    train = {json.loads(x)["task_id"] for x in (tmp_path / "train.jsonl").open()}
    heldout = {json.loads(x)["task_id"] for x in (tmp_path / "heldout.jsonl").open()}
    assert heldout == {i for i, side in declared.items() if side == "test"}
    assert train == {i for i, side in declared.items() if side == "train"}
    assert report.heldout == 2 * len(heldout)
    listed = {t["task_id"] for t in read_heldout_tasks(tmp_path)["tasks"]}
    assert listed == heldout


def test_declared_test_tasks_are_evaluated_even_unlogged(desk: Environment, tmp_path: Path) -> None:
    split_curated([], tmp_path, SplitParams(), declare := declared_splits(desk),
                  test_tasks=declared_test_tasks(desk))  # fmt: skip
    assert declare is not None
    entries = read_heldout_tasks(tmp_path)["tasks"]
    assert {e["task_id"] for e in entries} == {i for i, s in declare.items() if s == "test"}
    assert all(e["trajectories"] == 0 and e["logged"] == 0 for e in entries)


def test_every_logged_heldout_task_is_in_the_evaluation_set(tmp_path: Path) -> None:
    """Not only the tasks that kept a golden episode: production's failures count too."""
    params = SplitParams(heldout_families=["order_status"])
    golden = [logged_line("order_status:O-1", "order_status")]
    logged = [("order_status:O-1", "order_status"), ("order_status:O-2", "order_status")] * 2
    split_curated(golden, tmp_path, params, logged=logged)
    entries = {e["task_id"]: e for e in read_heldout_tasks(tmp_path)["tasks"]}
    assert set(entries) == {"order_status:O-1", "order_status:O-2"}
    assert entries["order_status:O-1"]["trajectories"] == 1
    assert entries["order_status:O-2"] == entries["order_status:O-2"] | {
        "trajectories": 0,
        "logged": 2,
    }


def test_rlvr_trains_on_the_declared_train_split_only(desk: Environment) -> None:
    declared = declared_splits(desk)
    assert declared is not None
    tasks = training_tasks(desk, 50, 0, None, set(), SplitParams(heldout_fraction=0.9))
    assert {t.id for t in tasks} == {i for i, s in declared.items() if s == "train"}
    assert training_tasks(desk, 50, 0, ["lookup"], set()) and all(
        t.family == "lookup" for t in training_tasks(desk, 50, 0, ["lookup"], set())
    )
    with pytest.raises(ValueError, match="not families of ticket_desk"):
        training_tasks(desk, 50, 0, ["customer_tier"], set())


def test_defaults_name_no_family_of_the_built_in_environment() -> None:
    repo = load_params(REPO / "params.yaml")
    assert repo.rlvr.families == [] and parse_params({}).rlvr.families == []
    assert parse_params({"rlvr": {"families": "all"}}).rlvr.families == []
    built_in = set(SupportDesk().families())
    text = (REPO / "params.yaml").read_text()
    named = [f for f in built_in if f in text.split("rlvr:")[1].split("\n\n")[0]]
    assert named == []


# --- item 4: the turn limit -------------------------------------------------------------------
def test_the_turn_limit_comes_from_the_environment(desk: Environment) -> None:
    ev = parse_params({}).evaluate
    assert ev.max_turns is None
    # support_desk: max_steps + 2 (a multi-turn family spends one turn asking the user)
    assert harness.turn_limit(ev, SupportDesk(max_steps=15)) == 17
    assert harness.turn_limit(ev, desk) == desk.max_steps + 1 == 7
    assert harness.turn_limit(parse_params({"evaluate": {"max_turns": 8}}).evaluate, desk) == 8


def test_episodes_cut_by_the_turn_limit_are_counted() -> None:
    """The oracle needs 5 turns for a refund: a limit of 3 cuts every one, and says so."""
    env = SupportDesk()
    tasks = env.tasks(6, seed=0, families=["refund_latest_order"])
    oracle = ScriptedPolicy(env.require_oracle)

    def arm(max_turns: int) -> dict[str, Any]:
        config = RolloutConfig(max_turns=max_turns, batch_size=6)
        results = run_rollouts(tasks, oracle, EnvPool(SupportDesk), config, progress=False)
        return summarize([r.trajectory for r in results], max_turns=max_turns)

    cut = arm(3)
    assert cut["tsr"] == 0.0 and cut["cut_by_turn_limit"] == 6
    whole = arm(env.max_turns)
    assert whole["tsr"] == 1.0 and whole["cut_by_turn_limit"] == 0


def test_a_hand_off_on_the_last_turn_is_not_a_cut(desk: Environment) -> None:
    tasks = [t for t in desk.tasks(13, seed=0) if t.family == "handoff"]
    config = RolloutConfig(max_turns=1, batch_size=4)
    results = run_rollouts(
        tasks, ScriptedPolicy(desk.require_oracle), EnvPool(type(desk)), config, progress=False
    )
    trajectories = [r.trajectory for r in results]
    ends = frozenset(desk.terminating_tools())
    assert summarize(trajectories, max_turns=1, terminating=ends)["cut_by_turn_limit"] == 0
    assert summarize(trajectories, max_turns=1)["cut_by_turn_limit"] == len(tasks)


# --- item 5: the floor -----------------------------------------------------------------------
def floor_arm(env: Environment, tasks: list[Any]) -> dict[str, Any]:
    config = RolloutConfig(max_turns=env.max_turns, batch_size=8)
    policy = ScriptedPolicy(harness.do_nothing, name=harness.FLOOR)
    results = run_rollouts(tasks, policy, EnvPool(type(env)), config, progress=False)
    for r in results:
        assert r.trajectory.steps == 1 and r.trajectory.final_answer == harness.FLOOR_ANSWER
        assert not any(m.tool_calls for m in r.trajectory.messages)
    return summarize([r.trajectory for r in results], harness.FREE, max_turns=env.max_turns)


def test_the_floor_shows_what_a_task_set_gives_away(desk: Environment) -> None:
    """On the ticket desk's test split one task of five passes untouched (keep-103): an agent
    that scores 0.2 there has added nothing."""
    declared = declared_splits(desk)
    assert declared is not None
    test = [desk.task_by_id(i) for i, s in declared.items() if s == "test"]
    floor = floor_arm(desk, test)
    assert floor["tsr"] == 0.2 and floor["per_family"]["priority"] == {"tsr": 0.5, "n": 2}
    assert floor["cost_per_task_usd"] == 0.0
    assert floor_arm(SupportDesk(), SupportDesk().tasks(20, seed=0))["tsr"] == 0.0


def test_the_report_puts_the_floor_beside_every_arm() -> None:
    from tracetune.trajectories.schema import Trajectory

    def traj(success: bool, family: str = "lookup") -> Trajectory:
        return Trajectory.model_validate(
            {"trajectory_id": "t", "task_id": "x", "family": family,
             "timestamp": "2026-01-01T00:00:00+00:00", "model": "m", "success": success,
             "steps": 1, "usage": {"prompt_tokens": 10, "completion_tokens": 2},
             "cost_usd": 0.0, "latency_s": 0.1, "messages": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a"}]}
        )  # fmt: skip

    cand = summarize([traj(True), traj(True), traj(False)], max_turns=4)
    prompt = summarize([traj(True), traj(False), traj(False)], max_turns=4)
    floor = summarize([traj(True), traj(False), traj(False)], max_turns=4)
    prod = summarize([traj(False)])
    delta = deltas(cand, prompt, prod, floor)
    payload = {"model": "sft", "model_path": "m", "n_tasks": 3, "candidate": cand,
               "baseline_prompt_only": prompt, "baseline_production": prod,
               "baseline_floor": floor, "delta": delta}  # fmt: skip
    assert delta["tsr_vs_floor"] == pytest.approx(1 / 3, abs=1e-6)
    assert delta["prompt_only_tsr_vs_floor"] == 0.0
    text = render_report(payload, {"max_turns": 4})
    summary = text.split("## Summary")[1].split("##")[0]
    assert "| metric | candidate | prompt-only (base) | production logs | do-nothing floor |" in (
        summary
    )
    assert "| TSR over the floor | +33.3 pts | +0.0 pts | -33.3 pts | +0.0 pts |" in summary
    assert "| cut by the turn limit | 0 | 0 | n/a | 0 |" in summary
    assert "| do-nothing floor | +33.3 pts [" in text
    families = text.split("## TSR per task family")[1].split("##")[0]
    assert "do-nothing floor" in families
    old = {k: v for k, v in payload.items() if k != "baseline_floor"}  # a file from before
    before = render_report(old, {})
    assert "do-nothing floor" not in before and "| candidate | prompt-only (base) |" in before


def test_a_third_party_environment_through_simulate_ingest_curate_split(
    desk: Environment, tmp_path: Path
) -> None:
    """The data stages as dvc runs them, on the fixed-list example: its oracle's simulated
    logs are ingested and curated, and the split stage holds out exactly its test split."""
    from tasks import curate, ingest, simulate, split
    from tests.params_support import paths_under

    faults = {"corrupt_line": 0.0, "duplicate_session": 0.0, "pii_in_user_text": 0.0}
    params = parse_params(
        {
            "environment": {"class_path": "ticket_desk_env.TicketDesk"},
            "paths": paths_under(tmp_path),
            "simulate": {"n_trajectories": 80, "files": 1, "faults": faults},
            "ingest": {"source": str(tmp_path / "data/raw_logs")},
        }
    )
    simulate.run(params)
    ingest.run(params)
    curate.run(params)
    summary = split.run(params)
    declared = declared_splits(desk)
    assert declared is not None
    curated = params.paths.curated_dir
    heldout = {json.loads(x)["task_id"] for x in (curated / "heldout.jsonl").open()}
    train = {json.loads(x)["task_id"] for x in (curated / "train.jsonl").open()}
    assert heldout and train
    assert all(declared[i] == "test" for i in heldout)
    assert all(declared[i] == "train" for i in train)
    listed = read_heldout_tasks(curated)["tasks"]
    assert {e["task_id"] for e in listed} == {i for i, s in declared.items() if s == "test"}
    assert sum(e["logged"] for e in listed) > sum(e["trajectories"] for e in listed)
    assert summary["split"]["heldout_tasks"] == 5
