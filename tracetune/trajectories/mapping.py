"""Read logs whose layout differs from ours through a small declarative mapping (params.yaml).

A team that logs `{"conversation": [...], "reward": 1, "meta": {"task": ...}}` maps it with
`fields: {messages: conversation, task_id: meta.task}` and `success_from_reward: reward` instead
of writing a parser. Every rename is explicit; a mapped field that is missing is an error that
names the field (the line is quarantined with it), never a silent default.

One normalisation needs no mapping: tool-call arguments logged as JSON objects (many SDKs do) are
re-serialised to the JSON string the OpenAI format and our schema carry.
"""

from __future__ import annotations

import json
from typing import Any

from tracetune.config import FieldMapping
from tracetune.trajectories.schema import count_steps

_MISSING = object()


class MappingError(ValueError):
    """A record does not have what the mapping says it has."""


def get_path(record: dict[str, Any], dotted: str) -> Any:
    """`record["a"]["b"]` for `a.b`, or `_MISSING`."""
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def pop_path(record: dict[str, Any], dotted: str) -> Any:
    """Remove and return the value at `a.b`; drops parents left empty by the removal."""
    parts = dotted.split(".")
    parents = [record]
    for part in parts[:-1]:
        child = parents[-1].get(part)
        if not isinstance(child, dict):
            return _MISSING
        parents.append(child)
    value = parents[-1].pop(parts[-1], _MISSING)
    for depth in range(len(parts) - 1, 0, -1):
        if not parents[depth]:
            del parents[depth - 1][parts[depth - 1]]
    return value


def set_path(record: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = record
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise MappingError(f"cannot set '{dotted}': '{part}' is not an object")
    node[parts[-1]] = value


def is_identity(mapping: FieldMapping) -> bool:
    return not (
        mapping.fields
        or mapping.success_from_reward
        or mapping.roles
        or mapping.defaults
        or mapping.drop
        or mapping.derive_steps
    )


def apply_mapping(record: dict[str, Any], mapping: FieldMapping) -> dict[str, Any]:
    """Rewrite `record` (in place) into our layout. Raises `MappingError` naming the field."""
    if not is_identity(mapping):
        _map_fields(record, mapping)
    normalise_arguments(record)
    return record


def _map_fields(record: dict[str, Any], mapping: FieldMapping) -> None:
    moved = []
    for ours, theirs in mapping.fields.items():
        value = pop_path(record, theirs)
        if value is _MISSING:
            raise MappingError(f"mapped field '{theirs}' (-> {ours}) is missing")
        moved.append((ours, value))
    for ours, value in moved:
        set_path(record, ours, value)
    if mapping.success_from_reward:
        reward = pop_path(record, mapping.success_from_reward)
        if reward is _MISSING:
            raise MappingError(f"reward field '{mapping.success_from_reward}' is missing")
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise MappingError(
                f"reward '{mapping.success_from_reward}' is not a number: {reward!r}"
            )
        record["success"] = reward >= mapping.success_threshold
    for key in mapping.drop:
        pop_path(record, key)
    for key, value in mapping.defaults.items():
        if get_path(record, key) is _MISSING:
            set_path(record, key, value)
    if mapping.roles:
        for message in _messages(record):
            role = message.get("role")
            if isinstance(role, str) and role in mapping.roles:
                message["role"] = mapping.roles[role]
    if mapping.derive_steps and "steps" not in record:
        record["steps"] = count_steps(_messages(record))


def normalise_arguments(record: dict[str, Any]) -> int:
    """Tool-call arguments logged as objects become JSON strings; returns how many changed."""
    changed = 0
    for message in _messages(record):
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), dict | list):
                function["arguments"] = json.dumps(function["arguments"], ensure_ascii=False)
                changed += 1
    return changed


def _messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    messages = record.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]
