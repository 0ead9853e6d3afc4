"""Multi-turn users: the environment's user hook drives every loop (issue 19, item 3).

Real parts throughout: the support desk's scripted users, its verifier, the scripted loop, the
batched rollout engine with the oracle and with a real tiny model, the simulator and ingest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tracetune.agent.rollout import (
    EnvPool,
    ModelPolicy,
    RolloutConfig,
    ScriptedPolicy,
    env_factory_from_params,
    run_rollouts,
)
from tracetune.config import EnvironmentParams, IngestParams, Pricing, parse_params
from tracetune.data.features import roles_ok
from tracetune.environments.base import AskUser, Call, Environment, Reply, Solver, Task
from tracetune.environments.support_desk import CONFIRM, SupportDesk
from tracetune.trajectories.episode import run_scripted

MULTI_TURN = ["ask_order_id", "confirm_write"]


def roles(messages: Sequence[Any]) -> str:
    """s u a(nswer) c(all) t(ool), as the gates' role string writes them."""
    out = []
    for m in messages:
        m = m if isinstance(m, dict) else m.model_dump(exclude_none=True)
        code = {"system": "s", "user": "u", "tool": "t"}.get(m["role"])
        out.append(code or ("c" if m.get("tool_calls") else "a"))
    return "".join(out)


def task_of(env: SupportDesk, family: str, action: str | None = None) -> Task:
    tasks = env.tasks(20, seed=4, families=[family])
    return next(t for t in tasks if action is None or t.params["args"][1] == action)


def oracle(env: Environment) -> Any:
    def solver_for(task: Task) -> Solver:
        solver = env.oracle(task)
        assert solver is not None
        return solver

    return solver_for


# --- the scripted loop -------------------------------------------------------------------------
def test_the_oracle_asks_for_the_missing_order_id_and_the_user_gives_it(env: SupportDesk) -> None:
    task = task_of(env, "ask_order_id")
    order_id = task.params["args"][0]
    assert order_id not in task.goal  # the detail is missing from the first message
    episode = run_scripted(env, task, oracle(env)(task))
    assert episode.outcome.success, episode.outcome.details
    assert roles(episode.messages) == "suaucta"
    question, reply = episode.messages[2], episode.messages[3]
    assert question["role"] == "assistant" and "?" in question["content"]
    assert reply["role"] == "user" and order_id in reply["content"]
    assert episode.final_answer == episode.messages[-1]["content"]  # the last assistant text


def test_guessing_without_asking_fails_and_the_user_stays_silent(env: SupportDesk) -> None:
    task = task_of(env, "ask_order_id")
    status = task.check["word"]

    def guesser(task: Task) -> Solver:
        return f"Your order is {status}."  # the right word, never looked up
        yield  # pragma: no cover

    episode = run_scripted(env, task, guesser(task))
    assert roles(episode.messages) == "sua"  # a statement gets no reply
    assert not episode.outcome.success
    assert any("never looked up" in r for r in episode.outcome.details["reasons"])


def test_an_order_id_nobody_gave_fails_though_the_answer_is_right(env: SupportDesk) -> None:
    task = task_of(env, "ask_order_id")
    order_id = task.params["args"][0]

    def clairvoyant(task: Task) -> Solver:
        order = yield Call("get_order", {"order_id": order_id})  # the id, before anyone said it
        yield AskUser("Could you confirm your order id?")
        return f"Order {order_id} is {order['status']}."

    episode = run_scripted(env, task, clairvoyant(task))
    assert roles(episode.messages) == "suctaua"
    assert env.verify(episode.final_answer).success  # the answer and the lookup alone pass
    assert not episode.outcome.success
    assert episode.outcome.details["reasons"] == [
        f"order {order_id} was used before the user gave it"
    ]


