"""Log-format readers and how ingest picks one per log object: by content, never by name.

`detect` looks at an object's first bytes. If a leading line parses as a JSON object the object
is JSON Lines, and the first such line says the format (`classify`); otherwise, if it opens with
`[` or `{`, it is one JSON document (an array of records, an object holding a list of them, an
OTLP/JSON export, a trace), loaded whole and classified the same way. `ingest.format` names the
reader instead of `classify`; the container (lines or one document) is always read from the
content. An object nothing recognises raises `UnrecognisedFormat` naming the object and what it
holds: the stage fails rather than skip input it did not understand.

Formats (one module each): `tracetune` (our layout, with `ingest.mapping`), `openai_chat`,
`otel_genai`, `mlflow_traces`. When auto-detection sees records of no known format but the user
has written an `ingest.mapping`, the mapping describes their layout: `tracetune` reads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson

from tracetune.config import FieldMapping, IngestParams
from tracetune.trajectories.mapping import is_identity
from tracetune.trajectories.readers.base import Reader, ReadError, describe, held_list
from tracetune.trajectories.readers.mlflow_traces import MlflowTracesReader
from tracetune.trajectories.readers.openai_chat import OpenAIChatReader
from tracetune.trajectories.readers.otel_genai import OtelGenAIReader
from tracetune.trajectories.readers.tracetune import TracetuneReader
from tracetune.trajectories.sources import LogSource, SourceObject, open_source

# Most specific first: our layout also has `messages`, an OpenAI chat record has only those.
READERS: dict[str, Reader] = {
    r.name: r
    for r in (OtelGenAIReader(), MlflowTracesReader(), TracetuneReader(), OpenAIChatReader())
}
SNIFF_LINES = 20
IDENTITY = FieldMapping()  # classify by the formats alone, before a mapping claims a record
DOCUMENT_OPENINGS = (b"[", b"{", b"[{")  # how a pretty-printed document's first line looks
UNRECOGNISED = "unrecognised_format"

__all__ = [
    "READERS",
    "Detected",
    "ReadError",
    "Reader",
    "UnrecognisedFormat",
    "detect",
    "document_items",
    "open_log_source",
]


class UnrecognisedFormat(ValueError):
    """A log object no reader understands: the batch stops, naming the object and why."""

    def __init__(self, uri: str, why: str) -> None:
        self.uri = uri
        super().__init__(
            f"{uri}: {why}. Readable: JSON Lines or one JSON document of {', '.join(READERS)} "
            f"records (docs/data.md); set ingest.format, or ingest.mapping for another layout"
        )


@dataclass
class Detected:
    reader: Reader
    document: bool  # True: the object is one JSON document (or lines that only make sense whole)
    data: bytes | None = None  # the whole object, when detection had to read it


def classify(value: Any, mapping: FieldMapping) -> Reader | None:
    """The reader that recognises one record (or a whole document)."""
    for reader in READERS.values():
        if reader.recognises(value):
            return reader
    if isinstance(value, dict) and not is_identity(mapping):
        return READERS["tracetune"]
    return None


def classify_document(document: Any, mapping: FieldMapping) -> Reader | None:
    """The reader for a whole document: itself, its first element, or the list it holds."""
    found = classify(document, mapping) if isinstance(document, dict) else None
    if found is not None and found.name != "tracetune":
        return found
    if isinstance(document, list):
        return classify(document[0], mapping) if document else READERS["tracetune"]
    if isinstance(document, dict):
        for reader in READERS.values():
            if held_list(document, reader.recognises) is not None:  # raises when several
                return reader
    return found


def detect(
    source: LogSource, obj: SourceObject, fmt: str, mapping: FieldMapping
) -> Detected | None:
    """Which reader reads `obj`, and whether as lines or as one document (None: it is empty).

    Raises `UnrecognisedFormat` when the content is neither (or no reader knows its records).
    JSON Lines are recognised from their first lines; only a document is read whole.
    """
    chosen = READERS.get(fmt)
    with source.open(obj, 0) as stream:
        first = next((raw for raw in stream if raw.strip()), None)
        if first is None:
            return None  # an empty object (a log just rotated in) holds nothing to misread
        sample = _loads(first)
        if isinstance(sample, dict):
            return _lines(obj, chosen, sample, mapping)
        head = [first]
        if first.strip() not in DOCUMENT_OPENINGS:
            # A damaged first line, or a bare list of messages per line: if a line after it
            # parses, these are JSON Lines, and nothing needs to be read whole.
            for raw in stream:
                head.append(raw)
                value = _loads(raw)
                if isinstance(value, dict | list):
                    return _lines(obj, chosen, value, mapping)
                if len(head) >= SNIFF_LINES:
                    break
        data = b"".join(head) + stream.read()
    document = _loads(data)
    if document is not _BAD:
        reader = chosen or _classify_document(obj, document, mapping)
        if reader is None:
            raise UnrecognisedFormat(obj.uri, f"one JSON document, {describe(document)}")
        return Detected(reader, True, data)
    if isinstance(sample, list):
        return _lines(obj, chosen, sample, mapping)
    start = first[:80].decode("utf-8", "backslashreplace").strip()
    raise UnrecognisedFormat(
        obj.uri, f"neither JSON Lines nor a JSON document (it starts: {start!r})"
    )


def _lines(
    obj: SourceObject, chosen: Reader | None, sample: Any, mapping: FieldMapping
) -> Detected:
    reader = chosen or classify(sample, IDENTITY)
    if reader is not None:
        return Detected(reader, reader.whole_object)
    reader = _classify_document(obj, sample, IDENTITY)  # a document written on one line
    if reader is not None:
        return Detected(reader, True)
    reader = classify(sample, mapping)  # records in the layout the user's mapping describes
    if reader is None:
        raise UnrecognisedFormat(obj.uri, f"JSON Lines of {describe(sample)}")
    return Detected(reader, reader.whole_object)


def _classify_document(obj: SourceObject, document: Any, mapping: FieldMapping) -> Reader | None:
    try:
        return classify_document(document, mapping)
    except ReadError as exc:
        raise UnrecognisedFormat(obj.uri, str(exc)) from None


class _Bad:
    """Marks bytes that are not JSON (`None` is valid JSON)."""


_BAD: Any = _Bad()


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _BAD


def document_items(
    obj: SourceObject, detected: Detected, stream: IO[bytes] | None
) -> Iterator[tuple[int, bytes | None, str | None]]:
    """(item number, item JSON, parse error) for an object read whole.

    A JSON document gives its items; lines that only make sense together (OTLP spans of one trace
    over several lines) are parsed first, and a line that is not JSON is reported at its number.
    Raises `UnrecognisedFormat` when the reader finds no items of its format in the document.
    """
    reader = detected.reader
    data = detected.data if detected.data is not None else (stream.read() if stream else b"")
    document = _loads(data)
    errors: list[tuple[int, bytes | None, str | None]] = []
    if document is _BAD:  # JSON Lines read whole
        document = []
        for number, raw in enumerate(data.splitlines(), 1):
            if raw.strip():
                value = _loads(raw)
                if value is _BAD:
                    errors.append((number, raw, None))
                else:
                    document.append(value)
    try:
        items = list(reader.items(document))
    except ReadError as exc:
        raise UnrecognisedFormat(obj.uri, str(exc)) from None
    for number, item in enumerate(items, 1):
        yield number, orjson.dumps(item), None
    yield from errors


def open_log_source(params: IngestParams, tracking_uri: str | None = None) -> LogSource:
    """`ingest.source` (a local path or `s3://bucket/prefix`), plus the traces of
    `ingest.mlflow_experiment` in the tracking store at `tracking_uri` when one is set.

    The experiment is a parameter of its own, not a `mlflow://` source: DVC tracks
    `ingest.source` as the stage's dependency and knows no such scheme.
    """
    from tracetune.trajectories.readers.mlflow_traces import MlflowTraceSource, WithTraces

    files = open_source(params.source, params.s3_endpoint_url, params.s3_retry)
    if params.mlflow_experiment is None:
        return files
    return WithTraces(files, MlflowTraceSource(params.mlflow_experiment, tracking_uri))
