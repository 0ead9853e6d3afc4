"""The champion's history as a pure value: a stack of approved versions plus an event log.

Why a stack: `rollback` must return to the champion *before* the current one, and a second
rollback to the one before that, not bounce between two versions. Approvals push, rollbacks
pop; the event log keeps every change (and every rejection) for audit. The whole state is one
JSON document in one registered-model tag, so it is written in one request: under the registry
lock (`locking.py`) no two promoters can interleave their read-modify-write cycles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

MAX_EVENTS = 300  # ~250 bytes each; MLflow allows 100k characters per registered-model tag
MAX_STACK = 200

APPROVE, REJECT, ROLLBACK, RECONCILE, EXPIRE = (
    "approve",
    "reject",
    "rollback",
    "reconcile",
    "expire",
)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Event:
    """One decision: `version` is the version acted on, `previous` the champion before it."""

    action: str
    version: str
    previous: str | None
    by: str
    at: str
    note: str = ""
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.skipped:
            data.pop("skipped")
        return data


@dataclass(frozen=True)
class ChampionState:
    """`stack[-1]` is the champion as we recorded it; `history` is oldest first."""

    stack: tuple[str, ...] = ()
    history: tuple[Event, ...] = ()

    @property
    def top(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def as_dict(self) -> dict[str, Any]:
        return {"stack": list(self.stack), "history": [e.as_dict() for e in self.history]}


def dump_state(state: ChampionState) -> str:
    """Compact JSON, oldest events and stack entries trimmed to stay within the tag limit."""
    trimmed = ChampionState(state.stack[-MAX_STACK:], state.history[-MAX_EVENTS:])
    return json.dumps(trimmed.as_dict(), separators=(",", ":"), sort_keys=True)


def load_state(text: str | None) -> ChampionState:
    """Parse the tag; an absent tag is an empty history (a model that never had a champion)."""
    if not text:
        return ChampionState()
    data = json.loads(text)
    events = tuple(
        Event(**{k: v for k, v in e.items() if k in Event.__dataclass_fields__})
        for e in data.get("history", [])
    )
    return ChampionState(tuple(str(v) for v in data.get("stack", [])), events)


def record(state: ChampionState, event: Event) -> ChampionState:
    """Log an event that does not move the champion (a rejection, an expired approval)."""
    return replace(state, history=(*state.history, event))


def push(state: ChampionState, event: Event) -> ChampionState:
    """A new champion: on top of the stack, and in the log."""
    return ChampionState((*state.stack, event.version), (*state.history, event))


def reconcile(state: ChampionState, alias: str | None, at: str) -> ChampionState:
    """Trust the alias when it disagrees with our record.

    The alias is moved before the state tag is written, so a promoter that died in between
    leaves the alias ahead of the record: we adopt it (and log that we did) rather than
    roll back over a champion we never recorded.
    """
    if alias is None or state.top == alias:
        return state
    event = Event(RECONCILE, alias, state.top, "tracetune", at, "alias ahead of the record")
    return push(state, event)


def rollback_target(
    state: ChampionState, current: str, problem: Callable[[str], str | None]
) -> tuple[str | None, list[str], ChampionState]:
    """The champion to return to: pop `current`, then skip versions that are no longer usable.

    `problem(version)` says why a version cannot be champion again (deleted, rejected since),
    or None. Returns (target or None, skipped versions, the popped state).
    """
    stack = list(state.stack)
    if stack and stack[-1] == current:
        stack.pop()
    skipped: list[str] = []
    while stack:
        candidate = stack[-1]
        if candidate != current and problem(candidate) is None:
            return candidate, skipped, replace(state, stack=tuple(stack))
        skipped.append(candidate)
        stack.pop()
    return None, skipped, replace(state, stack=tuple(stack))
