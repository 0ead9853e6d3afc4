"""RLVR rewards, health and the recipe's rule: pure functions on real episodes, no model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from tracetune.agent.rollout import RolloutConfig, TurnOutput, TurnRequest, run_rollouts
from tracetune.config import RLVRHealthParams, RLVRParams, RLVRRewardParams, SplitParams
from tracetune.environments.support_desk import SupportDesk
from tracetune.training.grpo import TokenTrace, check_groups, decide, training_tasks
from tracetune.training.health import (
    TOOL_CALL_RATE,
    ZERO_ADVANTAGE,
    CollapseDetector,
    batch_health,
    zero_advantage_share,
)
from tracetune.training.rewards import (
    BAD_FORMAT,
    CallOutcome,
    EpisodeSummary,
    call_credits,
    centred_turn_credits,
    reward_functions,
    score_episode,
    score_groups,
    summarize_episode,
)

NO_SHAPING = RLVRRewardParams(
    format_weight=0, valid_call_weight=0, step_penalty=0, per_call_credit="off"
)


def _call(name: str, args: dict[str, Any]) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


class ScriptPolicy:
    """Plays fixed assistant texts, turn by turn (what a model could have written)."""

    name = "script"

    def __init__(self, turns: Sequence[str]) -> None:
        self.turns = list(turns)

    def generate(self, requests: Sequence[TurnRequest]) -> list[TurnOutput]:
        return [TurnOutput(self.turns[r.turn], 10, 5) for r in requests]


def _episode(task_id: str, turns: Sequence[str]) -> EpisodeSummary:
    """Run the script in the real support desk and summarise what happened."""
    env = SupportDesk()
    task = env.task_by_id(task_id)
    result = run_rollouts(
        [task],
        ScriptPolicy(turns),
        lambda: SupportDesk(),
        RolloutConfig(max_turns=8),
        progress=False,
    )[0]
    messages = [m.model_dump(exclude_none=True) for m in result.trajectory.messages]
    return summarize_episode(messages, result.step_errors, result.outcome.success, result.ended_by)


def _status_task() -> tuple[str, str]:
    env = SupportDesk()
    task = env.tasks(1, seed=3, families=["order_status"])[0]
    return task.id, str(task.check["word"])


# --- outcome and shaping -----------------------------------------------------------------------
def test_success_and_failure_come_from_the_verifier() -> None:
    task_id, status = _status_task()
    order_id = task_id.split(":")[1]
    good = _episode(task_id, [_call("get_order", {"order_id": order_id}), f"It is {status}."])
    wrong = "cancelled" if status != "cancelled" else "shipped"
    bad = _episode(task_id, [_call("get_order", {"order_id": order_id}), f"It is {wrong}."])
    assert good.success and not bad.success
    assert score_episode(good, NO_SHAPING).total == 1.0
    assert score_episode(bad, NO_SHAPING).total == -1.0
    custom = NO_SHAPING.model_copy(update={"success": 2.0, "failure": -0.5})
    assert score_episode(good, custom).total == 2.0 and score_episode(bad, custom).total == -0.5


def test_summary_names_every_kind_of_call() -> None:
    task_id, status = _status_task()
    order_id = task_id.split(":")[1]
    summary = _episode(
        task_id,
        [
            "<tool_call>\n{broken json\n</tool_call>",  # malformed turn
            _call("get_weather", {"city": "Oslo"}),  # unknown tool
            _call("get_order", {"id": order_id}),  # invalid arguments
            _call("get_order", {"order_id": "O-99999"}),  # tool error (not found)
            _call("get_order", {"order_id": order_id}),  # useful
            _call("get_order", {"order_id": order_id}),  # redundant
            f"Order {order_id} is {status}.",
        ],
    )
    assert summary.success and summary.turns == 7
    assert summary.bad_format_turns == (0,)
    kinds = [(c.turn, c.name, c.error) for c in summary.calls]
    assert kinds == [
        (0, "", BAD_FORMAT),
        (1, "get_weather", "unknown_tool"),
        (2, "get_order", "bad_arguments"),
        (3, "get_order", "tool_error"),
        (4, "get_order", None),
        (5, "get_order", None),
    ]
    assert summary.calls[4].key == summary.calls[5].key


def test_format_and_valid_call_shaping() -> None:
    summary = EpisodeSummary(
        success=False,
        turns=4,
        calls=(
            CallOutcome(0, "", "m0", BAD_FORMAT),
            CallOutcome(1, "nope", "nope:{}", "unknown_tool"),
            CallOutcome(2, "get_order", "a", None),
            CallOutcome(2, "get_order", "b", "tool_error"),
        ),
        bad_format_turns=(0,),
    )
    params = RLVRRewardParams(
        format_weight=0.2, valid_call_weight=0.3, step_penalty=0, per_call_credit="off"
    )
    b = score_episode(summary, params)
    assert b.format == pytest.approx(0.2 * 3 / 4)  # one turn of four did not parse
    assert b.valid_calls == pytest.approx(0.3 * 2 / 3)  # a tool error is still a valid call
    assert b.total == pytest.approx(-1 + 0.15 + 0.2)
    no_calls = EpisodeSummary(success=False, turns=1)
    assert score_episode(no_calls, params).valid_calls == pytest.approx(0.3)


def test_extra_steps_against_the_groups_best_success_or_a_fixed_allowance() -> None:
    group = [
        EpisodeSummary(True, 2),
        EpisodeSummary(True, 4),
        EpisodeSummary(False, 5),
        EpisodeSummary(False, 1),
    ]
    hopeless = [EpisodeSummary(False, 3), EpisodeSummary(False, 6)]
    params = NO_SHAPING.model_copy(update={"step_penalty": 0.1})
    scored = score_groups([*group, *hopeless[:0]], 4, params)
    assert [b.extra_steps for b in scored] == [0, 2, 3, 0]
    assert [round(b.steps, 3) for b in scored] == [0.0, -0.2, -0.3, 0.0]
    none = score_groups(hopeless, 2, params)  # no success in the group: nothing to compare with
    assert [b.extra_steps for b in none] == [0, 0]
    fixed = score_groups(hopeless, 2, params.model_copy(update={"free_steps": 2}))
    assert [b.extra_steps for b in fixed] == [1, 4]


# --- per-call credit ---------------------------------------------------------------------------
CALLS = (
    CallOutcome(0, "get_order", "get_order:{1}", None),  # useful
    CallOutcome(1, "get_order", "get_order:{1}", None),  # redundant
    CallOutcome(2, "nope", "nope:{}", "unknown_tool"),  # failed
    CallOutcome(3, "get_order", "get_order:{2}", "tool_error"),  # neutral (e.g. not found)
    CallOutcome(4, "", "m4", BAD_FORMAT),  # failed
)


def test_call_credit_rewards_useful_and_penalises_redundant_and_failing_calls() -> None:
    params = RLVRRewardParams(useful_call=0.1, redundant_call=0.2, failed_call=0.3)
    won = EpisodeSummary(True, 6, CALLS)
    assert call_credits(won, params) == [(0, 0.1), (1, -0.2), (2, -0.3), (3, 0.0), (4, -0.3)]
    lost = EpisodeSummary(False, 6, CALLS)
    assert call_credits(lost, params)[0] == (0, 0.0)  # no credit for calls that led nowhere
    anyway = params.model_copy(update={"useful_requires_success": False})
    assert call_credits(lost, anyway)[0] == (0, 0.1)


def test_call_credit_modes() -> None:
    base = dict(
        format_weight=0,
        valid_call_weight=0,
        step_penalty=0,
        useful_call=0.1,
        redundant_call=0.2,
        failed_call=0.3,
    )
    won = EpisodeSummary(True, 6, CALLS)
    as_reward = score_episode(won, RLVRRewardParams(per_call_credit="reward", **base))
    assert as_reward.call_credit == pytest.approx(-0.7)
    assert as_reward.total == pytest.approx(1 - 0.7) and not as_reward.turn_credit
    as_tokens = score_episode(won, RLVRRewardParams(per_call_credit="token", **base))
    assert as_tokens.total == pytest.approx(1.0)  # credit goes on tokens, not the sequence
    assert as_tokens.turn_credit == pytest.approx({0: 0.1, 1: -0.2, 2: -0.3, 3: 0.0, 4: -0.3})
    off = score_episode(won, RLVRRewardParams(per_call_credit="off", **base))
    assert off.call_credit == 0.0 and off.total == pytest.approx(1.0)


def test_token_credits_are_centred_per_group() -> None:
    params = RLVRRewardParams(per_call_credit="token")
    a = EpisodeSummary(True, 2, (CallOutcome(0, "get_order", "k", None),))
    b = EpisodeSummary(
        True, 3, (CallOutcome(0, "x", "x", "unknown_tool"), CallOutcome(1, "get_order", "k", None))
    )
    c = EpisodeSummary(False, 1)
    breakdowns = score_groups([a, b, c, a], 2, params)
    centred = centred_turn_credits(breakdowns, 2)
    first = [v for d in centred[:2] for v in d.values()]
    assert sum(first) == pytest.approx(0.0) and centred[1][0] < 0 < centred[0][0]
    assert centred[2] == {} and centred[3][0] == pytest.approx(0.0)  # alone in its group


def test_trl_reward_functions_read_the_breakdown_and_log_health() -> None:
    params = RLVRRewardParams(per_call_credit="token")
    funcs, weights = reward_functions(params)
    assert [f.__name__ for f in funcs] == [
        "outcome",
        "format",
        "valid_calls",
        "steps",
        "call_credit",
    ]
    assert weights == [1.0, 1.0, 1.0, 1.0, 0.0]  # token credit: logged, not summed
    b = score_episode(EpisodeSummary(True, 2, CALLS[:1]), params)
    episodes = [{"reward": b.as_dict(), "batch_health": {"health/x": 0.5}}]
    logged: dict[str, float] = {}
    values = [f([None], episode=episodes, log_metric=logged.__setitem__)[0] for f in funcs]
    assert values == pytest.approx([1.0, 0.1, 0.1, 0.0, 0.1])
    assert logged == {"health/x": 0.5}
    _, reward_weights = reward_functions(params.model_copy(update={"per_call_credit": "reward"}))
    assert reward_weights[-1] == 1.0


# --- health ------------------------------------------------------------------------------------
def test_zero_advantage_share_and_batch_health() -> None:
    assert zero_advantage_share([1, 1, -1, 1, -1, -1, 0.5, 0.5], 2) == pytest.approx(0.75)
    summaries = [
        EpisodeSummary(True, 2, (CallOutcome(0, "get_order", "k", None),)),
        EpisodeSummary(False, 2, (CallOutcome(0, "", "m", BAD_FORMAT),), bad_format_turns=(0,)),
    ]
    health = batch_health(summaries, [1.0, -1.0], 2, [30, 10], [False, True])
    assert health[TOOL_CALL_RATE] == 0.5  # a malformed turn is not a tool call
    assert health[ZERO_ADVANTAGE] == 0.0
    assert health["health/success_rate"] == 0.5
    assert health["health/format_error_rate"] == 0.25
    assert health["health/completion_tokens"] == 20.0
    assert health["health/truncated_share"] == 0.5
    assert health["health/reward_std"] == pytest.approx(2**0.5)


def test_collapse_detector_stops_on_a_tool_call_fall_or_no_signal() -> None:
    params = RLVRHealthParams(
        tool_call_patience=2, zero_advantage_patience=3, max_zero_advantage_share=0.9
    )
    never = CollapseDetector(params)
    for _ in range(5):  # never called a tool: not a collapse (the zero-advantage rule applies)
        assert never.update({TOOL_CALL_RATE: 0.0, ZERO_ADVANTAGE: 0.5}) is None
    fall = CollapseDetector(params)
    assert fall.update({TOOL_CALL_RATE: 0.6}) is None
    assert fall.update({TOOL_CALL_RATE: 0.0}) is None
    reason = fall.update({TOOL_CALL_RATE: 0.0})
    assert reason is not None and "stopped using tools" in reason
    flat = CollapseDetector(params)
    for share in (1.0, 1.0, 0.5, 1.0, 0.95):
        assert flat.update({ZERO_ADVANTAGE: share}) is None
    reason = flat.update({ZERO_ADVANTAGE: 1.0})
    assert reason is not None and "no learning signal" in reason
    off = CollapseDetector(params.model_copy(update={"enabled": False}))
    assert all(off.update({ZERO_ADVANTAGE: 1.0}) is None for _ in range(5))


# --- the recipe's rule, tasks, traces ----------------------------------------------------------
def test_rule_runs_rlvr_only_below_the_threshold() -> None:
    params = RLVRParams(when_sft_tsr_below=0.8)
    low = decide(params, {"candidate": {"tsr": 0.55}})
    assert low.run and "0.550 < rlvr.when_sft_tsr_below 0.80" in low.reason
    high = decide(params, {"candidate": {"tsr": 0.85}})
    assert not high.run and "skipped" in high.reason and high.sft_tsr == 0.85
    assert decide(params.model_copy(update={"mode": "always"}), {"candidate": {"tsr": 0.9}}).run
    assert not decide(params.model_copy(update={"mode": "never"}), None).run
    with pytest.raises(ValueError, match="evaluate@sft"):
        decide(params, None)


def test_training_tasks_never_include_heldout_ones() -> None:
    env = SupportDesk()
    first = training_tasks(env, 40, 0, ["order_status", "customer_tier"], set())
    held = {t.id for t in first[:10]}
    split = SplitParams(heldout_fraction=0.3, seed=13)
    tasks = training_tasks(env, 40, 0, ["order_status", "customer_tier"], held, split)
    assert len(tasks) == 40 and not held & {t.id for t in tasks}
    from tracetune.trajectories.split import is_heldout

    assert not any(is_heldout(t.id, t.family, split) for t in tasks)
    assert {t.family for t in tasks} == {"order_status", "customer_tier"}
    again = training_tasks(env, 40, 0, ["order_status", "customer_tier"], held, split)
    assert [t.id for t in tasks] == [t.id for t in again]  # drawn by seed: reproducible


def test_groups_must_be_consecutive_runs_of_one_task() -> None:
    env = SupportDesk()
    a, b = env.tasks(2, seed=0)
    check_groups([a, a, b, b], 2)
    with pytest.raises(ValueError, match="mixes tasks"):
        check_groups([a, b, a, b], 2)
    with pytest.raises(ValueError, match="multiple"):
        check_groups([a, a, b], 2)


def test_token_trace_masks_environment_tokens_and_truncates() -> None:
    trace = TokenTrace([1, 2, 3])
    trace.add_model([10, 11], [-0.1, -0.2])
    trace.add_environment([20, 21, 22])
    trace.add_model([12, 13, 14], None)
    assert trace.context == [1, 2, 3, 10, 11, 20, 21, 22, 12, 13, 14]
    assert trace.mask == [1, 1, 0, 0, 0, 1, 1, 1]
    assert trace.turn_spans == [(0, 2), (5, 8)]
    cut, was_cut = trace.truncated(6)
    assert was_cut and cut.completion_ids == [10, 11, 20, 21, 22, 12]
    assert cut.turn_spans == [(0, 2), (5, 6)] and len(cut.logprobs) == 6
    same, was_cut = trace.truncated(8)
    assert same is trace and not was_cut
