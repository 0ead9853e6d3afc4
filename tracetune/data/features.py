"""Trajectories flattened to one row of derived columns, so that gates are plain GX expectations.

A trajectory is nested (messages, tool calls, tool answers); Great Expectations checks columns.
Each function here derives one column from a trajectory (a dict as read from JSONL) and is pure,
so it is unit-tested on its own; the gates then say "`unanswered_calls` is 0 for 99% of rows".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from tracetune.trajectories.tool_errors import DEFAULT_RULE, ToolErrorRule

REQUIRED_FIELDS = (
    "trajectory_id",
    "task_id",
    "family",
    "timestamp",
    "model",
    "messages",
    "success",
    "steps",
    "usage",
    "cost_usd",
    "latency_s",
)

KNOWN_ROLES = frozenset({"system", "user", "assistant", "tool"})


def roles_ok(messages: Sequence[dict[str, Any]]) -> bool:
    """What holds for every real conversation, whatever harness logged it: known roles and at
    least one assistant turn. No fixed order: a conversation may open with the assistant's
    greeting, carry a mid-conversation system note, or end with the user's goodbye or a
    hand-off tool's result; that each tool call is answered and no tool message is an orphan is
    checked by `unanswered_calls` and `orphan_tool_messages`.
    """
    roles = [m.get("role") for m in messages]
    return all(r in KNOWN_ROLES for r in roles) and "assistant" in roles


def tool_calls(messages: Sequence[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    """(id, name, arguments) of every tool call, in order."""
    calls = []
    for message in messages:
        if message.get("role") != "assistant":
            continue
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            calls.append(
                (str(call.get("id")), str(function.get("name")), function.get("arguments"))
            )
    return calls


def arguments_ok(arguments: Any) -> bool:
    """Arguments are a JSON object (as a string, the OpenAI format)."""
    if not isinstance(arguments, str):
        return isinstance(arguments, dict)
    try:
        return isinstance(orjson.loads(arguments), dict)
    except orjson.JSONDecodeError:
        return False


def bad_arguments(calls: Iterable[tuple[str, str, Any]]) -> int:
    return sum(1 for _, _, args in calls if not arguments_ok(args))


def unknown_tools(calls: Iterable[tuple[str, str, Any]], known: frozenset[str]) -> int:
    return sum(1 for _, name, _ in calls if name not in known)


def unanswered_calls(messages: Sequence[dict[str, Any]]) -> int:
    """Tool calls that no later tool message answers (by `tool_call_id`)."""
    open_ids: list[str] = []
    answered: set[str] = set()
    for message in messages:
        if message.get("role") == "assistant":
            open_ids += [str(c.get("id")) for c in message.get("tool_calls") or ()]
        elif message.get("role") == "tool":
            answered.add(str(message.get("tool_call_id")))
    return sum(1 for call_id in open_ids if call_id not in answered)


def orphan_tool_messages(messages: Sequence[dict[str, Any]]) -> int:
    """Tool messages that answer no earlier call."""
    called: set[str] = set()
    orphans = 0
    for message in messages:
        if message.get("role") == "assistant":
            called.update(str(c.get("id")) for c in message.get("tool_calls") or ())
        elif message.get("role") == "tool" and str(message.get("tool_call_id")) not in called:
            orphans += 1
    return orphans


def empty_assistant_turns(messages: Sequence[dict[str, Any]]) -> int:
    """Assistant turns with neither text nor a tool call: nothing to learn, a template hazard."""
    return sum(
        1
        for m in messages
        if m.get("role") == "assistant"
        and not (m.get("content") or "").strip()
        and not m.get("tool_calls")
    )


def epoch_seconds(value: Any) -> float | None:
    """An ISO-8601 timestamp with a time zone as Unix seconds; None when absent or naive."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.timestamp() if parsed.tzinfo is not None else None


def iso_utc(moment: datetime) -> str:
    """A moment as ISO 8601 in UTC to the second (`2026-11-22T09:30:00Z`): what Data Docs show.

    One fixed width and zone, so that SQL compares these strings in time order; the raw gate's
    bounds are written the same way.
    """
    return moment.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"