def test_a_question_the_user_cannot_answer_ends_the_episode_with_it(env: SupportDesk) -> None:
    task = task_of(env, "confirm_write", "cancel")

    def off_topic(task: Task) -> Solver:
        yield AskUser("Is there anything else?")  # not about this order: no "yes"
        raise AssertionError("the user has nothing to say: the solver is closed")

    episode = run_scripted(env, task, off_topic(task))
    assert roles(episode.messages) == "sua"
    assert episode.final_answer == "Is there anything else?"
    assert not episode.outcome.success


@pytest.mark.parametrize("action", ["cancel", "refund"])
def test_confirmation_before_the_write_passes(env: SupportDesk, action: str) -> None:
    task = task_of(env, "confirm_write", action)
    episode = run_scripted(env, task, oracle(env)(task))
    assert episode.outcome.success, episode.outcome.details
    assert roles(episode.messages) == "suaucta"
    assert episode.messages[3] == {"role": "user", "content": CONFIRM}


def test_a_write_before_the_yes_fails_though_the_final_state_is_right(env: SupportDesk) -> None:
    task = task_of(env, "confirm_write", "cancel")
    order_id = task.params["args"][0]

    def hasty(task: Task) -> Solver:
        yield Call("update_order_status", {"order_id": order_id, "status": "cancelled"})
        reply = yield AskUser(f"Shall I cancel order {order_id}?")
        assert reply == Reply(CONFIRM)  # the user does say yes, but too late
        return f"Order {order_id} has been cancelled."

    episode = run_scripted(env, task, hasty(task))
    assert CONFIRM in [m["content"] for m in episode.messages if m["role"] == "user"]
    assert env.db.execute("SELECT status FROM orders WHERE order_id=?", (order_id,)).fetchone() == (
        "cancelled",
    )  # the state alone would pass
    assert env.verify(episode.final_answer).success
    assert not episode.outcome.success
    assert episode.outcome.details["reasons"] == [
        "update_order_status was called before the user confirmed"
    ]


def test_a_write_without_asking_at_all_fails(env: SupportDesk) -> None:
    task = task_of(env, "confirm_write", "refund")
    order_id = task.params["args"][0]

    def silent(task: Task) -> Solver:
        yield Call("update_order_status", {"order_id": order_id, "status": "refunded"})
        return f"Order {order_id} has been refunded."

    episode = run_scripted(env, task, silent(task))
    assert roles(episode.messages) == "sucta"
    assert not episode.outcome.success


def test_single_turn_families_keep_a_single_user_message(env: SupportDesk) -> None:
    task = env.tasks(1, seed=0, families=["order_status"])[0]
    episode = run_scripted(env, task, oracle(env)(task))
    messages = [*episode.messages, {"role": "assistant", "content": "Anything else?"}]
    assert env.user_reply(messages) is None  # the default user: no second turn


def test_the_users_reply_grounds_the_order_id_the_agent_may_write(env: SupportDesk) -> None:
    """Grounded decoding reads user turns: the id the user gave is what get_order may take."""
    from tracetune.agent.grounding import candidates, conversation_sources

    task = task_of(env, "ask_order_id")
    messages = run_scripted(env, task, oracle(env)(task)).messages
    rule = env.grounded_arguments()["get_order"]["order_id"]
    assert candidates(rule, conversation_sources(messages[:2])) == []  # the goal names none
    assert candidates(rule, conversation_sources(messages[:4])) == [task.params["args"][0]]


