"""Evaluation files as the evaluate stage writes them, from real metrics blocks (`summarize` of
real `Trajectory` records): what the compare stage and `dvc metrics show` read in the tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tracetune.evaluation.metrics import deltas, summarize
from tracetune.trajectories.schema import Trajectory


def episode(family: str, success: bool, steps: int = 2, i: int = 0) -> Trajectory:
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "help"},
        {"role": "assistant", "content": "done"},
    ]
    return Trajectory.model_validate(
        {
            "trajectory_id": f"{family}-{i}-{success}",
            "task_id": f"{family}:{i}",
            "family": family,
            "environment": "support_desk",
            "model": "m",
            "timestamp": datetime(2026, 11, 1, tzinfo=UTC),
            "messages": messages,
            "success": success,
            "steps": steps,
            "error_retries": 0,
            "latency_s": 1.0,
            "usage": {"prompt_tokens": 100, "completion_tokens": 10},
            "cost_usd": 0.001,
        }
    )


def arm(wins: dict[str, tuple[int, int]], steps: int = 2) -> dict[str, Any]:
    """A real metrics block: `wins` family -> (successes, episodes)."""
    episodes = [
        episode(family, k < won, steps, k)
        for family, (won, total) in wins.items()
        for k in range(total)
    ]
    return summarize(episodes)


def payload(model: str, candidate: dict[str, Any], n_tasks: int = 10) -> dict[str, Any]:
    """The shape of `metrics/eval_<model>.json` (tasks/evaluate.py)."""
    production = arm({"order_status": (4, 5), "refund": (2, 5)}, steps=4)
    floor = arm({"order_status": (0, 5), "refund": (1, 5)}, steps=0)
    prompt_only = arm({"order_status": (1, 5), "refund": (0, 5)})
    return {
        "model": model,
        "n_tasks": n_tasks,
        "candidate": candidate,
        "baseline_prompt_only": prompt_only,
        "baseline_production": production,
        "baseline_floor": floor,
        "delta": deltas(candidate, prompt_only, production, floor),
    }


def three_models() -> dict[str, dict[str, Any]]:
    return {
        "base": payload("base", arm({"order_status": (1, 5), "refund": (0, 5)})),
        "sft": payload("sft", arm({"order_status": (3, 5), "refund": (2, 5)})),
        "rlvr": payload("rlvr", arm({"order_status": (5, 5), "refund": (3, 5)})),
    }
