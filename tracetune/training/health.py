"""RLVR training health: what a GRPO batch says about learning, and an early stop on collapse.

Why these numbers: GRPO learns only from differences inside a group of episodes of one task.
When every episode of a group gets the same reward (all fail, or all succeed) its advantages are
zero and the group teaches nothing; when most groups are like that for many steps, the run burns
CPU for nothing. A policy that stops calling tools has collapsed for a tool-using agent (usually
the format broke, or shaping rewarded answering blind). Both end training early with a message
that says which and why, instead of a registered model that silently got worse.

`batch_health` is pure (unit-tested); `CollapseDetector` is a small state machine fed with the
logged metrics; `health_callback` wraps it as a transformers `TrainerCallback` (built lazily so
that importing this module stays cheap).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tracetune.config import RLVRHealthParams
from tracetune.training.rewards import EpisodeSummary

log = logging.getLogger(__name__)

PREFIX = "health/"
TOOL_CALL_RATE = PREFIX + "tool_call_rate"
ZERO_ADVANTAGE = PREFIX + "zero_advantage_share"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def zero_advantage_share(totals: Sequence[float], group_size: int, tol: float = 1e-6) -> float:
    """Share of GRPO groups (consecutive `group_size` rewards) whose rewards are all equal."""
    groups = [totals[i : i + group_size] for i in range(0, len(totals), group_size)]
    if not groups:
        return 0.0
    flat = sum(1 for g in groups if max(g) - min(g) <= tol)
    return flat / len(groups)


def batch_health(
    summaries: Sequence[EpisodeSummary],
    totals: Sequence[float],
    group_size: int,
    model_tokens: Sequence[int],
    truncated: Sequence[bool] = (),
) -> dict[str, float]:
    """Health metrics of one generation batch (names are logged under `health/`)."""
    n = max(len(summaries), 1)
    turns = sum(s.turns for s in summaries)
    bad = sum(len(s.bad_format_turns) for s in summaries)
    return {
        PREFIX + "reward_mean": _mean(totals),
        PREFIX + "reward_std": _std(totals),
        ZERO_ADVANTAGE: zero_advantage_share(totals, group_size),
        PREFIX + "success_rate": sum(s.success for s in summaries) / n,
        TOOL_CALL_RATE: sum(1 for s in summaries if _parsed_calls(s)) / n,
        PREFIX + "calls_per_episode": sum(_parsed_calls(s) for s in summaries) / n,
        PREFIX + "mean_steps": turns / n,
        PREFIX + "format_error_rate": bad / turns if turns else 0.0,
        PREFIX + "completion_tokens": _mean([float(t) for t in model_tokens]),
        PREFIX + "truncated_share": sum(truncated) / n if truncated else 0.0,
    }


def _parsed_calls(summary: EpisodeSummary) -> int:
    return sum(1 for c in summary.calls if c.name)


@dataclass
class CollapseDetector:
    """Feeds on logged metrics, step by step; `update` returns why to stop, or None.

    - tool calls: the share of episodes that call a tool was above `min_tool_call_rate` and
      then stayed at or below it for `tool_call_patience` steps (a policy that never called
      tools has not collapsed: it never learned to, which the zero-advantage rule catches);
    - zero advantage: more than `max_zero_advantage_share` of groups had a single reward for
      `zero_advantage_patience` steps.
    """

    params: RLVRHealthParams
    low_tool_steps: int = 0
    flat_steps: int = 0
    seen_tool_calls: bool = False
    reason: str | None = None

    def update(self, metrics: dict[str, Any]) -> str | None:
        if not self.params.enabled or self.reason is not None:
            return self.reason
        rate = metrics.get(TOOL_CALL_RATE)
        if rate is not None:
            if rate > self.params.min_tool_call_rate:
                self.seen_tool_calls = True
                self.low_tool_steps = 0
            elif self.seen_tool_calls:
                self.low_tool_steps += 1
        flat = metrics.get(ZERO_ADVANTAGE)
        if flat is not None:
            over = flat > self.params.max_zero_advantage_share
            self.flat_steps = self.flat_steps + 1 if over else 0
        if self.low_tool_steps >= self.params.tool_call_patience:
            self.reason = (
                f"collapse: the share of episodes calling a tool fell to {rate:.2f} "
                f"(<= {self.params.min_tool_call_rate:.2f}) for {self.low_tool_steps} steps; "
                "the policy stopped using tools (check the format reward and the KL coefficient)"
            )
        elif self.flat_steps >= self.params.zero_advantage_patience:
            self.reason = (
                f"no learning signal: {flat:.0%} of groups gave every episode the same reward "
                f"for {self.flat_steps} steps (> {self.params.max_zero_advantage_share:.0%}); "
                "tasks are all solved or all failed (add shaping, raise the group size or the "
                "temperature, or pick other task families)"
            )
        return self.reason


def health_callback(params: RLVRHealthParams) -> Any:
    """A `TrainerCallback` that stops training when `CollapseDetector` fires.

    The reason is kept on the callback (`.reason`) and logged as a warning, so the stage can
    put it in its metrics and print it.
    """
    from transformers import TrainerCallback

    class HealthCallback(TrainerCallback):
        def __init__(self) -> None:
            self.detector = CollapseDetector(params)
            self.stopped_at: int | None = None

        @property
        def reason(self) -> str | None:
            return self.detector.reason

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
        ) -> None:
            if not logs or self.stopped_at is not None:
                return
            reason = self.detector.update(logs)
            if reason is not None:
                self.stopped_at = int(state.global_step)
                log.warning("RLVR stopped early at step %d: %s", state.global_step, reason)
                control.should_training_stop = True

    return HealthCallback()
