"""Ingest: production log lines -> validated, PII-scrubbed `Trajectory` batches + quarantine.

Incremental by a watermark. For every log object the index remembers a fingerprint and how far
it was read; a re-run reads new objects whole, only the new tail of a local file that grew, and
nothing of what it has seen. Every accepted trajectory id is remembered too, so a re-delivered or
rewritten file never duplicates a trajectory (the copy is quarantined as
`duplicate_trajectory_id`). The index is one SQLite file: ids, file marks and the batch log
change in one transaction, so a crash or a failed batch leaves the watermark where it was.
`paths.ingest_state` is a readable JSON export of it.

Formats are the readers' business (`tracetune.trajectories.readers`): each object is recognised
by its content (or `ingest.format`) and read as JSON Lines or as one document; ingest only moves
the items through mapping, PII scrub and validation, and keeps the marks.

Each batch is written as `batch-NNNNNN.jsonl` beside its `quarantine/batch-NNNNNN.jsonl`, under
temporary names that become final only when the batch passes the quarantine-rate check. Memory
stays bounded: lines stream through, the id set is on disk, workers see a bounded window.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sqlite3
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from pydantic import ValidationError

from tracetune.config import FieldMapping, IngestParams, PiiParams
from tracetune.environments.bounds import calls_problem
from tracetune.trajectories import quarantine as q
from tracetune.trajectories.io import chunked, ordered_map
from tracetune.trajectories.mapping import MappingError
from tracetune.trajectories.pii import PiiKey, Scrubber, resolve_key
from tracetune.trajectories.readers import (
    READERS,
    Detected,
    ReadError,
    detect,
    document_items,
    open_log_source,
)
from tracetune.trajectories.schema import Trajectory
from tracetune.trajectories.sources import (
    LogSource,
    SourceObject,
    SourceUnavailable,
    is_stat_fingerprint,
)
from tracetune.trajectories.usage import UsageEstimator, estimator_from_params

CHUNK_LINES = 500


class QuarantineRateExceeded(RuntimeError):
    """The batch quarantined more than `ingest.max_quarantine_rate`; nothing was committed."""

    def __init__(self, report: IngestReport, limit: float, rejected: Path) -> None:
        self.report = report
        super().__init__(
            f"batch quarantine rate {report.invalid_rate:.2%} exceeds ingest.max_quarantine_rate "
            f"{limit:.2%} ({report.invalid} of {report.read} lines); nothing was committed, the "
            f"watermark did not move; quarantined lines: {rejected}"
        )


@dataclass
class IngestReport:
    source: str
    batch: int | None = None
    read: int = 0
    accepted: int = 0
    quarantined: int = 0
    duplicates: int = 0
    held_back: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    families: Counter[str] = field(default_factory=Counter)
    files: Counter[str] = field(default_factory=Counter)  # new / appended / rewritten / unchanged
    pii: Counter[str] = field(default_factory=Counter)
    pii_key: str = ""  # where the pseudonym key came from (never the key)
    usage_estimated: int = 0  # accepted trajectories whose usage/cost ingest estimated
    usage_counted_with: str = ""
    seconds: float = 0.0

    @property
    def invalid(self) -> int:
        """Quarantined for being unreadable or off-schema (duplicates are not a data fault)."""
        return self.quarantined - self.duplicates

    @property
    def invalid_rate(self) -> float:
        return self.invalid / self.read if self.read else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "batch": self.batch,
            "read": self.read,
            "accepted": self.accepted,
            "quarantined": self.quarantined,
            "duplicates": self.duplicates,
            "held_back_partial_lines": self.held_back,
            "quarantine_rate": round(self.invalid_rate, 5),
            "quarantine_reasons": dict(sorted(self.reasons.items())),
            "families": dict(sorted(self.families.items())),
            "files": dict(sorted(self.files.items())),
            "pii_replacements": dict(sorted(self.pii.items())),
            "pii_key": self.pii_key,
            "usage_estimated": self.usage_estimated,
            "usage_counted_with": self.usage_counted_with,
            "seconds": round(self.seconds, 2),
            "trajectories_per_s": round(self.read / self.seconds, 1) if self.seconds else None,
        }


# ---------------------------------------------------------------------------------------------
# Parsing one line (runs in worker processes).
# ---------------------------------------------------------------------------------------------
class Parsed(NamedTuple):
    uri: str
    line: int
    trajectory_id: str | None
    json: str | None  # the normalised trajectory, or None when quarantined
    family: str | None
    quarantine: q.QuarantineRecord | None
    pii: dict[str, int] | None
    estimated: bool = False  # usage or cost estimated (tracetune.trajectories.usage)


_WORKER: dict[str, Any] = {}


def init_worker(
    mapping: FieldMapping, pii: PiiParams, key: bytes, usage: UsageEstimator | None = None
) -> None:
    _WORKER["mapping"] = mapping
    _WORKER["scrubber"] = Scrubber(pii, key)
    _WORKER["usage"] = usage


# (uri, line or item number, raw bytes or None, read error, reader name)
Unit = tuple[str, int, bytes | None, str | None, str]


def parse_chunk(chunk: list[Unit]) -> list[Parsed]:
    mapping, scrubber, usage = _WORKER["mapping"], _WORKER["scrubber"], _WORKER.get("usage")
    return [
        parse_line(uri, n, raw, err, mapping, scrubber, usage=usage, fmt=fmt)
        for uri, n, raw, err, fmt in chunk
    ]


def parse_line(
    uri: str,
    number: int,
    raw: bytes | None,
    error: str | None,
    mapping: FieldMapping,
    scrubber: Scrubber,
    usage: UsageEstimator | None = None,
    fmt: str = "tracetune",
) -> Parsed:
    """One log line (or document item) -> an accepted trajectory or a quarantine record.

    Everything a quarantine record keeps (source name, id, detail, raw text) is scrubbed too.
    """
    uri = scrubber.scrub_text(uri)  # a file name may hold an email

    def reject(reason: str, detail: str, text: str = "", tid: str | None = None) -> Parsed:
        tid = scrubber.scrub_text(tid) if tid else tid
        record = q.QuarantineRecord(
            uri, number, reason, scrubber.scrub_text(detail), scrubber.scrub_raw(text), tid
        )
        return Parsed(uri, number, tid, None, None, record, None)

    if raw is None:
        return reject(q.UNREADABLE_FILE, error or "unreadable", "")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return reject(q.INVALID_UTF8, str(exc), q.decode_raw(raw))
    text = text.rstrip("\r\n")
    if not text.strip():
        return reject(q.BLANK_LINE, "empty line")
    try:
        record = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return reject(q.INVALID_JSON, str(exc), text)
    tid = q.trajectory_id_of(record)
    try:
        record = READERS[fmt].to_record(record, mapping)
    except MappingError as exc:
        return reject(q.MAPPING, str(exc), text, tid)
    except ReadError as exc:
        return reject(exc.reason, str(exc), text, tid)
    scrubber.hits.clear()
    scrubber.scrub_obj(record)
    estimated = usage.complete(record) if usage is not None else False
    try:
        trajectory = Trajectory.model_validate(record)
    except ValidationError as exc:
        reason, detail = q.schema_reason(exc)
        return reject(reason, detail, text, q.trajectory_id_of(record))
    problem = calls_problem(
        (call.function.name, call.function.arguments)
        for message in trajectory.messages
        for call in message.tool_calls or ()
    )
    if problem:
        return reject(q.OUT_OF_BOUNDS, problem, text, trajectory.trajectory_id)
    hits = scrubber.hits
    return Parsed(
        uri,
        number,
        trajectory.trajectory_id,
        trajectory.model_dump_json(exclude_none=True),
        trajectory.family,
        None,
        dict(hits) if hits else None,
        estimated,
    )


# ---------------------------------------------------------------------------------------------
# The watermark index.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileMark:
    fingerprint: str
    head: str
    offset: int
    lines: int


class IngestIndex:
    """Seen trajectory ids, per-object read marks and the batch log, in one SQLite file.

    Objects are keyed by `name(uri)`: ingest passes the PII scrub, so a source file named after
    a customer's email is remembered (and exported) under its pseudonym.
    """

    def __init__(self, path: Path, name: Callable[[str], str] = str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.name = name
        self.conn = sqlite3.connect(path, isolation_level="DEFERRED")
        self.conn.execute("PRAGMA cache_size=-8000")
        self.conn.executescript(
            """
            CREATE TABLE IF NOT EXISTS ids (id TEXT PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS files (uri TEXT PRIMARY KEY, fingerprint TEXT, head TEXT,
                                              offset INTEGER, lines INTEGER);
            CREATE TABLE IF NOT EXISTS batches (id INTEGER PRIMARY KEY, report TEXT);
            CREATE TABLE IF NOT EXISTS origins (id TEXT PRIMARY KEY, uri TEXT, line INTEGER)
                WITHOUT ROWID;
            """
        )

    def mark(self, uri: str) -> FileMark | None:
        row = self.conn.execute(
            "SELECT fingerprint, head, offset, lines FROM files WHERE uri=?", (self.name(uri),)
        ).fetchone()
        return FileMark(*row) if row else None

    def set_mark(self, uri: str, mark: FileMark) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?)",
            (self.name(uri), mark.fingerprint, mark.head, mark.offset, mark.lines),
        )

    def add_id(self, trajectory_id: str) -> bool:
        """False when the id was accepted before (in this or an earlier batch)."""
        cur = self.conn.execute("INSERT OR IGNORE INTO ids VALUES (?)", (trajectory_id,))
        return cur.rowcount == 1

    def add_ids(self, trajectory_ids: list[str]) -> list[bool]:
        """`add_id` for each of `trajectory_ids` in order (a repeat within the list is False
        after its first), in two statements instead of one per id: one index lookup of the
        ids already there, one insert of the new ones. The ingest loop's serial share per
        trajectory was mostly these statements."""
        seen = set(self.known_ids(trajectory_ids))
        fresh = []
        for tid in trajectory_ids:
            fresh.append(tid not in seen)
            seen.add(tid)
        new = [(tid,) for tid, ok in zip(trajectory_ids, fresh, strict=True) if ok]
        self.conn.executemany("INSERT INTO ids VALUES (?)", new)
        return fresh

    def known_ids(self, trajectory_ids: list[str]) -> list[str]:
        """The ids among `trajectory_ids` accepted before (looked up 500 at a time)."""
        found: list[str] = []
        for start in range(0, len(trajectory_ids), 500):
            part = trajectory_ids[start : start + 500]
            marks = ",".join("?" * len(part))
            query = f"SELECT id FROM ids WHERE id IN ({marks})"
            found += [row[0] for row in self.conn.execute(query, part)]
        return found

    def add_origins(self, origins: list[tuple[str, str, int]]) -> None:
        """`add_origin` for many (trajectory id, uri, line), in one statement."""
        self.conn.executemany("INSERT OR REPLACE INTO origins VALUES (?,?,?)", origins)

    def add_origin(self, trajectory_id: str, uri: str, line: int) -> None:
        """Where an accepted trajectory was read: a gate names the log line, not the batch's."""
        self.conn.execute(
            "INSERT OR REPLACE INTO origins VALUES (?,?,?)", (trajectory_id, uri, line)
        )

    def next_batch(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM batches").fetchone()[0])

    def record_batch(self, batch: int, report: dict[str, Any]) -> None:
        self.conn.execute("INSERT INTO batches VALUES (?, ?)", (batch, json.dumps(report)))

    def export(self) -> dict[str, Any]:
        """The watermark as JSON: what was read of each object, and every batch's counts.

        Only what depends on the logs' content goes in: the stages after ingest depend on this
        file (dvc.yaml), so a run that read nothing new must leave it byte for byte as it was. A
        local file's stat signature (renewed when the file is only touched, different on every
        run while the file is racily clean) therefore stays in the index alone.
        """
        batches = [
            json.loads(r[0]) for r in self.conn.execute("SELECT report FROM batches ORDER BY id")
        ]
        files = {
            uri: {"offset": off, "lines": n}
            | ({} if is_stat_fingerprint(fp) else {"fingerprint": fp})
            for uri, fp, _head, off, n in self.conn.execute("SELECT * FROM files ORDER BY uri")
        }
        totals: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for b in batches:
            totals.update({k: b[k] for k in ("read", "accepted", "quarantined", "duplicates")})
            reasons.update(b["quarantine_reasons"])
        return {
            "last_batch": batches[-1] if batches else None,
            "batches": len(batches),
            "totals": dict(totals) | {"quarantine_reasons": dict(sorted(reasons.items()))},
            "files": files,
        }

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


# ---------------------------------------------------------------------------------------------
# Planning what to read, and reading it.
# ---------------------------------------------------------------------------------------------
@dataclass
class ReadPlan:
    obj: SourceObject
    offset: int
    first_line: int  # line number of the first line read (1-based)
    kind: str  # new / appended / rewritten / unchanged (touched: only the mark is renewed)
    hasher: Any = None  # appended: the hash of the bytes before `offset`, fed on while reading
    head: str = ""  # not appendable: `LogSource.content_hash`, taken before reading


def plan_reads(source: LogSource, index: IngestIndex, report: IngestReport) -> list[ReadPlan]:
    """Which objects to read and from where, given the watermark."""
    plans = []
    for obj in source.objects():
        mark = index.mark(obj.uri)
        if mark is None:
            plans.append(ReadPlan(obj, 0, 1, "new", head=_content_hash(source, obj)))
        elif mark.fingerprint == obj.fingerprint:
            report.files["unchanged"] += 1
            if obj.appendable and obj.size > mark.offset:
                report.held_back += 1  # its last line still waits for its newline
        elif obj.appendable and obj.size >= mark.offset:
            try:
                hasher = source.prefix_hasher(obj, mark.offset)  # same bytes up to the mark?
            except OSError as exc:
                raise SourceUnavailable(f"reading {obj.uri}: {type(exc).__name__}: {exc}") from exc
            if hasher.hexdigest() == mark.head:  # grew, or only touched: read on from the mark
                kind = "appended" if obj.size > mark.offset else "unchanged"
                plans.append(ReadPlan(obj, mark.offset, mark.lines + 1, kind, hasher))
            else:
                plans.append(ReadPlan(obj, 0, 1, "rewritten"))
        elif obj.appendable:  # shrank: rewritten
            plans.append(ReadPlan(obj, 0, 1, "rewritten"))
        elif (head := _content_hash(source, obj)) and head == mark.head:
            # A local .gz only touched, or listed racily clean last time: same bytes, not read.
            plans.append(ReadPlan(obj, mark.offset, mark.lines + 1, "unchanged", head=head))
        else:
            plans.append(ReadPlan(obj, 0, 1, "rewritten", head=head))
    return plans


def _content_hash(source: LogSource, obj: SourceObject) -> str:
    """The whole-object hash of an object that is read whole ("" where its fingerprint is one).

    Taken before the object is read: should it change in between, the mark holds the old hash,
    which no longer matches, and the next run reads it again (duplicates, never a loss).
    """
    if obj.appendable:
        return ""  # its mark is the hash of exactly the bytes read, fed while reading
    try:
        return source.content_hash(obj)
    except OSError as exc:  # the disk or mount failed: fail, commit nothing
        raise SourceUnavailable(f"reading {obj.uri}: {type(exc).__name__}: {exc}") from exc


def iter_planned_lines(
    source: LogSource,
    plans: list[ReadPlan],
    marks: dict[str, FileMark],
    report: IngestReport,
    fmt: str = "auto",
    mapping: FieldMapping | None = None,
) -> Iterator[Unit]:
    """(uri, line number, raw bytes, read error, reader) for every planned line; fills `marks`.

    The reader of each object comes from its content (`readers.detect`) or `ingest.format`.
    A local file's last line without a newline may still be being written, even when it
    already parses as JSON: it stays pending (the mark stays before it) until its newline
    arrives. An object read as one document (a JSON array, an OTLP export) is read whole, its
    items numbered from 1; a later change re-reads it whole (ids already accepted come back as
    duplicates). Only corrupt content becomes a quarantined line; a read that fails for any
    other reason (a stalled store, a failing disk) raises `SourceUnavailable`: the batch fails.
    An object no reader understands raises `readers.UnrecognisedFormat`.
    """
    for plan in plans:
        obj = plan.obj
        report.files[plan.kind] += 1
        if plan.kind == "unchanged" and not obj.appendable:  # the same bytes: renew the mark
            marks[obj.uri] = FileMark(obj.fingerprint, plan.head, plan.offset, plan.first_line - 1)
            continue
        position = [plan.offset, plan.first_line - 1]  # byte offset, lines (items) read
        hasher = source.prefix_hasher(obj, 0) if plan.hasher is None else plan.hasher
        detected: Detected | None = None
        try:
            if plan.kind != "unchanged":  # a touched file with the same bytes: nothing to read
                detected = detect(source, obj, fmt, mapping or FieldMapping())
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # a corrupt gzip
            position[1] += 1
            yield obj.uri, position[1], None, f"{type(exc).__name__}: {exc}", "tracetune"
        except OSError as exc:  # the disk or mount failed, not the content: fail, commit nothing
            raise SourceUnavailable(f"reading {obj.uri}: {type(exc).__name__}: {exc}") from exc
        else:
            if detected is not None and detected.document:
                yield from _document_units(source, obj, detected, position)
                if obj.appendable:  # the mark of a document: the hash of all of it
                    hasher = source.prefix_hasher(obj, position[0])
            else:
                name = detected.reader.name if detected is not None else "tracetune"
                yield from _line_units(source, plan, name, position, hasher, report)
        offset, number = position
        head = hasher.hexdigest() if obj.appendable else plan.head
        marks[obj.uri] = FileMark(obj.fingerprint, head, offset, number)


def _line_units(
    source: LogSource,
    plan: ReadPlan,
    reader: str,
    position: list[int],
    hasher: Any,
    report: IngestReport,
) -> Iterator[Unit]:
    obj = plan.obj
    try:
        with source.open(obj, plan.offset) as stream:
            for raw in stream:
                if obj.appendable and not raw.endswith(b"\n"):
                    report.held_back += 1
                    break
                position[0] += len(raw)
                position[1] += 1
                if obj.appendable:
                    hasher.update(raw)
                yield obj.uri, position[1], raw, None, reader
    except (EOFError, gzip.BadGzipFile, ValueError, zlib.error) as exc:  # corrupt gzip
        position[1] += 1
        yield obj.uri, position[1], None, f"{type(exc).__name__}: {exc}", reader
    except OSError as exc:  # the disk or mount failed, not the content: fail, commit nothing
        raise SourceUnavailable(f"reading {obj.uri}: {type(exc).__name__}: {exc}") from exc


def _document_units(
    source: LogSource, obj: SourceObject, detected: Detected, position: list[int]
) -> Iterator[Unit]:
    """Items of an object read whole; it is read again whole when it changes."""
    position[:] = [obj.size, 0]
    stream = source.open(obj, 0) if detected.data is None else None
    try:
        for number, raw, _ in document_items(obj, detected, stream):
            position[1] = max(position[1], number)
            yield obj.uri, number, raw, None, detected.reader.name
    finally:
        if stream is not None:
            stream.close()


# ---------------------------------------------------------------------------------------------
# The batch.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IngestPaths:
    batches: Path
    quarantine: Path
    index: Path
    state: Path
    rejected: Path  # where a rejected batch's quarantine goes for inspection


def reset(paths: IngestPaths) -> None:
    """Forget everything ingested (`ingest.full_refresh`)."""
    for folder in (paths.batches, paths.quarantine):
        shutil.rmtree(folder, ignore_errors=True)
    for file in (paths.index, paths.state):
        file.unlink(missing_ok=True)


def ingest(
    params: IngestParams,
    paths: IngestPaths,
    source: LogSource | None = None,
    usage: UsageEstimator | None = None,
    key: PiiKey | None = None,
) -> IngestReport:
    """Read what arrived since the last batch; commit it as one batch or raise, leaving no trace.

    `usage` fills in missing token usage and cost (default: `params.usage` with its fallback
    count). Raises `QuarantineRateExceeded` when the batch quarantines too much,
    `SourceUnavailable` when the store fails to deliver an object even after retries, and
    `PiiKeyMissing` before reading anything when no `key` is given and no secret is configured
    (the stage passes `pii.key_for(params)`, which knows the embedded demo).
    """
    usage = usage or estimator_from_params(params.usage, None)
    started = time.perf_counter()
    key = key or resolve_key(params.pii, demo=False)  # before anything is read or reset
    if params.full_refresh:
        reset(paths)
    source = source or open_log_source(params)
    names = Scrubber(params.pii, key.value)
    report = IngestReport(source=names.scrub_text(source.uri), pii_key=key.origin)
    report.usage_counted_with = usage.source if usage.enabled else "off"
    index = IngestIndex(paths.index, names.scrub_text)
    name = ""
    try:
        batch = index.next_batch()
        name = f"batch-{batch:06d}.jsonl"
        paths.batches.mkdir(parents=True, exist_ok=True)
        paths.quarantine.mkdir(parents=True, exist_ok=True)
        out_tmp = paths.batches / (name + ".tmp")
        q_tmp = paths.quarantine / (name + ".tmp")
        marks: dict[str, FileMark] = {}
        plans = plan_reads(source, index, report)
        lines = iter_planned_lines(source, plans, marks, report, params.format, params.mapping)
        with out_tmp.open("w", encoding="utf-8") as out, q_tmp.open("w", encoding="utf-8") as qout:
            results = ordered_map(
                parse_chunk,
                chunked(lines, CHUNK_LINES),
                params.workers,
                init_worker,
                (params.mapping, params.pii, key.value, usage),
            )
            for chunk in results:
                _take_chunk(chunk, index, out, qout, report)
        for uri, mark in marks.items():
            index.set_mark(uri, mark)
        report.seconds = time.perf_counter() - started
        if report.invalid_rate > params.max_quarantine_rate:
            index.rollback()
            paths.rejected.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(q_tmp, paths.rejected)
            raise QuarantineRateExceeded(report, params.max_quarantine_rate, paths.rejected)
        if report.read:
            report.batch = batch
            out_tmp.replace(paths.batches / name)
            q_tmp.replace(paths.quarantine / name)
            summary = report.as_dict() | {
                "file": name,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            index.record_batch(batch, summary)
        index.commit()
        _write_state(paths.state, index.export())
    finally:
        index.close()
        if name:
            for tmp in (paths.batches / (name + ".tmp"), paths.quarantine / (name + ".tmp")):
                tmp.unlink(missing_ok=True)
    return report


def _take_chunk(
    chunk: list[Parsed], index: IngestIndex, out: Any, qout: Any, report: IngestReport
) -> None:
    """Count, index and write a chunk of parsed lines, in order. The index is asked and written
    once per chunk (`IngestIndex.add_ids`, `add_origins`) and the accepted lines written in one
    call: per trajectory, these statements were most of the main process's share of ingest."""
    ids = [p.trajectory_id for p in chunk if p.json is not None and p.trajectory_id is not None]
    fresh = iter(index.add_ids(ids))
    origins: list[tuple[str, str, int]] = []
    accepted: list[str] = []
    for parsed in chunk:
        report.read += 1
        record = parsed.quarantine
        if parsed.json is not None:
            assert parsed.trajectory_id is not None
            if next(fresh):
                origins.append((parsed.trajectory_id, parsed.uri, parsed.line))
                accepted.append(parsed.json)
                report.accepted += 1
                report.families[parsed.family or ""] += 1
                if parsed.pii:
                    report.pii.update(parsed.pii)
                report.usage_estimated += parsed.estimated
                continue
            report.duplicates += 1
            record = q.QuarantineRecord(
                parsed.uri,
                parsed.line,
                q.DUPLICATE_ID,
                "trajectory id already ingested (this or an earlier batch)",
                parsed.json,
                parsed.trajectory_id,
            )
        assert record is not None
        report.quarantined += 1
        report.reasons[record.reason] += 1
        qout.write(record.to_json() + "\n")
    if accepted:
        out.write("\n".join(accepted) + "\n")
    index.add_origins(origins)


def _write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the export atomically, and not at all when its text is the same (times too)."""
    text = json.dumps(state, indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_state(path: Path) -> dict[str, Any]:
    """The exported watermark (`{}` before the first batch)."""
    return json.loads(path.read_text()) if path.exists() else {}


def read_origins(index_path: Path, trajectory_ids: list[str]) -> dict[str, tuple[str, int]]:
    """(source object, line) where ingest read each of `trajectory_ids`, from the index.

    Read-only; ids ingested before the index kept origins (or with no index at all) are absent:
    the caller says where else the row lies.
    """
    if not trajectory_ids or not index_path.exists():
        return {}
    conn = sqlite3.connect(index_path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(trajectory_ids))
        rows = conn.execute(
            f"SELECT id, uri, line FROM origins WHERE id IN ({marks})", trajectory_ids
        ).fetchall()
    except sqlite3.OperationalError:  # an index from before origins were kept
        return {}
    finally:
        conn.close()
    return {tid: (uri, int(line)) for tid, uri, line in rows}


def last_batch_file(state_path: Path, batches_dir: Path) -> Path | None:
    """The newest batch file: what the raw-batch gate validates."""
    last = read_state(state_path).get("last_batch")
    return batches_dir / last["file"] if last else None
