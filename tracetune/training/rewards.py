"""RLVR rewards: the environment's verdict, optional shaping, and per-tool-call credit.

Why the reward is computed from the finished episode and not from TRL's `completions`: the
verifier (`Environment.verify_episode`) judges the whole episode, the final answer *and* the
world state the tools changed, so only the episode that really ran can be scored. The rollout
engine records everything needed (messages, step errors, the verdict); `summarize_episode`
turns that into an `EpisodeSummary`, and the pure functions below score it. Evaluation uses the
same environment and verifier, so what is rewarded is what is measured.

Terms (weights in `rlvr.rewards`, docs/training.md):

- outcome: `success` (+1) or `failure` (-1), from the verifier;
- format: `format_weight` x the share of assistant turns that parsed;
- valid calls: `valid_call_weight` x the share of tool calls with a known tool and arguments the
  schema accepts (1.0 when there were no calls: answering without tools is not a fault);
- extra steps: `step_penalty` per assistant step beyond a baseline: `free_steps`, or by default
  the fewest steps a successful episode of the same GRPO group took (nothing to compare with
  when none succeeded, so no penalty);
- per-call credit (ToolPO-style): each call gets `+useful_call` (valid, first time, no error;
  by default only in successful episodes, so that calling many tools cannot farm reward),
  `-redundant_call` (the same call again) or `-failed_call` (malformed turn, unknown tool,
  invalid arguments, step cap). Tool errors such as "not found" are neutral: some tasks need
  them. `per_call_credit: reward` adds the sum to the episode reward; `token` puts each call's
  credit on the tokens of the turn that made it (see `turn_credits`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tracetune.config import RLVRRewardParams

# Step-error kinds (tracetune.agent.rollout / Environment.step), repeated here to keep this
# module free of the rollout engine's imports.
BAD_FORMAT = "bad_format"
AGENT_FAULTS = frozenset({"bad_format", "unknown_tool", "bad_arguments", "step_cap"})
FORMAT_FEEDBACK = "Your last message could not be parsed"
TOOL_ERROR = "tool_error"


@dataclass(frozen=True)
class CallOutcome:
    """One tool call (or one malformed turn, `name=""`) and what became of it."""

    turn: int  # 0-based assistant turn that made it
    name: str
    key: str  # name + canonical arguments: the same key twice is a redundant call
    error: str | None = None  # None: it ran; else the step-error kind

    @property
    def valid(self) -> bool:
        """A known tool with arguments the schema accepted (it may still fail, e.g. not found)."""
        return self.error is None or self.error not in AGENT_FAULTS


@dataclass(frozen=True)
class EpisodeSummary:
    """What the reward needs from one episode."""

    success: bool
    turns: int  # assistant turns (the `steps` of the trajectory)
    calls: tuple[CallOutcome, ...] = ()
    bad_format_turns: tuple[int, ...] = ()
    ended_by: str = "answer"

    @property
    def tool_calls(self) -> int:
        return len(self.calls)


@dataclass(frozen=True)
class RewardBreakdown:
    """Every term of one episode's reward; `total` is what GRPO's advantage is built from."""

    outcome: float
    format: float
    valid_calls: float
    steps: float
    call_credit: float  # in the total only with per_call_credit == "reward"
    total: float
    extra_steps: int = 0
    turn_credit: dict[int, float] = field(default_factory=dict)  # turn -> credit

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# From a finished episode to a summary
# ---------------------------------------------------------------------------------------------
def call_key(name: str, arguments: Any) -> str:
    """`name:{canonical JSON}`: two calls with equal keys did the same thing."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return f"{name}:{arguments}"
    return f"{name}:{json.dumps(arguments, sort_keys=True, ensure_ascii=False)}"


def is_error_content(content: Any) -> bool:
    """A tool message `Environment.step` produced for a failed call: `{"error": ...}` only."""
    try:
        value = json.loads(str(content))
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and set(value) == {"error"}


