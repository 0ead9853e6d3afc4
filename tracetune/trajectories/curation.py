"""Curation: the recipe's golden filter, then exact and near-duplicate removal.

Golden = the episode succeeded, in fewer than `step_limit` steps, with no error retries and no
redundant tool call (the same call with the same arguments twice). Each rule can be switched off
in params and reports how many trajectories it dropped: `dropped` counts each trajectory under
the first rule it fails (these sum to the total dropped), `failing` under every rule it fails.

Duplicates: `exact` = same task and byte-identical messages (a re-logged session);
`near` = equal after normalising case, whitespace, punctuation, JSON key order and call ids (the
same episode logged by another client or SDK version). Keys are checked against an on-disk set,
so memory does not grow with the data. PII was scrubbed at ingest, before anything was written.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TextIO

import orjson

from tracetune.config import CurateParams
from tracetune.data.features import empty_assistant_turns, tool_calls
from tracetune.trajectories.io import DiskSet, chunked, ordered_map
from tracetune.trajectories.pii import has_pseudonym
from tracetune.trajectories.tool_errors import DEFAULT_RULE, ToolErrorRule

RULES = (
    "success",
    "step_limit",
    "error_retries",
    "redundant_calls",
    "empty_turns",
    "pseudonymised",
    "exact_duplicate",
    "near_duplicate",
)
_NON_WORD = re.compile(r"\W+")


def _ascii_non_word_table() -> bytes:
    """`bytes.translate` table: every ASCII character `\\W` matches becomes a space."""
    word = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
    return bytes(c if c in word else 32 for c in range(256))


_ASCII_NON_WORD = _ascii_non_word_table()


def words_only(text: str) -> str:
    """`_NON_WORD.sub(" ", text).strip()`: runs of non-word characters become one space.

    ASCII text (nearly every trajectory) is mapped byte by byte and re-split instead: the
    regex over a trajectory's whole text was most of `near_key`'s time. In ASCII, `\\w` is
    `[A-Za-z0-9_]` and every whitespace character is a non-word one, so splitting the mapped
    text on whitespace gives exactly the runs of word characters (a test compares the two).
    """
    if text.isascii():
        return " ".join(text.encode("ascii").translate(_ASCII_NON_WORD).decode("ascii").split())
    return _NON_WORD.sub(" ", text).strip()


def canonical_arguments(arguments: Any) -> str:
    """Arguments as canonical JSON (sorted keys), or the raw text when they do not parse."""
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return arguments
    try:
        return orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # e.g. an integer beyond 64 bits
        return json.dumps(arguments, sort_keys=True, ensure_ascii=False)


def redundant_calls(messages: Sequence[dict[str, Any]]) -> int:
    """Calls that repeat an earlier call of the same tool with the same arguments."""
    seen: set[tuple[str, str]] = set()
    repeats = 0
    for _, name, args in tool_calls(messages):
        key = (name, canonical_arguments(args))
        repeats += key in seen
        seen.add(key)
    return repeats


def error_retries(messages: Sequence[dict[str, Any]], rule: ToolErrorRule = DEFAULT_RULE) -> int:
    """Failed tool calls after which the agent called a tool again (it had to retry).

    A failed call the agent reports on (`order O-9 was not found`) is no retry: that is the
    correct behaviour for a missing record.
    """
    retries, failed_pending = 0, False
    for message in messages:
        role = message.get("role")
        if role == "tool" and rule.matches(message.get("content")):
            failed_pending = True
        elif role == "assistant" and message.get("tool_calls"):
            retries += failed_pending
            failed_pending = False
        elif role == "assistant":
            failed_pending = False
    return retries


def golden_failures(
    record: dict[str, Any],
    params: CurateParams,
    text: str = "",
    rule: ToolErrorRule = DEFAULT_RULE,
) -> list[str]:
    """The golden-filter rules `record` fails, in rule order (empty: it is golden)."""
    return _judge_record(record, params, text, rule)[0]


def retries_and_errors(
    messages: Sequence[dict[str, Any]], rule: ToolErrorRule = DEFAULT_RULE
) -> tuple[int, int]:
    """(`error_retries(messages, rule)`, `rule.count(messages)`) from one walk: both ask the
    rule about every tool message, and curation needs both for every trajectory."""
    retries, failed_pending, errors = 0, False, 0
    for message in messages:
        role = message.get("role")
        if role == "tool" and rule.matches(message.get("content")):
            failed_pending = True
            errors += 1
        elif role == "assistant" and message.get("tool_calls"):
            retries += failed_pending
            failed_pending = False
        elif role == "assistant":
            failed_pending = False
    return retries, errors


def _judge_record(
    record: dict[str, Any], params: CurateParams, text: str, rule: ToolErrorRule
) -> tuple[list[str], int]:
    """`golden_failures` and the count of failed tool calls, the messages walked once for
    both (they were collected twice and asked about twice per trajectory)."""
    messages = [m for m in record.get("messages") or () if isinstance(m, dict)]
    failures = []
    if params.require_success and not record.get("success"):
        failures.append("success")
    if int(record.get("steps") or 0) >= params.step_limit:
        failures.append("step_limit")
    retried, errors = retries_and_errors(messages, rule)
    retries = max(int(record.get("error_retries") or 0), retried)
    if retries > params.max_error_retries:
        failures.append("error_retries")
    if params.drop_redundant_calls and redundant_calls(messages):
        failures.append("redundant_calls")
    if params.drop_empty_turns and empty_assistant_turns(messages):
        failures.append("empty_turns")
    if not params.keep_pseudonymised and has_pseudonym(text or json.dumps(record)):
        failures.append("pseudonymised")
    return failures, errors


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def exact_key(record: dict[str, Any]) -> str:
    """Same task, same messages, byte for byte (ids and timestamps of the log line aside)."""
    return _digest(orjson.dumps([record.get("task_id"), record.get("messages")]))


def near_key(record: dict[str, Any]) -> str:
    """The episode with case, whitespace, punctuation, JSON key order and call ids normalised."""
    parts = []
    for message in record.get("messages") or ():
        role, content = message.get("role"), message.get("content")
        parts.append(str(role))
        if isinstance(content, str):
            parts.append(canonical_arguments(content) if role == "tool" else content)
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            parts.append(str(function.get("name")))
            parts.append(canonical_arguments(function.get("arguments")))
    return _digest(words_only(" | ".join(parts).lower()).encode())


class Judged(NamedTuple):
    """A worker's verdict on one line (the line itself stays in the main process)."""

    family: str
    failures: list[str]
    exact: str
    near: str
    tool_errors: int = 0