# --- the rollout engine ------------------------------------------------------------------------
def test_the_oracle_through_the_batched_engine_is_multi_turn_and_scores_1(tmp_path: Path) -> None:
    env = SupportDesk()
    tasks = env.tasks(12, seed=8, families=[*MULTI_TURN, "order_status"])
    results = run_rollouts(
        tasks, ScriptedPolicy(oracle(env)), env_factory_from_params(EnvironmentParams()),
        RolloutConfig(batch_size=5), pricing=Pricing(), progress=False,
    )  # fmt: skip
    assert [r.trajectory.task_id for r in results] == [t.id for t in tasks]
    failed = [(r.trajectory.task_id, r.outcome.details) for r in results if not r.outcome.success]
    assert failed == []
    for result in results:
        traj = result.trajectory
        messages = [m.model_dump(exclude_none=True) for m in traj.messages]
        want = "suaucta" if traj.family in MULTI_TURN else "sucta"
        assert roles(messages) == want, traj.family
        assert traj.steps == roles(messages).count("a") + roles(messages).count("c")
        assert traj.final_answer == messages[-1]["content"] and result.ended_by == "answer"
        assert roles_ok(messages)  # the raw gate's role-order rule accepts the conversation
        task = env.task_by_id(traj.task_id)
        scripted = run_scripted(env, task, oracle(env)(task))
        assert [m.get("content") for m in messages if m["role"] in ("user", "tool")] == [
            m.get("content") for m in scripted.messages if m["role"] in ("user", "tool")
        ]  # the same user turns and tool results as the scripted loop


@pytest.fixture(scope="module")
def asking_policy(tiny_base: Path) -> ModelPolicy:
    """The tiny model, each turn prefilled with a question: its turns carry no tool call, so the
    user hook decides whether the episode goes on."""
    return ModelPolicy.from_pretrained(
        tiny_base, name="tiny", device="cpu", max_new_tokens=6,
        response_prefix="Could you tell me your order id? ",
    )  # fmt: skip


def test_a_model_policy_hears_the_user_and_batching_changes_nothing(
    asking_policy: ModelPolicy,
) -> None:
    env = SupportDesk()
    tasks = [*env.tasks(3, seed=5, families=["ask_order_id"]), *env.tasks(2, seed=5)]
    pool = EnvPool(env_factory_from_params(EnvironmentParams()))

    def run(batch: int) -> list[Any]:
        config = RolloutConfig(max_new_tokens=6, max_turns=4, batch_size=batch)
        return run_rollouts(tasks, asking_policy, pool, config, progress=False)

    batched = run(5)
    for task, result in zip(tasks, batched, strict=True):
        messages = [m.model_dump(exclude_none=True) for m in result.trajectory.messages]
        if task.family == "ask_order_id":  # asked, answered, asked again: the user is done
            assert roles(messages) == "suaua" and result.ended_by == "answer"
            assert task.params["args"][0] in messages[3]["content"]
            assert result.trajectory.final_answer == messages[4]["content"]
            assert result.trajectory.steps == 2 and len(result.turns) == 2
        else:  # single-turn families: the question is the final answer
            assert roles(messages) == "sua" and len(result.turns) == 1
    comparable = [r.trajectory.model_dump(exclude={"timestamp", "latency_s"}) for r in batched]
    assert comparable == [
        r.trajectory.model_dump(exclude={"timestamp", "latency_s"}) for r in run(1)
    ]


def test_the_user_turn_is_environment_tokens_in_rlvr_traces(tiny_base: Path) -> None:
    """GRPO's token-in/token-out trace: a user reply is context the model did not write."""
    from tracetune.agent.model import load_model
    from tracetune.agent.rollout import TurnRequest
    from tracetune.agent.template import assistant_texts, render_messages
    from tracetune.training.grpo import TracePolicy
    from tracetune.training.rewards import summarize_episode

    model, tokenizer = load_model(tiny_base)
    env = SupportDesk()
    task = task_of(env, "confirm_write", "cancel")
    messages = run_scripted(env, task, oracle(env)(task)).messages
    tools = env.tool_schemas()
    policy = TracePolicy(model, tokenizer, "t", max_new_tokens=8, greedy=True)
    said = assistant_texts(messages, tools)
    cuts = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for turn, cut in enumerate(cuts):
        ids = policy.encode(TurnRequest(0, turn, task, messages[:cut], tools))
        assert tokenizer.decode(ids) == render_messages(tokenizer, messages[:cut], tools, True)
        sampled = tokenizer(said[turn], add_special_tokens=False)["input_ids"]
        policy.traces[0].add_model(sampled, None)
    trace = policy.traces[0]
    pairs = list(zip(trace.completion_ids, trace.mask, strict=True))
    assert tokenizer.decode([t for t, m in pairs if m]) == "".join(said)
    assert CONFIRM in tokenizer.decode([t for t, m in pairs if not m])  # never trained on
    summary = summarize_episode(messages, [], True)  # the reply is no format feedback
    assert summary.turns == 3 and summary.bad_format_turns == () and summary.tool_calls == 1


