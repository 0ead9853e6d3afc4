"""What every log-format reader is: recognise a record, split a document, convert an item.

A reader knows one format and nothing about where bytes come from or what was read before
(ingest owns the watermark). It turns one item of its format (a JSONL line, an element of a JSON
array, one trace) into a dict in our layout, with the user's `ingest.mapping` applied at the
point where the format's own fields are visible, or raises `ReadError` with a reason code that
quarantines the item.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

from tracetune.config import FieldMapping
from tracetune.trajectories.schema import count_steps


class ReadError(ValueError):
    """One item cannot become a trajectory; `reason` is the quarantine code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


class Reader(ABC):
    """One log format. Subclasses are stateless; ingest holds one instance per format."""

    name: ClassVar[str]
    # Fields a reader exposes to the mapping beside ours (trace tags, span attributes, ...):
    # `ingest.mapping` may read them; they are removed before validation.
    context_keys: ClassVar[tuple[str, ...]] = ()
    # True when items need the whole object (spans of one trace spread over several lines).
    whole_object: ClassVar[bool] = False

    @abstractmethod
    def recognises(self, value: Any) -> bool:
        """Whether one record (a JSONL line, an array element, a whole document) is ours."""

    @abstractmethod
    def to_record(self, item: Any, mapping: FieldMapping) -> dict[str, Any]:
        """One item -> a dict in our layout (validated by the caller). Raises `ReadError`."""

    def items(self, document: Any) -> Iterator[Any]:
        """The items of a whole JSON document: itself, its elements, or the list it holds."""
        if isinstance(document, list):
            yield from document
            return
        if self.recognises(document):
            yield document
            return
        if isinstance(document, dict):
            key = held_list(document, self.recognises)
            if key is not None:
                yield from document[key]
                return
        raise ReadError(
            "unrecognised_format", f"{describe(document)}: no {self.name} records in it"
        )

    def finish(self, record: dict[str, Any]) -> dict[str, Any]:
        """Derive what the format never logs (steps = assistant turns) and drop the context."""
        for key in self.context_keys:
            record.pop(key, None)
        messages = record.get("messages")
        if "steps" not in record and isinstance(messages, list):
            record["steps"] = count_steps([m for m in messages if isinstance(m, dict)])
        return record


def held_list(document: dict[str, Any], recognises: Any) -> str | None:
    """The one key of `document` whose value is a non-empty list of recognised records.

    Raises `ReadError` when several keys qualify: which one holds the runs is then the user's
    call, not ours.
    """
    keys = [
        key
        for key, value in document.items()
        if isinstance(value, list) and value and recognises(value[0])
    ]
    if len(keys) > 1:
        raise ReadError(
            "unrecognised_format",
            f"an object holding several lists of records ({', '.join(keys)}): keep one per file",
        )
    return keys[0] if keys else None


def describe(value: Any) -> str:
    """A short description of a JSON value for error messages (keys, never values: PII)."""
    if isinstance(value, dict):
        keys = sorted(str(k) for k in value)
        shown = ", ".join(keys[:12]) + (f", ... {len(keys) - 12} more" if len(keys) > 12 else "")
        return f"a JSON object with keys [{shown}]"
    if isinstance(value, list):
        first = describe(value[0]) if value else "nothing"
        return f"a JSON array of {len(value)} (the first: {first})"
    return f"a JSON {type(value).__name__}"