def judge_chunk(args: tuple[list[str], CurateParams, ToolErrorRule]) -> list[Judged]:
    lines, params, rule = args
    out = []
    for line in lines:
        record = orjson.loads(line)
        failures, errors = _judge_record(record, params, line, rule)
        golden = not failures  # only golden trajectories take part in dedupe: key them alone
        exact = exact_key(record) if golden and params.dedupe_exact else ""
        near = near_key(record) if golden and params.dedupe_near else ""
        out.append(Judged(str(record.get("family")), failures, exact, near, errors))
    return out


@dataclass
class CurateReport:
    input: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # by first failing rule
    failing: Counter[str] = field(default_factory=Counter)  # by every failing rule
    families_in: Counter[str] = field(default_factory=Counter)
    families_kept: Counter[str] = field(default_factory=Counter)
    with_tool_errors: int = 0  # trajectories with a failed tool call (`tool_errors` rule)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "kept": self.kept,
            "dropped": sum(self.dropped.values()),
            "dropped_by_rule": {r: self.dropped[r] for r in RULES},
            "failing_by_rule": {r: self.failing[r] for r in RULES},
            "families_in": dict(sorted(self.families_in.items())),
            "families_kept": dict(sorted(self.families_kept.items())),
            "with_tool_errors": self.with_tool_errors,
            "keep_rate": round(self.kept / self.input, 4) if self.input else None,
            "seconds": round(self.seconds, 2),
        }


def curate(
    lines: Iterable[str],
    params: CurateParams,
    out: TextIO,
    workers: int = 1,
    chunk: int = 500,
    rule: ToolErrorRule = DEFAULT_RULE,
) -> CurateReport:
    """Stream ingested trajectory lines through the golden filter and dedupe into `out`.

    `rule` says which tool results are failed calls (the error-retry rule's input).
    """
    report = CurateReport()
    exact_seen, near_seen = DiskSet(), DiskSet()
    sent: deque[list[str]] = deque()  # chunks in flight, in order: verdicts come back alone

    def jobs() -> Iterator[tuple[list[str], CurateParams, ToolErrorRule]]:
        for part in chunked(lines, chunk):
            sent.append(part)
            yield part, params, rule

    try:
        for judged in ordered_map(judge_chunk, jobs(), workers):
            duplicate = _duplicates(judged, params, exact_seen, near_seen)
            for line, item, dup in zip(sent.popleft(), judged, duplicate, strict=True):
                _keep_or_drop(line, item, dup, report, out)
    finally:
        exact_seen.close()
        near_seen.close()
    return report


def _duplicates(
    judged: list[Judged], params: CurateParams, exact_seen: DiskSet, near_seen: DiskSet
) -> list[str]:
    """Per verdict of a chunk, in order: "exact_duplicate", "near_duplicate" or "" (new, or
    not golden: only golden trajectories take part in dedupe). A near key is looked up only
    when the exact key was new, as one trajectory at a time did; each key set is asked once
    per chunk (`DiskSet.add_many`)."""
    out = [""] * len(judged)
    golden = [i for i, item in enumerate(judged) if not item.failures]
    if params.dedupe_exact:
        fresh = exact_seen.add_many([judged[i].exact for i in golden])
        for i, new in zip(golden, fresh, strict=True):
            if not new:
                out[i] = "exact_duplicate"
        golden = [i for i, new in zip(golden, fresh, strict=True) if new]
    if params.dedupe_near:
        fresh = near_seen.add_many([judged[i].near for i in golden])
        for i, new in zip(golden, fresh, strict=True):
            if not new:
                out[i] = "near_duplicate"
    return out


def _keep_or_drop(
    line: str, item: Judged, duplicate: str, report: CurateReport, out: TextIO
) -> None:
    report.input += 1
    report.families_in[item.family] += 1
    report.with_tool_errors += item.tool_errors > 0
    failures = [*item.failures, duplicate] if duplicate else item.failures
    if failures:
        report.dropped[failures[0]] += 1
        for rule in failures:  # not Counter.update: its Mapping check cost more than the count
            report.failing[rule] += 1
        return
    report.kept += 1
    report.families_kept[item.family] += 1
    out.write(line + "\n")
