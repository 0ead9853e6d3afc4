"""RLVR's pre-training screen: keep the tasks whose sampled episodes disagree."""

from __future__ import annotations

from tracetune.environments.base import Task
from tracetune.training.grpo import mixed_outcome_tasks


def _task(task_id: str) -> Task:
    family = task_id.split(":")[0]
    return Task(id=task_id, family=family, goal="?", check={})


def test_only_tasks_with_a_success_and_a_failure_are_kept_in_drawn_order() -> None:
    tasks = [_task("a:1"), _task("a:2"), _task("b:1"), _task("b:2"), _task("b:3")]
    outcomes = {
        "a:1": [True, True, True, True],  # always solved: no signal
        "a:2": [True, False, False, False],
        "b:1": [False, False, False, False],  # never solved: no signal
        "b:2": [False, True, True, False],
        # b:3 never ran (no outcomes): nothing known, not kept
    }
    kept, screening = mixed_outcome_tasks(tasks, outcomes, 4)
    assert [t.id for t in kept] == ["a:2", "b:2"]
    assert screening.screened == {"a": 2, "b": 3}
    assert screening.kept == {"a": 1, "b": 1}
    assert screening.success == {"a": round(5 / 8, 4), "b": round(2 / 12, 4)}


def test_nothing_mixed_keeps_nothing() -> None:
    kept, screening = mixed_outcome_tasks([_task("a:1")], {"a:1": [False, False]}, 2)
    assert kept == [] and screening.kept == {} and screening.success == {"a": 0.0}