# --- the simulator -----------------------------------------------------------------------------
def test_simulated_multi_turn_logs_pass_ingest(tmp_path: Path) -> None:
    from tracetune.trajectories.ingest import IngestPaths, ingest
    from tracetune.trajectories.io import read_trajectories
    from tracetune.trajectories.simulator import write_logs

    no_skips = {"skip_user_turn": 0.0}  # every multi-turn session asks first (its own test below)
    params = parse_params(
        {"simulate": {"n_trajectories": 96, "seed": 3, "files": 1, "faults": no_skips}}
    )
    summary = write_logs(SupportDesk(max_steps=60), params.simulate, tmp_path / "logs")
    assert {f: summary.family_total[f] > 0 for f in MULTI_TURN} == dict.fromkeys(MULTI_TURN, True)
    paths = IngestPaths(
        tmp_path / "ingested", tmp_path / "quarantine", tmp_path / "state/index.sqlite",
        tmp_path / "state/watermark.json", tmp_path / "reports/rejected.jsonl",
    )  # fmt: skip
    report = ingest(IngestParams(source=str(tmp_path / "logs")), paths)
    assert report.read == report.accepted + report.quarantined
    ingested = list(read_trajectories(paths.batches))
    multi = [t for t in ingested if t.family in MULTI_TURN]
    assert len(multi) >= 12
    for traj in multi:
        messages = [m.model_dump(exclude_none=True) for m in traj.messages]
        codes = roles(messages)
        assert codes.startswith("sua") and "au" in codes  # a user turn after an assistant one
        assert roles_ok(messages)
    logged = []  # multi-turn sessions as logged, less the simulator's corrupt and duplicate lines
    for line in (tmp_path / "logs").glob("*.jsonl").__next__().read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        dup = record["trajectory_id"].endswith("-dup")
        if record["family"] in MULTI_TURN and isinstance(record["steps"], int) and not dup:
            logged.append(record["trajectory_id"])
    assert sorted(t.trajectory_id for t in multi) == sorted(logged)  # none quarantined
    assert any(t.success for t in multi)


def test_a_simulated_agent_that_skips_the_user_fails_on_the_conversation() -> None:
    """The `skip_user_turn` fault: the agent acts on the reply the user would have given
    without asking, so the logs hold the failures a multi-turn task exists to catch."""
    from tracetune.trajectories.simulator import iter_log_lines

    params = parse_params({"simulate": {"n_trajectories": 48, "seed": 2, "faults": {
        "skip_user_turn": 1.0, "wrong_tool": 0, "malformed_arguments": 0, "error_retry": 0,
        "redundant_call": 0, "overlong": 0, "wrong_answer": 0, "duplicate_session": 0,
        "corrupt_line": 0,
    }}})  # fmt: skip
    lines = [(r, f) for _, r, f in iter_log_lines(SupportDesk(), params.simulate) if r]
    records = [r for r, _ in lines]
    faults = {r["trajectory_id"]: f for r, f in lines}
    multi = [r for r in records if r["family"] in MULTI_TURN]
    assert len(multi) == 8
    for record in multi:
        assert "skip_user_turn" in faults[record["trajectory_id"]]
        assert roles(record["messages"]) == "sucta"  # no question, no reply: it just acted
        assert not record["success"]  # a write before the "yes", an id nobody gave
    others = [r for r in records if r["family"] not in MULTI_TURN]
    assert all(r["success"] for r in others)  # the fault touches only episodes that ask
    assert not any("skip_user_turn" in faults[r["trajectory_id"]] for r in others)