def summarize_episode(
    messages: Sequence[dict[str, Any]],
    step_errors: Sequence[str],
    success: bool,
    ended_by: str = "answer",
) -> EpisodeSummary:
    """Walk the conversation the rollout engine recorded and name what each turn did.

    `step_errors` is the engine's ordered list of step errors (one `bad_format` per malformed
    turn, one kind per failed call). Failed calls are recognised by their `{"error": ...}` tool
    message and get the next non-format kind from that list; if the two disagree (a tool that
    returns an `error` key on success), failures fall back to the neutral `tool_error`.
    """
    call_kinds = [e for e in step_errors if e != BAD_FORMAT]
    failed_results = 0
    calls: list[CallOutcome] = []
    bad_turns: list[int] = []
    turn = -1
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        turn += 1
        nxt = messages[i + 1] if i + 1 < len(messages) else {}
        if nxt.get("role") == "user" and str(nxt.get("content", "")).startswith(FORMAT_FEEDBACK):
            bad_turns.append(turn)
            calls.append(CallOutcome(turn, "", f"<malformed turn {turn}>", BAD_FORMAT))
            continue
        results = _tool_results(messages, i + 1)
        for k, tool_call in enumerate(message.get("tool_calls") or ()):
            function = tool_call.get("function", tool_call)
            name = str(function.get("name", ""))
            content = results[k] if k < len(results) else ""
            error = None
            if is_error_content(content):
                error = call_kinds[failed_results] if failed_results < len(call_kinds) else None
                failed_results += 1
                error = error or TOOL_ERROR
            calls.append(CallOutcome(turn, name, call_key(name, function.get("arguments")), error))
    if failed_results != len(call_kinds):  # misaligned: keep failures, drop the kinds
        calls = [
            c if c.error in (None, BAD_FORMAT) else CallOutcome(c.turn, c.name, c.key, TOOL_ERROR)
            for c in calls
        ]
    return EpisodeSummary(success, turn + 1, tuple(calls), tuple(bad_turns), ended_by)


def _tool_results(messages: Sequence[dict[str, Any]], start: int) -> list[str]:
    out = []
    for message in messages[start:]:
        if message.get("role") != "tool":
            break
        out.append(str(message.get("content") or ""))
    return out


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def outcome_reward(success: bool, params: RLVRRewardParams) -> float:
    return params.success if success else params.failure


def format_score(summary: EpisodeSummary) -> float:
    """Share of assistant turns that parsed (1.0 for an episode without turns)."""
    if summary.turns == 0:
        return 1.0
    return 1.0 - len(summary.bad_format_turns) / summary.turns


def valid_call_score(summary: EpisodeSummary) -> float:
    """Share of parsed tool calls naming a known tool with valid arguments (1.0 without calls)."""
    parsed = [c for c in summary.calls if c.error != BAD_FORMAT]
    if not parsed:
        return 1.0
    return sum(c.valid for c in parsed) / len(parsed)


def extra_steps(turns: int, baseline: int | None) -> int:
    """Steps beyond the baseline; none when there is no baseline."""
    return 0 if baseline is None else max(0, turns - baseline)


def group_step_baselines(
    summaries: Sequence[EpisodeSummary], group_size: int, free_steps: int | None
) -> list[int | None]:
    """Per episode: the steps it may take without penalty.

    A fixed `free_steps`, or the fewest steps of a successful episode in its GRPO group (the
    group's episodes are consecutive, as TRL's sampler lays them out).
    """
    if free_steps is not None:
        return [free_steps] * len(summaries)
    out: list[int | None] = []
    for start in range(0, len(summaries), group_size):
        group = summaries[start : start + group_size]
        wins = [s.turns for s in group if s.success]
        out += [min(wins) if wins else None] * len(group)
    return out


def call_credits(summary: EpisodeSummary, params: RLVRRewardParams) -> list[tuple[int, float]]:
    """(turn, credit) for every call and malformed turn, in order (see the module docstring)."""
    seen: set[str] = set()
    out = []
    for call in summary.calls:
        if call.error in AGENT_FAULTS:
            credit = -params.failed_call
        elif call.key in seen:
            credit = -params.redundant_call
        elif call.error is None and (summary.success or not params.useful_requires_success):
            credit = params.useful_call
        else:
            credit = 0.0
        seen.add(call.key)
        out.append((call.turn, credit))
    return out


