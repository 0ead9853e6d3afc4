"""Ingest: quarantine with reasons, read = accepted + quarantined, incremental watermark."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from tracetune.config import IngestParams
from tracetune.trajectories import sources
from tracetune.trajectories.ingest import (
    IngestPaths,
    QuarantineRateExceeded,
    ingest,
    last_batch_file,
    read_origins,
    read_state,
)
from tracetune.trajectories.io import read_trajectories
from tracetune.trajectories.pii import PiiKeyMissing, find_pii, has_pseudonym
from tracetune.trajectories.sources import (
    RACY_NS,
    SourceUnavailable,
    is_stat_fingerprint,
    stat_fingerprint,
)


def good(i: int, **changes: object) -> dict:
    record = {
        "trajectory_id": f"t-{i}",
        "task_id": f"customer_tier:C-{i:04d}",
        "family": "customer_tier",
        "timestamp": "2026-11-01T00:00:00+00:00",
        "model": "m",
        "messages": [
            {"role": "user", "content": f"Which tier is C-{i:04d} in? I am ana{i}@mailbox.org"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_customer", "arguments": '{"customer_id": "C"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"tier": "gold"}'},
            {"role": "assistant", "content": "Gold."},
        ],
        "success": True,
        "steps": 2,
        "error_retries": 0,
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        "cost_usd": 0.001,
        "latency_s": 1.0,
    }
    record.update(changes)
    return record


def line(record: object) -> bytes:
    return json.dumps(record).encode() + b"\n"


@pytest.fixture
def bad_lines() -> list[tuple[bytes, str]]:
    """Every kind of bad line, with the reason it must be quarantined for."""
    tool_first = good(0)
    tool_first["messages"] = [{"role": "tool", "content": "x"}, *tool_first["messages"]]
    return [
        (b'{"trajectory_id": "t-x", "task_id": \n', "invalid_json"),
        (b"not json at all, mail bob@mailbox.org\n", "invalid_json"),
        (b"\xff\xfe garbage\n", "invalid_utf8"),
        (b"   \n", "blank_line"),
        (b"[1, 2, 3]\n", "not_an_object"),
        (line(good(101, steps="three")), "schema:steps"),
        (line({k: v for k, v in good(102).items() if k != "messages"}), "schema:messages"),
        (line(good(103, timestamp="2026-11-01T00:00:00")), "schema:timestamp"),
        (line(good(104, cost_usd=-1)), "schema:cost_usd"),
        (line(good(105, surprise=1)), "schema:surprise"),
        (line(tool_first | {"trajectory_id": "t-106"}), "schema:messages"),
        (
            line(good(107, messages=[{"role": "robot", "content": "x"}, {"role": "user"}])),
            "schema:messages.role",
        ),
        (line(good(1)), "duplicate_trajectory_id"),
    ]


def make_paths(root: Path) -> IngestPaths:
    return IngestPaths(
        root / "ingested",
        root / "quarantine",
        root / "state/index.sqlite",
        root / "state/watermark.json",
        root / "reports/rejected.jsonl",
    )


def params(source: Path | str, **kw: object) -> IngestParams:
    return IngestParams(source=str(source), **kw)


def quarantine_records(paths: IngestPaths) -> list[dict]:
    return [json.loads(x) for f in sorted(paths.quarantine.glob("*.jsonl")) for x in f.open()]


def test_every_bad_line_is_quarantined_with_its_reason(tmp_path: Path, bad_lines) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "logs"
    src.mkdir()
    goods = [line(good(i)) for i in range(1, 40)]
    (src / "a.jsonl").write_bytes(b"".join(goods[:20]) + b"".join(raw for raw, _ in bad_lines))
    (src / "b.jsonl").write_bytes(b"".join(goods[20:]))
    paths = make_paths(tmp_path)
    report = ingest(params(src, max_quarantine_rate=0.5), paths)

    assert report.read == report.accepted + report.quarantined == 39 + len(bad_lines)
    assert report.accepted == 39 and report.duplicates == 1
    records = quarantine_records(paths)
    assert [r["reason"] for r in records] == [reason for _, reason in bad_lines]
    assert all(r["source"].endswith("a.jsonl") for r in records)
    assert [r["line"] for r in records] == list(range(21, 21 + len(bad_lines)))
    assert all(r["detail"] for r in records)
    assert not any(find_pii(r["raw"]) for r in records), "quarantine must be scrubbed too"
    accepted = list(read_trajectories(paths.batches))
    assert len(accepted) == 39 and len({t.trajectory_id for t in accepted}) == 39
    assert not any(find_pii(t.to_json()) for t in accepted)
    assert report.pii["email"] == 39


def test_rerun_ingests_nothing_new_then_only_the_new(tmp_path: Path) -> None:
    src = tmp_path / "logs"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"".join(line(good(i)) for i in range(10)))
    paths = make_paths(tmp_path)
    first = ingest(params(src), paths)
    assert (first.batch, first.accepted) == (1, 10)

    again = ingest(params(src), paths)
    assert again.batch is None and again.read == 0 and again.files["unchanged"] == 1

    with (src / "a.jsonl").open("ab") as handle:  # appended lines: only the tail is read
        handle.write(b"".join(line(good(i)) for i in range(10, 13)))
    with gzip.open(src / "b.jsonl.gz", "wb") as handle:  # a new compressed file
        handle.write(b"".join(line(good(i)) for i in range(13, 15)))
    third = ingest(params(src), paths)
    assert (third.batch, third.read, third.accepted) == (2, 5, 5)
    assert third.files == {"appended": 1, "new": 1}
    assert last_batch_file(paths.state, paths.batches) == paths.batches / "batch-000002.jsonl"
    ids = [t.trajectory_id for t in read_trajectories(paths.batches)]
    assert sorted(ids) == sorted(f"t-{i}" for i in range(15))
    state = read_state(paths.state)
    assert state["batches"] == 2 and state["totals"]["accepted"] == 15
    assert state["files"][str(src / "a.jsonl")]["lines"] == 13


def test_each_trajectory_remembers_its_log_line(tmp_path: Path) -> None:
    """Issue 22 item 6: the raw gate named a failing row by its line in the batch file, which
    nobody can find in the production logs. The index keeps each accepted trajectory's log
    object and line (an appended file's lines counted on from its mark), committed with the
    batch or not at all."""
    src = tmp_path / "logs"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"broken\n" + b"".join(line(good(i)) for i in range(3)))
    paths = make_paths(tmp_path)
    ingest(params(src, max_quarantine_rate=0.5), paths)
    with (src / "a.jsonl").open("ab") as handle:
        handle.write(line(good(0)) + line(good(3)))  # a duplicate, then a new one
    ingest(params(src, max_quarantine_rate=0.5), paths)
    a = str(src / "a.jsonl")
    assert read_origins(paths.index, ["t-0", "t-2", "t-3", "t-9"]) == {
        "t-0": (a, 2),
        "t-2": (a, 4),
        "t-3": (a, 6),
    }
    (src / "b.jsonl").write_bytes(line(good(7)) + b"broken\n" * 3)
    with pytest.raises(QuarantineRateExceeded):
        ingest(params(src, max_quarantine_rate=0.1), paths)
    assert read_origins(paths.index, ["t-7"]) == {}  # the rejected batch left no trace


def test_rewritten_file_never_duplicates_a_trajectory(tmp_path: Path) -> None:
    src = tmp_path / "logs"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"".join(line(good(i)) for i in range(5)))
    paths = make_paths(tmp_path)
    ingest(params(src), paths)
    (src / "a.jsonl").write_bytes(b"".join(line(good(i)) for i in range(3, 8)))  # replaced
    report = ingest(params(src), paths)
    assert report.files["rewritten"] == 1
    assert (report.accepted, report.duplicates) == (3, 2)
    assert len(list(read_trajectories(paths.batches))) == 8


def test_partial_last_line_waits_for_the_writer(tmp_path: Path) -> None:
    src = tmp_path / "logs"
    src.mkdir()
    full = line(good(1))
    (src / "a.jsonl").write_bytes(line(good(0)) + full[:40])
    paths = make_paths(tmp_path)
    first = ingest(params(src), paths)
    assert (first.accepted, first.quarantined, first.held_back) == (1, 0, 1)
    (src / "a.jsonl").write_bytes(line(good(0)) + full)
    second = ingest(params(src), paths)
    assert (second.accepted, second.quarantined) == (1, 0)


def test_a_record_waits_for_its_newline(tmp_path: Path) -> None:
    """A writer that writes a record, then its newline: the record is read once, when complete."""
    src = tmp_path / "logs"
    src.mkdir()
    paths = make_paths(tmp_path)
    with (src / "a.jsonl").open("ab", buffering=0) as writer:
        writer.write(line(good(0)))
        writer.write(line(good(1)).rstrip(b"\n"))  # complete JSON, no newline yet
        first = ingest(params(src), paths)
        assert (first.read, first.accepted, first.held_back) == (1, 1, 1)
        assert read_state(paths.state)["files"][str(src / "a.jsonl")]["lines"] == 1
        again = ingest(params(src), paths)
        assert (again.read, again.held_back, again.batch) == (0, 1, None)
        writer.write(b"\n")
        second = ingest(params(src), paths)
    assert (second.read, second.accepted, second.quarantined, second.held_back) == (1, 1, 0, 0)
    assert [t.trajectory_id for t in read_trajectories(paths.batches)] == ["t-0", "t-1"]
    assert ingest(params(src), paths).files == {"unchanged": 1}


def test_a_pending_line_is_reported_on_every_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "RACY_NS", 0)  # trust file times at once: the `unchanged` path
    src = tmp_path / "logs"
    src.mkdir()
    (src / "a.jsonl").write_bytes(line(good(0)) + line(good(1)).rstrip(b"\n"))
    paths = make_paths(tmp_path)
    assert ingest(params(src), paths).held_back == 1
    again = ingest(params(src), paths)
    assert (again.files, again.read, again.held_back) == ({"unchanged": 1}, 0, 1)


def test_a_same_size_rewrite_is_read(tmp_path: Path) -> None:
    """Same size, same first 4 KiB, even the old mtime restored: still a rewrite."""
    src, paths = tmp_path / "logs", make_paths(tmp_path)
    src.mkdir()
    log = src / "a.jsonl"
    log.write_bytes(b"".join(line(good(i)) for i in range(1000, 1024)))
    assert ingest(params(src), paths).accepted == 24
    before = log.stat()
    old = log.read_bytes()
    new = b"".join(line(good(i)) for i in [*range(1000, 1008), *range(2000, 2016)])
    assert len(new) == len(old) and new[:4096] == old[:4096] and new != old
    log.write_bytes(new)
    os.utime(log, ns=(before.st_atime_ns, before.st_mtime_ns))

    report = ingest(params(src), paths)
    assert report.files == {"rewritten": 1}
    assert (report.accepted, report.duplicates, report.invalid) == (16, 8, 0)
    ids = {t.trajectory_id for t in read_trajectories(paths.batches)}
    assert {f"t-{i}" for i in range(2000, 2016)} <= ids and len(ids) == 40


def test_a_touched_file_is_not_read_again(tmp_path: Path) -> None:
    """A new mtime alone costs one hash of the file, not a re-read full of duplicates."""
    src, paths = tmp_path / "logs", make_paths(tmp_path)
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"".join(line(good(i)) for i in range(5)))
    ingest(params(src), paths)
    os.utime(src / "a.jsonl", ns=(1, 2))
    touched = ingest(params(src), paths)
    assert (touched.read, touched.duplicates, touched.batch) == (0, 0, None)
    assert touched.files == {"unchanged": 1}


def test_a_just_written_file_is_checked_again() -> None:
    """File times tick coarsely: a file changed within RACY_NS may change again unseen."""
    old = SimpleNamespace(st_size=10, st_mtime_ns=1, st_ctime_ns=5, st_ino=7)
    assert stat_fingerprint(old, RACY_NS * 10) == stat_fingerprint(old, RACY_NS * 11) == "s10m1c5i7"
    fresh = SimpleNamespace(st_size=10, st_mtime_ns=1, st_ctime_ns=RACY_NS * 10, st_ino=7)
    assert stat_fingerprint(fresh, RACY_NS * 10 + 1) != stat_fingerprint(fresh, RACY_NS * 10 + 2)


def test_the_exported_watermark_stays_the_same_while_no_log_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export is a DVC dependency of validate_raw and split: logs written just before a run
    (racily clean), then settled, then touched, must not change it, or a flow that found nothing
    new reruns the data stages. The index still checks the racy file's bytes on the next run."""
    src, paths = tmp_path / "logs", make_paths(tmp_path)
    src.mkdir()
    log = src / "a.jsonl"
    log.write_bytes(b"".join(line(good(i)) for i in range(5)) + line(good(5)).rstrip(b"\n"))
    first = ingest(params(src), paths)
    assert (first.accepted, first.held_back) == (5, 1)
    exported, written = paths.state.read_bytes(), paths.state.stat().st_mtime_ns
    with sqlite3.connect(paths.index) as db:
        (racy,) = db.execute("SELECT fingerprint FROM files").fetchone()
    assert "racy" in racy  # just written: the next run must look at its bytes

    again = ingest(params(src), paths)  # still racy, with another listing time
    monkeypatch.setattr(sources, "RACY_NS", 0)
    settled = ingest(params(src), paths)  # minutes later: the plain stat signature
    os.utime(log, ns=(1, 2))
    touched = ingest(params(src), paths)
    for report in (again, settled, touched):  # each time the prefix hash was checked
        assert (report.read, report.batch, report.held_back) == (0, None, 1)
    assert paths.state.read_bytes() == exported
    assert paths.state.stat().st_mtime_ns == written  # not even rewritten with the same bytes
    with sqlite3.connect(paths.index) as db:
        (now,) = db.execute("SELECT fingerprint FROM files").fetchone()
    assert now != racy and "racy" not in now  # the index did renew its mark

    with log.open("ab") as writer:  # the pending line's newline: now the export moves
        writer.write(b"\n")
    assert ingest(params(src), paths).accepted == 1
    assert read_state(paths.state)["files"][str(log)] == {"offset": log.stat().st_size, "lines": 6}


def test_a_just_written_or_touched_gzip_is_not_read_again(tmp_path: Path) -> None:
    """A .gz is read whole on any change: racily clean after its first run, or touched, the
    hash of its stored bytes says it did not change (no batch of duplicates); new bytes of the
    same size and times are still read."""
    src, paths = tmp_path / "logs", make_paths(tmp_path)
    src.mkdir()
    log = src / "a.jsonl.gz"
    log.write_bytes(gzip.compress(b"".join(line(good(i)) for i in range(5)), 0, mtime=0))
    assert ingest(params(src), paths).accepted == 5
    exported = paths.state.read_bytes()
    again = ingest(params(src), paths)  # racy: its fingerprint cannot match
    os.utime(log, ns=(1, 2))
    touched = ingest(params(src), paths)
    before = log.stat()
    for report in (again, touched):
        assert (report.files, report.read, report.batch) == ({"unchanged": 1}, 0, None)
    assert paths.state.read_bytes() == exported

    new = gzip.compress(b"".join(line(good(i)) for i in range(3, 8)), 0, mtime=0)
    assert len(new) == before.st_size
    log.write_bytes(new)
    os.utime(log, ns=(before.st_atime_ns, before.st_mtime_ns))
    report = ingest(params(src), paths)
    assert report.files == {"rewritten": 1}
    assert (report.accepted, report.duplicates) == (3, 2)


def test_only_content_fingerprints_are_exported() -> None:
    """A stat signature (racy or not) stays in the index; an ETag or a trace's state names
    content and is exported."""
    times = SimpleNamespace(st_size=10, st_mtime_ns=1, st_ctime_ns=RACY_NS * 10, st_ino=7)
    assert is_stat_fingerprint(stat_fingerprint(times, RACY_NS * 10 + 1))
    assert is_stat_fingerprint(stat_fingerprint(times, RACY_NS * 100))
    for content in ("9b2cf535f27731c974343645a3985328", "9b2cf535f27731c9-3", "OK:2", "ERROR:0"):
        assert not is_stat_fingerprint(content)


def test_a_fingerprint_never_reads_as_a_card_number() -> None:
    """The watermark export is scanned for PII: a nanosecond file time that passes Luhn once
    stood alone between colons and read as a card (seen in CI as 1796587567428126362)."""
    times = SimpleNamespace(
        st_size=10, st_mtime_ns=1796587567428126362, st_ctime_ns=1796587567428126362, st_ino=7
    )
    assert find_pii("1796587567428126362")  # the number alone is card-shaped
    assert not find_pii(stat_fingerprint(times, 1796587567428126362 + 1))  # racy form
    assert not find_pii(stat_fingerprint(times, 1796587567428126362 * 2))


def test_too_many_bad_lines_fail_and_commit_nothing(tmp_path: Path) -> None:
    src = tmp_path / "logs"
    src.mkdir()
    (src / "a.jsonl").write_bytes(line(good(0)) + b"broken\n" * 3)
    paths = make_paths(tmp_path)
    with pytest.raises(QuarantineRateExceeded, match=r"75\.00%"):
        ingest(params(src, max_quarantine_rate=0.1), paths)
    assert not list(paths.batches.glob("*")) and not list(paths.quarantine.glob("*"))
    assert len(paths.rejected.read_text().splitlines()) == 3
    report = ingest(params(src, max_quarantine_rate=0.9), paths)  # the watermark did not move
    assert (report.batch, report.accepted, report.quarantined) == (1, 1, 3)


def test_workers_give_the_same_batch(tmp_path: Path, sim_lines: list[str]) -> None:
    src = tmp_path / "logs"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(sim_lines) + "\n")
    one, two = make_paths(tmp_path / "one"), make_paths(tmp_path / "two")
    r1 = ingest(params(src, workers=1), one)
    r2 = ingest(params(src, workers=2), two)
    assert r1.as_dict() | {"seconds": 0, "trajectories_per_s": 0} == r2.as_dict() | {
        "seconds": 0,
        "trajectories_per_s": 0,
    }
    name = "batch-000001.jsonl"
    assert (one.batches / name).read_bytes() == (two.batches / name).read_bytes()
    assert r1.read == len(sim_lines) and r1.quarantined > 0 and r1.pii