def iso_timestamp(value: Any) -> str | None:
    """A logged timestamp (ISO 8601 with a time zone) as `iso_utc`; None when absent or naive."""
    seconds = epoch_seconds(value)
    return None if seconds is None else iso_utc(datetime.fromtimestamp(seconds, UTC))


def missing_fields(record: dict[str, Any]) -> int:
    return sum(1 for key in REQUIRED_FIELDS if record.get(key) in (None, "", []))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# Column name -> SQLite type, in table order: what the raw-batch gate sees of each trajectory.
# `source` and `line` say where the trajectory was logged (the log object and its line, or item
# number for a document); `timestamp` is `iso_utc` text, declared DATETIME so that GX's range
# check accepts the column (SQLite keeps the text as is).
RAW_COLUMNS: dict[str, str] = {
    "source": "TEXT",
    "line": "INTEGER",
    "trajectory_id": "TEXT",
    "task_id": "TEXT",
    "family": "TEXT",
    "missing_fields": "INTEGER",
    "roles_ok": "INTEGER",
    "tool_calls": "INTEGER",
    "bad_arguments": "INTEGER",
    "unknown_tools": "INTEGER",
    "unanswered_calls": "INTEGER",
    "orphan_tool_messages": "INTEGER",
    "tool_errors": "INTEGER",
    "steps": "INTEGER",
    "steps_consistent": "INTEGER",
    "usage_estimated": "INTEGER",
    "total_tokens": "INTEGER",
    "cost_usd": "REAL",
    "latency_s": "REAL",
    "timestamp": "DATETIME",
}


def raw_row(
    record: dict[str, Any],
    known_tools: frozenset[str],
    line: int = 0,
    rule: ToolErrorRule = DEFAULT_RULE,
    source: str = "",
) -> dict[str, Any]:
    """One ingested trajectory as the raw-batch gate's row (`source`, `line`: where it lies).

    Estimated usage and cost (ingest fills them in for logs without any) are NULL here: range
    checks skip NULLs, so a gate never fails a row for a number tracetune estimated itself.
    The message columns come from one pass over the messages (`_message_columns`), the same
    values as the column functions above give (compared in tests/unit/test_raw_row.py).
    """
    messages = [m for m in record.get("messages") or () if isinstance(m, dict)]
    columns = _message_columns(messages, known_tools, rule)
    usage = record.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    estimated = bool(usage.get("estimated"))
    tokens = [_number(usage.get(k)) for k in ("prompt_tokens", "completion_tokens")]
    logged_tokens = int(sum(tokens)) if None not in tokens else None  # type: ignore[arg-type]
    steps = record.get("steps")
    return {
        "source": source,
        "line": line,
        "trajectory_id": record.get("trajectory_id"),
        "task_id": record.get("task_id"),
        "family": record.get("family"),
        "missing_fields": missing_fields(record),
        "roles_ok": columns[0],
        "tool_calls": columns[1],
        "bad_arguments": columns[2],
        "unknown_tools": columns[3],
        "unanswered_calls": columns[4],
        "orphan_tool_messages": columns[5],
        "tool_errors": columns[6],
        "steps": steps if isinstance(steps, int) else None,
        "steps_consistent": int(steps == columns[7]),
        "usage_estimated": int(estimated),
        "total_tokens": None if estimated else logged_tokens,
        "cost_usd": None if record.get("cost_estimated") else _number(record.get("cost_usd")),
        "latency_s": _number(record.get("latency_s")),
        "timestamp": iso_timestamp(record.get("timestamp")),
    }


