"""Field mapping: logs in another layout become our schema without a custom parser."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tracetune.config import FieldMapping
from tracetune.trajectories.mapping import MappingError, apply_mapping, normalise_arguments
from tracetune.trajectories.schema import Trajectory


def foreign_record() -> dict:
    """A log of another team: messages under `conversation`, reward 0/1, args as objects."""
    return {
        "id": "sess-1",
        "meta": {"task": "customer_tier:C-0001", "kind": "customer_tier", "agent": "v2"},
        "ts": "2026-11-01T10:00:00+00:00",
        "conversation": [
            {"role": "human", "content": "Which loyalty tier is customer C-0001 in?"},
            {
                "role": "bot",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {
                            "name": "get_customer",
                            "arguments": {"customer_id": "C-0001"},
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": '{"tier": "gold"}'},
            {"role": "bot", "content": "Customer C-0001 is gold."},
        ],
        "reward": 1,
        "usage": {"prompt_tokens": 100, "completion_tokens": 20},
        "cost": 0.001,
        "latency": 1.5,
        "debug": {"host": "a"},
    }


MAPPING = FieldMapping(
    fields={
        "trajectory_id": "id",
        "task_id": "meta.task",
        "family": "meta.kind",
        "model": "meta.agent",
        "timestamp": "ts",
        "messages": "conversation",
        "cost_usd": "cost",
        "latency_s": "latency",
    },
    success_from_reward="reward",
    roles={"human": "user", "bot": "assistant"},
    defaults={"environment": "support_desk"},
    drop=["debug"],
    derive_steps=True,
)


def test_foreign_layout_maps_to_our_schema() -> None:
    traj = Trajectory.model_validate(apply_mapping(foreign_record(), MAPPING))
    assert traj.success and traj.steps == 2 and traj.task_id == "customer_tier:C-0001"
    assert [m.role for m in traj.messages] == ["user", "assistant", "tool", "assistant"]
    call = traj.messages[1].tool_calls[0]  # type: ignore[index]
    assert json.loads(call.function.arguments) == {"customer_id": "C-0001"}


def test_reward_below_threshold_is_failure() -> None:
    record = foreign_record() | {"reward": 0}
    assert apply_mapping(record, MAPPING)["success"] is False


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("conversation"), "conversation"),
        (lambda r: r["meta"].pop("task"), "meta.task"),
        (lambda r: r.update(reward="maybe"), "not a number"),
    ],
)
def test_missing_mapped_fields_name_the_field(change, message: str) -> None:  # type: ignore[no-untyped-def]
    record = foreign_record()
    change(record)
    with pytest.raises(MappingError, match=message):
        apply_mapping(record, MAPPING)


def test_identity_mapping_leaves_our_layout_alone() -> None:
    record = {"messages": [{"role": "user", "content": "hi"}], "success": True}
    assert apply_mapping(dict(record), FieldMapping()) == record


def test_object_arguments_become_json_strings() -> None:
    record: dict[str, Any] = {
        "messages": [
            {
                "role": "assistant",
                "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
            }
        ]
    }
    assert normalise_arguments(record) == 1
    assert record["messages"][0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