def test_truncated_gzip_keeps_what_it_could_read(tmp_path: Path) -> None:
    src = tmp_path / "logs"
    src.mkdir()
    data = gzip.compress(b"".join(line(good(i)) for i in range(200)))
    (src / "a.jsonl.gz").write_bytes(data[: len(data) // 2])
    paths = make_paths(tmp_path)
    report = ingest(params(src, max_quarantine_rate=0.5), paths)
    assert report.accepted > 0 and report.reasons == {"unreadable_file": 1}
    (record,) = quarantine_records(paths)
    assert record["line"] == report.accepted + 1 and "EOFError" in record["detail"]


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_a_failing_disk_fails_the_batch_instead_of_quarantining(tmp_path: Path) -> None:
    """EIO is the storage's fault, not the file's: nothing is committed, nothing marked read."""
    src = tmp_path / "logs"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"".join(line(good(i)) for i in range(3)))
    (src / "b.jsonl").symlink_to("/proc/self/mem")  # a real file whose reads fail with EIO
    paths = make_paths(tmp_path)
    with pytest.raises(SourceUnavailable, match=r"b\.jsonl: OSError: \[Errno 5\]"):
        ingest(params(src), paths)
    assert not paths.state.exists() and not list(paths.batches.glob("*.jsonl"))


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest(params(tmp_path / "nope"), make_paths(tmp_path))


def _with_call(i: int, name: str, arguments: str) -> dict:
    record = good(i)
    record["messages"][1]["tool_calls"][0]["function"] = {"name": name, "arguments": arguments}
    return record


HOSTILE_CALLS: list[tuple[str, str, str]] = [
    ("deep_list", "get_customer", "[" * 100_000 + "]" * 100_000),
    ("deep_within_size", "get_customer", '{"customer_id": ' + "[" * 2_000 + "]" * 2_000 + "}"),
    ("deep_for_orjson_too", "get_customer", '{"customer_id": ' + "[" * 200 + "]" * 200 + "}"),
    ("big_int", "convert_currency", '{"amount": ' + "9" * 5_000 + "}"),
    ("big_int_orjson_reads", "convert_currency", '{"amount": 18446744073709551615}'),
    ("nan", "convert_currency", '{"amount": NaN}'),
    ("infinity", "convert_currency", '{"amount": -Infinity}'),
    ("overflowing_float", "convert_currency", '{"amount": 1e999}'),
    ("huge_string", "get_customer", '{"customer_id": "' + "C" * 100_000 + '"}'),
    ("huge_name", "n" * 1_000_000, "{}"),
]


def test_trajectories_with_hostile_tool_calls_are_quarantined(tmp_path: Path) -> None:
    """The same bounds as `Environment.step` (environments/bounds.py): what the environment
    would refuse never reaches a batch, and so never curation or train.jsonl."""
    src = tmp_path / "logs"
    src.mkdir()
    hostile = [
        line(_with_call(100 + i, name, args)) for i, (_, name, args) in enumerate(HOSTILE_CALLS)
    ]
    malformed = line(_with_call(99, "get_customer", '{"customer_id": "C-1"'))  # an agent fault
    goods = [line(good(i)) for i in range(1, 30)]
    (src / "a.jsonl").write_bytes(b"".join(goods) + malformed + b"".join(hostile))
    paths = make_paths(tmp_path)
    report = ingest(params(src, max_quarantine_rate=0.5), paths)

    assert report.read == report.accepted + report.quarantined == 30 + len(HOSTILE_CALLS)
    assert report.accepted == 30, "malformed arguments are an agent fault, kept for the gates"
    assert report.reasons == {"out_of_bounds": len(HOSTILE_CALLS)}
    records = quarantine_records(paths)
    assert [r["trajectory_id"] for r in records] == [
        f"t-{100 + i}" for i in range(len(HOSTILE_CALLS))
    ]
    assert all(len(r["detail"]) < 300 for r in records), "details name the bound, not the value"
    accepted = {t.trajectory_id for t in read_trajectories(paths.batches)}
    assert "t-99" in accepted and not accepted & {r["trajectory_id"] for r in records}


# --- PII in what ingest writes (issue 20.3) -------------------------------------------------------
def test_quarantine_ids_and_source_names_are_scrubbed(tmp_path: Path) -> None:
    """Quarantine records, the watermark JSON and the index hold no PII: not the raw text after
    an escaped newline, not a trajectory id with an email, not a file named after a customer."""
    src = tmp_path / "logs"
    src.mkdir()
    truncated = (
        '{"trajectory_id": "t-x", "messages": [{"role": "user", "content": "hi\\n555-123-4567 '
        'j\\u00fcrgen@example.de"}, {"role": "tool", "content": "{\\"customer_id\\": \\"C-1\\", '
        '\\"name\\": \\"Ana Smith\\"'
    )
    bad_id = good(2, trajectory_id="ticket:bob.jones9@example.com", steps="three")
    (src / "ana.smith1@example.com.jsonl").write_bytes(
        line(good(1)) + truncated.encode() + b"\n" + line(bad_id)
    )
    paths = make_paths(tmp_path)
    report = ingest(params(src, max_quarantine_rate=1.0), paths)
    assert (report.read, report.accepted, report.quarantined) == (3, 1, 2)

    records = quarantine_records(paths)
    assert [r["reason"] for r in records] == ["invalid_json", "schema:steps"]
    assert records[1]["trajectory_id"].startswith("ticket:") and has_pseudonym(
        records[1]["trajectory_id"]
    )
    with sqlite3.connect(paths.index) as db:  # every text the index holds, row by row
        index_rows = [
            "\n".join(map(str, row))
            for table in ("ids", "files", "batches")
            for row in db.execute(f"SELECT * FROM {table}")
        ]
    written = [
        *(p.read_text() for p in paths.quarantine.glob("*.jsonl")),
        *(p.read_text() for p in paths.batches.glob("*.jsonl")),
        paths.state.read_text(),
        *index_rows,
    ]
    for text in [*written, paths.index.read_bytes().decode("utf-8", errors="replace")]:
        for leaked in ("ana.smith1", "bob.jones9", "555-123-4567", "rgen@", "Ana Smith"):
            assert leaked not in text, leaked
    for text in written:
        assert not find_pii(text.replace("\\n", "\n"))
    assert json.loads(json.dumps(read_state(paths.state)["files"]))  # still one file, keyed
    again = ingest(params(src, max_quarantine_rate=1.0), paths)  # the scrubbed key still matches
    assert again.read == 0 and again.files["unchanged"] == 1


def test_production_source_without_a_key_reads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "logs"
    src.mkdir()
    (src / "a.jsonl").write_bytes(line(good(1)))
    monkeypatch.delenv("TRACETUNE_PII_KEY")
    paths = make_paths(tmp_path)
    with pytest.raises(PiiKeyMissing):
        ingest(params(src), paths)
    assert not paths.index.exists() and not paths.batches.exists()


def test_no_name_email_or_phone_of_the_simulated_world_reaches_the_data(
    tmp_path: Path, sim_lines: list[str]
) -> None:
    """Real ingest, curation and split on simulated support_desk logs: the customers' names and
    emails and the users' own emails and phones are in the raw logs, and in no file after."""
    from tracetune.config import CurateParams, SplitParams
    from tracetune.environments.support_desk import SupportDesk
    from tracetune.trajectories.curation import curate
    from tracetune.trajectories.io import iter_lines
    from tracetune.trajectories.split import split_curated

    env = SupportDesk()
    env.reset(env.tasks(1, seed=0)[0])
    world = env.db.execute("SELECT name, email FROM customers").fetchall()
    src = tmp_path / "logs"
    src.mkdir()
    raw = "\n".join(sim_lines) + "\n"
    (src / "a.jsonl").write_text(raw)
    names = {n for n, _ in world if n in raw}
    emails = {e for _, e in world if e in raw}
    assert len(names) > 20 and emails and find_pii(raw)  # the test can fail: PII is there

    paths = make_paths(tmp_path / "data")
    ingest(params(src, max_quarantine_rate=0.5), paths)
    curated = tmp_path / "data/curated"
    curated.mkdir()
    with (curated / "golden.jsonl").open("w") as out:
        curate(iter_lines(paths.batches), CurateParams(), out)
    split_curated(iter_lines(curated / "golden.jsonl"), curated, SplitParams(heldout_fraction=0.3))

    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    wanted = {"train.jsonl", "heldout.jsonl", "golden.jsonl", "batch-000001.jsonl"}
    assert wanted <= {p.name for p in files}
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        leaked = [v for v in names | emails if v in text]
        assert not leaked, f"{path.name}: {leaked[:5]}"
        if path.suffix == ".sqlite":  # detectors read its rows: random page bytes can pass Luhn
            with sqlite3.connect(path) as db:
                tables = [
                    r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                ]
                text = "\n".join(
                    "\t".join(map(str, row))
                    for table in tables
                    for row in db.execute(f'SELECT * FROM "{table}"')
                )
        assert not find_pii(text), f"{path.name}: {find_pii(text)[:5]}"
    batch = [json.loads(x) for x in iter_lines(paths.batches)]
    assert any("<name:" in (m.get("content") or "") for t in batch for m in t["messages"])
    for t in batch:  # tool results are still JSON
        for m in t["messages"]:
            if m["role"] == "tool" and (m.get("content") or "").startswith("{"):
                json.loads(m["content"])


def test_add_ids_answers_as_add_id_one_at_a_time(tmp_path: Path) -> None:
    """The chunked index write (`IngestIndex.add_ids`) says what `add_id` per id said: a
    repeat within the list, or an id of an earlier call, is not new; over 500 ids too."""
    import random

    from tracetune.trajectories.ingest import IngestIndex

    rng = random.Random(7)
    one, many = IngestIndex(tmp_path / "a.sqlite"), IngestIndex(tmp_path / "b.sqlite")
    for size in (0, 3, 499, 500, 501, 1200):
        ids = [f"t-{rng.randrange(1500)}" for _ in range(size)]
        assert many.add_ids(ids) == [one.add_id(tid) for tid in ids]
    rows = "SELECT id FROM ids ORDER BY id"
    assert many.conn.execute(rows).fetchall() == one.conn.execute(rows).fetchall()


def test_a_repeat_within_one_chunk_is_a_duplicate(tmp_path: Path) -> None:
    """The same id twice among the lines of one chunk: the first is accepted with its own log
    line as origin, the second quarantined as a duplicate (as when the index was written per
    line)."""
    src = tmp_path / "logs"
    src.mkdir()
    (src / "a.jsonl").write_bytes(line(good(1)) + line(good(2)) + line(good(1)) + line(good(3)))
    paths = make_paths(tmp_path)
    report = ingest(params(src, max_quarantine_rate=0.5), paths)
    assert (report.read, report.accepted, report.duplicates) == (4, 3, 1)
    a = str(src / "a.jsonl")
    assert read_origins(paths.index, ["t-1", "t-3"]) == {"t-1": (a, 1), "t-3": (a, 4)}
    assert [t.trajectory_id for t in read_trajectories(paths.batches)] == ["t-1", "t-2", "t-3"]
    quarantined = [
        json.loads(x) for x in next(paths.quarantine.glob("*.jsonl")).read_text().split("\n") if x
    ]
    assert [(r["line"], r["reason"]) for r in quarantined] == [(3, "duplicate_trajectory_id")]
