"""Read logs whose layout differs from ours through a small declarative mapping (params.yaml).

A team that logs `{"conversation": [...], "reward": 1, "meta": {"task": ...}}` maps it with
`fields: {messages: conversation, task_id: meta.task}` and `success_from_reward: reward` instead
of writing a parser. Every rename is explicit; a mapped field that is missing is an error that
names the field (the line is quarantined with it), never a silent default.

Two normalisations need no mapping: tool-call arguments logged as JSON objects (many SDKs do) are
re-serialised to the JSON string the OpenAI format and our schema carry, and ids logged as other
JSON scalars (integer task ids) become strings. What real logs lack can be made explicit: an id
from the content or from several fields (`derive_id`), success from a score or a yes/no label.

Dotted paths also reach keys that contain dots themselves (OpenTelemetry and MLflow attribute
names such as `gen_ai.request.model`): at each level the longest key that matches wins.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import orjson

from tracetune.config import FieldMapping
from tracetune.trajectories.schema import count_steps

_MISSING = object()


class MappingError(ValueError):
    """A record does not have what the mapping says it has."""


def _locate(record: dict[str, Any], dotted: str) -> tuple[list[tuple[dict[str, Any], str]], Any]:
    """The chain of (parent, key) down to `dotted` and the value there (or `_MISSING`).

    A key holding dots (`gen_ai.usage.input_tokens`) is matched whole before it is split, the
    longest match first, so attribute names of OpenTelemetry and MLflow need no escaping.
    """
    chain: list[tuple[dict[str, Any], str]] = []
    node: Any = record
    rest = dotted
    while True:
        if not isinstance(node, dict):
            return chain, _MISSING
        if rest in node:
            chain.append((node, rest))
            return chain, node[rest]
        parts = rest.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in node:
                chain.append((node, head))
                node, rest = node[head], ".".join(parts[cut:])
                break
        else:
            return chain, _MISSING


def get_path(record: dict[str, Any], dotted: str) -> Any:
    """`record["a"]["b"]` for `a.b`, or `_MISSING`."""
    return _locate(record, dotted)[1]


def pop_path(record: dict[str, Any], dotted: str) -> Any:
    """Remove and return the value at `a.b`; drops parents left empty by the removal."""
    chain, value = _locate(record, dotted)
    if value is _MISSING:
        return _MISSING
    parent, key = chain[-1]
    del parent[key]
    for (grand, gkey), (child, _) in zip(reversed(chain[:-1]), reversed(chain[1:]), strict=True):
        if child:
            break
        del grand[gkey]
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
        or mapping.derive_id
    )


ID_FIELDS = ("trajectory_id", "task_id")

_YES = frozenset({"true", "yes", "y", "pass", "passed", "correct", "success", "resolved"})
_NO = frozenset({"false", "no", "n", "fail", "failed", "incorrect", "failure", "unresolved"})


def apply_mapping(record: dict[str, Any], mapping: FieldMapping) -> dict[str, Any]:
    """Rewrite `record` (in place) into our layout. Raises `MappingError` naming the field."""
    if not is_identity(mapping):
        derived = derive_id(record, mapping.derive_id) if mapping.derive_id else None
        _map_fields(record, mapping)
        if derived is not None and record.get("trajectory_id") is None:
            record["trajectory_id"] = derived
    normalise_ids(record)
    normalise_arguments(record)
    return record


def derive_id(record: dict[str, Any], rule: list[str] | str) -> str:
    """An id for a record that logs none: a content hash, or their fields joined by ':'.

    The hash covers the whole record as read (sorted keys), so a re-delivered record gets the
    same id (and is quarantined as a duplicate) while two runs that differ in anything do not.
    """
    if rule == "content":
        digest = hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest()
        return f"c-{digest[:20]}"
    parts = []
    for path in rule:
        value = get_path(record, path)
        if value is _MISSING or value is None:
            raise MappingError(f"id field '{path}' (derive_id) is missing")
        if isinstance(value, dict | list):
            raise MappingError(f"id field '{path}' (derive_id) is not a scalar: {value!r}")
        parts.append(scalar_str(value))
    return ":".join(parts)


def scalar_str(value: Any) -> str:
    """A JSON scalar as an id string: 12 -> "12", 12.0 -> "12", true -> "true"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def normalise_ids(record: dict[str, Any]) -> None:
    """Ids logged as numbers or booleans (integer task ids) become the strings we key on."""
    for key in ID_FIELDS:
        value = record.get(key)
        if isinstance(value, int | float) and not (
            isinstance(value, float) and not math.isfinite(value)
        ):
            record[key] = scalar_str(value)


def as_score(value: Any, field: str) -> float:
    """A reward, score or label as a number: booleans, numbers, numeric strings, yes/no words."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _YES:
            return 1.0
        if text in _NO:
            return 0.0
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            if math.isfinite(number):
                return number
    raise MappingError(f"reward '{field}' is not a number or a yes/no label: {value!r}")


def _map_fields(record: dict[str, Any], mapping: FieldMapping) -> None:
    moved = []
    for ours, theirs in mapping.fields.items():
        value = get_path(record, theirs)
        if value is _MISSING:
            raise MappingError(f"mapped field '{theirs}' (-> {ours}) is missing")
        moved.append((ours, value))
    for theirs in dict.fromkeys(mapping.fields.values()):  # one field may feed two of ours
        pop_path(record, theirs)
    for ours, value in moved:
        set_path(record, ours, value)
    if mapping.success_from_reward:
        reward = pop_path(record, mapping.success_from_reward)
        if reward is _MISSING:
            raise MappingError(f"reward field '{mapping.success_from_reward}' is missing")
        record["success"] = as_score(reward, mapping.success_from_reward) >= (
            mapping.success_threshold
        )
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