def _message_columns(
    messages: Sequence[dict[str, Any]], known_tools: frozenset[str], rule: ToolErrorRule
) -> tuple[int, int, int, int, int, int, int, int]:
    """(roles_ok, tool_calls, bad_arguments, unknown_tools, unanswered_calls,
    orphan_tool_messages, tool_errors, assistant turns) in one pass over the messages.

    Each column function walks the messages again (seven passes per trajectory, most of the
    raw gate's per-row cost); this is their loops fused, in the same order, so that each
    counts what it counted: roles are tested as `all()` tests them (up to the first unknown),
    a call's id joins the answered / called sets when its message is reached.
    """
    roles_known = True
    assistants = n_calls = bad = unknown = orphans = errors = 0
    call_ids: list[str] = []
    called: set[str] = set()
    answered: set[str] = set()
    for message in messages:
        role = message.get("role")
        if roles_known and role not in KNOWN_ROLES:
            roles_known = False
        if role == "assistant":
            assistants += 1
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                call_id = str(call.get("id"))
                call_ids.append(call_id)
                called.add(call_id)
                n_calls += 1
                unknown += str(function.get("name")) not in known_tools
                bad += not arguments_ok(function.get("arguments"))
        elif role == "tool":
            answer = str(message.get("tool_call_id"))
            answered.add(answer)
            orphans += answer not in called
            errors += rule.matches(message.get("content"))
    unanswered = sum(1 for call_id in call_ids if call_id not in answered)
    roles = int(roles_known and assistants > 0)
    return roles, n_calls, bad, unknown, unanswered, orphans, errors, assistants


def _raw_rows_chunk(
    args: tuple[list[bytes], frozenset[str], int, ToolErrorRule, str],
) -> list[dict[str, Any]]:
    lines, known, first, rule, source = args
    return [
        raw_row(orjson.loads(line), known, first + i, rule, source) for i, line in enumerate(lines)
    ]


def raw_rows(
    lines: Iterable[bytes],
    known_tools: frozenset[str],
    workers: int = 1,
    rule: ToolErrorRule = DEFAULT_RULE,
    source: str = "",
) -> Iterator[dict[str, Any]]:
    """Gate rows for the JSONL lines of `source` (line numbers from 1), derived in `workers`
    processes. `with_origins` then points each row at the production log it came from."""
    from tracetune.trajectories.io import chunked, ordered_map

    jobs = (
        (chunk, known_tools, 1 + i * 1000, rule, source)
        for i, chunk in enumerate(chunked(lines, 1000))
    )
    for rows in ordered_map(_raw_rows_chunk, jobs, workers):
        yield from rows


Origins = Callable[[list[str]], dict[str, tuple[str, int]]]


def with_origins(
    rows: Iterable[dict[str, Any]], origins: Origins, chunk: int = 500
) -> Iterator[dict[str, Any]]:
    """Rows whose `source` and `line` are the production log's, where `origins` (trajectory id ->
    (log object, line), e.g. `ingest.read_origins`) knows them; the others keep theirs (the
    batch file and its line), so every row still points somewhere real.

    Looked up a chunk of rows at a time: memory stays bounded however large the batch.
    """
    from tracetune.trajectories.io import chunked

    for part in chunked(rows, chunk):
        ids = [str(r["trajectory_id"]) for r in part if r.get("trajectory_id") is not None]
        found = origins(ids)
        for row in part:
            origin = found.get(str(row.get("trajectory_id")))
            if origin is not None:
                row["source"], row["line"] = origin
            yield row


CURATED_COLUMNS: dict[str, str] = {
    "source": "TEXT",
    "line": "INTEGER",
    "split": "TEXT",
    "trajectory_id": "TEXT",
    "task_id": "TEXT",
    "family": "TEXT",
    "success": "INTEGER",
    "steps": "INTEGER",
    "empty_assistant_turns": "INTEGER",
    "content_hash": "TEXT",
    "leaks_heldout_task": "INTEGER",
    "pii_found": "INTEGER",
}


def curated_row(
    record: dict[str, Any],
    split: str,
    content_hash: str,
    heldout_tasks: frozenset[str],
    pii_found: int,
    line: int = 0,
    source: str = "",
) -> dict[str, Any]:
    """One curated trajectory as the curated-set gate's row (`source`, `line`: where it lies)."""
    messages = [m for m in record.get("messages") or () if isinstance(m, dict)]
    task_id = record.get("task_id")
    return {
        "source": source,
        "line": line,
        "split": split,
        "trajectory_id": record.get("trajectory_id"),
        "task_id": task_id,
        "family": record.get("family"),
        "success": int(bool(record.get("success"))),
        "steps": record.get("steps"),
        "empty_assistant_turns": empty_assistant_turns(messages),
        "content_hash": content_hash,
        "leaks_heldout_task": int(split != "heldout" and task_id in heldout_tasks),
        "pii_found": pii_found,
    }
