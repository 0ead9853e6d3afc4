"""Bounds on a tool call: what the call plumbing refuses before any tool or parser sees it.

An agent (or whoever writes its logs) can send anything: arguments nested 100k deep (Python's
parser dies with `RecursionError`), a 5,000-digit integer (`ValueError` from `int`), `NaN` or
`1e999` (accepted by `json.loads`, then written back out as the non-JSON `NaN` / `Infinity`), a
10 MB tool name. One check serves both sides, so that what training data may hold is exactly
what the environment accepts: `Environment.step` turns a call out of bounds into an error
observation, and ingest quarantines a logged trajectory holding one (`out_of_bounds`).

Malformed JSON is not out of bounds: it is an ordinary agent fault, answered by `step` and
counted by the gates and curation. The limits are far above anything a real call needs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

MAX_NAME_CHARS = 128  # a tool name; longer names are refused, and shown truncated
SHOWN_NAME_CHARS = 64  # how much of a refused name an error message echoes
MAX_ARGUMENT_CHARS = 65_536  # the arguments' JSON text (or any one string inside it)
MAX_DEPTH = 32  # nesting of objects and arrays (the arguments object itself is depth 1)
MAX_NODES = 10_000  # values in one arguments object, all levels together
MAX_NUMBER = 10**15  # |number|: exact as a float64, above any amount, id or count
_MAX_INT_DIGITS = len(str(MAX_NUMBER))
# Tuples, not `int | float`: a union in `isinstance` is built again on every call (ingest checks
# every logged call's arguments).
_NUMBERS = (int, float)
_CONTAINERS = (dict, list)


class OutOfBounds(ValueError):
    """A tool call breaks a bound; the message says which (and never echoes the value)."""


def shown(text: object, limit: int = SHOWN_NAME_CHARS) -> str:
    """`text` cut to `limit` characters for an error message, saying how much was cut."""
    value = text if isinstance(text, str) else repr(type(text).__name__)
    if len(value) <= limit:
        return value
    return f"{value[:limit]}... ({len(value):,} chars)"


def check_name(name: object) -> None:
    """A tool name must be a short string."""
    if not isinstance(name, str):
        raise OutOfBounds(f"tool name must be a string, not {type(name).__name__}")
    if len(name) > MAX_NAME_CHARS:
        raise OutOfBounds(f"tool name longer than {MAX_NAME_CHARS} chars ({len(name):,})")


def _number(value: int | float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise OutOfBounds("arguments hold a non-finite number (NaN or Infinity is not JSON)")
    if abs(value) > MAX_NUMBER:
        raise OutOfBounds(f"arguments hold a number beyond +/-{MAX_NUMBER:.0e}")


def check_value(value: Any) -> None:
    """Depth, size, numbers and key types of a decoded value, walked without recursion (a
    dict built in Python can be nested deeper than the interpreter's stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise OutOfBounds(f"arguments hold more than {MAX_NODES:,} values")
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, _NUMBERS):
            _number(item)
        elif isinstance(item, str):
            if len(item) > MAX_ARGUMENT_CHARS:
                raise OutOfBounds(f"an argument string is longer than {MAX_ARGUMENT_CHARS:,} chars")
        elif isinstance(item, _CONTAINERS):
            if depth > MAX_DEPTH:
                raise OutOfBounds(f"arguments nested deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                if not all(isinstance(k, str) for k in item):
                    raise OutOfBounds("argument keys must be strings")
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
        else:
            raise OutOfBounds(f"arguments hold a {type(item).__name__}, not a JSON value")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:  # before `int()`: 5,000 digits raise ValueError
        raise OutOfBounds(f"arguments hold a number beyond +/-{MAX_NUMBER:.0e}")
    number = int(text)
    _number(number)
    return number


def _parse_float(text: str) -> float:
    number = float(text)
    _number(number)
    return number


def _reject_constant(name: str) -> Any:
    raise OutOfBounds(f"arguments hold {name}, which is not JSON")


def decode_arguments(raw: str) -> Any:
    """Strict JSON within the bounds. Raises `OutOfBounds`, or `json.JSONDecodeError` for
    text that is simply not JSON."""
    if len(raw) > MAX_ARGUMENT_CHARS:
        raise OutOfBounds(f"arguments longer than {MAX_ARGUMENT_CHARS:,} chars ({len(raw):,})")
    try:
        value = json.loads(
            raw,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_reject_constant,
        )
    except RecursionError:
        raise OutOfBounds(f"arguments nested deeper than {MAX_DEPTH} levels") from None
    check_value(value)
    return value


def parse_arguments(raw: object) -> dict[str, Any] | str:
    """Arguments as a bounded dict, or the message the agent gets back (never `eval`)."""
    try:
        if isinstance(raw, dict):
            check_value(raw)
            return raw
        if not isinstance(raw, str):
            return f"arguments must be a JSON object, not {type(raw).__name__}"
        value = decode_arguments(raw) if raw.strip() else {}
    except OutOfBounds as exc:
        return f"arguments refused: {exc}"
    except json.JSONDecodeError as exc:
        return f"arguments are not valid JSON: {exc.msg} at char {exc.pos}"
    if not isinstance(value, dict):
        return "arguments must be a JSON object"
    return value


# Verdicts on argument texts already checked (ingest meets the same calls in thousands of
# trajectories; parsing them again was a tenth of the ingest stage's time). Bounded: cleared
# when full, and only short texts are kept, so the cache stays a few MB at most.
_VERDICTS: dict[str, str | None] = {}
_VERDICTS_LIMIT = 20_000
_VERDICT_MAX_CHARS = 1_024


def call_problem(name: object, arguments: object) -> str | None:
    """Why a logged tool call is out of bounds, or None. Malformed JSON is not a problem here:
    it is an agent fault the gates count and curation filters, not a hostile value."""
    try:
        check_name(name)
    except OutOfBounds as exc:
        return str(exc)
    if not isinstance(arguments, str) or len(arguments) > _VERDICT_MAX_CHARS:
        return _arguments_problem(arguments)
    try:
        return _VERDICTS[arguments]
    except KeyError:
        pass
    problem = _arguments_problem(arguments)
    if len(_VERDICTS) >= _VERDICTS_LIMIT:
        _VERDICTS.clear()
    _VERDICTS[arguments] = problem
    return problem


# What can put a short arguments text out of bounds once decoded: a number of 16+ digits or
# with an exponent (beyond 10**15, or 1e999), a non-finite constant. Depth needs a bracket per
# level, values a character each, and a short text holds no long string.
_RISKY = re.compile(r"\d{16}|\d[eE]|NaN|Infinity")


def _surely_in_bounds(arguments: str) -> bool:
    """True only when no decoding of `arguments` can break a bound (then it is not parsed:
    ingest checks every logged call, and parsing was most of the check's time)."""
    return (
        len(arguments) <= _VERDICT_MAX_CHARS
        and arguments.count("{") + arguments.count("[") <= MAX_DEPTH
        and _RISKY.search(arguments) is None
    )


def _arguments_problem(arguments: object) -> str | None:
    import orjson

    try:
        if isinstance(arguments, str) and _surely_in_bounds(arguments):
            return None
        if not isinstance(arguments, str):
            check_value(arguments)
            return None
        if len(arguments) > MAX_ARGUMENT_CHARS:
            decode_arguments(arguments)  # raises with the length
        try:  # the fast path for ingest: orjson is strict (no NaN, no 1e999, no deep stacks)
            value = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            decode_arguments(arguments)  # says whether it is out of bounds or merely malformed
            return None
        check_value(value)
    except OutOfBounds as exc:
        return str(exc)
    except json.JSONDecodeError:
        return None
    return None


def calls_problem(calls: Iterable[tuple[object, object]]) -> str | None:
    """The first (name, arguments) pair out of bounds, as "call N: why"; None when all fit."""
    for i, (name, arguments) in enumerate(calls, start=1):
        problem = call_problem(name, arguments)
        if problem:
            return f"tool call {i} ({shown(name)}): {problem}"
    return None


def to_json(value: Any) -> str:
    """Strict JSON for a tool result: a non-finite float raises `ValueError` instead of being
    written as `NaN` / `Infinity`, which no JSON parser reads back."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=False)
