"""Quarantine: every line that cannot become a `Trajectory` is kept with where it came from and why.

Nothing is dropped silently: a quarantined line keeps its source, line number, a short reason
code (for counting: `invalid_json`, `schema:steps`, `duplicate_trajectory_id`, ...), a readable
detail, and the raw text (PII-scrubbed like everything else that is written).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError

# Reason codes. Schema reasons are `schema:<field path without list indices>`.
BLANK_LINE = "blank_line"
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MAPPING = "mapping"
DUPLICATE_ID = "duplicate_trajectory_id"
UNREADABLE_FILE = "unreadable_file"
OUT_OF_BOUNDS = "out_of_bounds"  # a tool call the environment would refuse (bounds.py)

_INDEX = re.compile(r"\.\d+(?=\.|$)")


@dataclass(frozen=True)
class QuarantineRecord:
    source: str
    line: int
    reason: str
    detail: str
    raw: str
    trajectory_id: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def schema_reason(exc: ValidationError) -> tuple[str, str]:
    """(reason code, detail) for a schema failure: the first error's field, all errors' text."""
    errors = exc.errors(include_url=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc), "type": "unknown"}
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    field = _INDEX.sub("", loc)
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors[:5]
    )
    if len(errors) > 5:
        detail += f"; ... {len(errors) - 5} more"
    return f"schema:{field}", detail


def decode_raw(raw: bytes) -> str:
    """Bytes as text for the quarantine file; undecodable bytes stay visible as escapes."""
    return raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")


def trajectory_id_of(record: Any) -> str | None:
    if isinstance(record, dict):
        value = record.get("trajectory_id")
        return value if isinstance(value, str) else None
    return None