def turn_credits(credits: Sequence[tuple[int, float]]) -> dict[int, float]:
    """Credits summed per assistant turn (a turn may make several calls)."""
    out: dict[int, float] = {}
    for turn, credit in credits:
        out[turn] = out.get(turn, 0.0) + credit
    return out


def score_episode(
    summary: EpisodeSummary, params: RLVRRewardParams, step_baseline: int | None = None
) -> RewardBreakdown:
    """All reward terms of one episode."""
    outcome = outcome_reward(summary.success, params)
    fmt = params.format_weight * format_score(summary)
    valid = params.valid_call_weight * valid_call_score(summary)
    extra = extra_steps(summary.turns, step_baseline)
    steps = -params.step_penalty * extra
    credits = [] if params.per_call_credit == "off" else call_credits(summary, params)
    credit = sum(c for _, c in credits)
    total = outcome + fmt + valid + steps + (credit if params.per_call_credit == "reward" else 0.0)
    return RewardBreakdown(
        outcome=outcome,
        format=fmt,
        valid_calls=valid,
        steps=steps,
        call_credit=credit,
        total=total,
        extra_steps=extra,
        turn_credit=turn_credits(credits) if params.per_call_credit == "token" else {},
    )


def score_groups(
    summaries: Sequence[EpisodeSummary], group_size: int, params: RLVRRewardParams
) -> list[RewardBreakdown]:
    """Score a batch laid out as consecutive GRPO groups of `group_size` episodes."""
    baselines = group_step_baselines(summaries, group_size, params.free_steps)
    return [score_episode(s, params, b) for s, b in zip(summaries, baselines, strict=True)]


def centred_turn_credits(
    breakdowns: Sequence[RewardBreakdown], group_size: int
) -> list[dict[int, float]]:
    """Token-mode credits minus the mean credit of the group's credited turns.

    Centring makes the per-call term an advantage: a call is pushed up only when it did better
    than the group's calls did on average, as the outcome advantage is centred per group.
    """
    out: list[dict[int, float]] = []
    for start in range(0, len(breakdowns), group_size):
        group = breakdowns[start : start + group_size]
        values = [c for b in group for c in b.turn_credit.values()]
        mean = sum(values) / len(values) if values else 0.0
        out += [{t: c - mean for t, c in b.turn_credit.items()} for b in group]
    return out


# ---------------------------------------------------------------------------------------------
# TRL reward functions: thin readers of the breakdown the rollout stored per completion
# ---------------------------------------------------------------------------------------------
REWARD_TERMS = ("outcome", "format", "valid_calls", "steps", "call_credit")
EPISODE_FIELD = "episode"  # the rollout function's extra field TRL forwards to reward functions
BATCH_FIELD = "batch_health"  # batch-level metrics the rollout attaches to each episode


def _reader(term: str) -> Callable[..., list[float]]:
    def reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        episodes = kwargs[EPISODE_FIELD]
        log_metric = kwargs.get("log_metric")
        if term == REWARD_TERMS[0] and log_metric is not None and episodes:
            # TRL's documented hook for extra scalars: averaged and logged with the step.
            for name, value in (episodes[0].get(BATCH_FIELD) or {}).items():
                log_metric(name, float(value))
        return [float(e["reward"][term]) for e in episodes]

    reward.__name__ = term  # TRL logs each function as rewards/<name>/mean
    return reward


RewardFunc = Callable[..., list[float]]


def reward_functions(params: RLVRRewardParams) -> tuple[list[RewardFunc], list[float]]:
    """TRL `reward_funcs` and `reward_weights`: one function per term, so each is logged.

    The weights are 1: the terms already carry their weights. The per-call credit is a reward
    term only with `per_call_credit: reward`; in `token` mode it is logged with weight 0.
    """
    funcs = [_reader(term) for term in REWARD_TERMS]
    weights = [1.0, 1.0, 1.0, 1.0, 1.0 if params.per_call_credit == "reward" else 0.0]
    return funcs, weights
