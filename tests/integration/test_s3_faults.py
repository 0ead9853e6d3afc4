"""S3 faults on a real S3-compatible server: a download that stalls mid-body is never data loss.

moto's server runs as a subprocess so that it can really be paused (`SIGSTOP`) in the middle of
sending a large object, as a hung store or a dead network path would. The client sees a read
timeout mid-body. Ingest must either recover (retry, resume, read every line) or fail the stage
with nothing committed, never accept the lines it got so far and mark the object as read.

The pause is triggered by the test once the client has consumed `PAUSE_AT` bytes of the first
GET's body (a botocore `after-call` hook wraps the real body to count them): the bytes are the
server's, over real HTTP; only the moment of the fault is chosen by the test.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tracetune.config import IngestParams, S3RetryParams
from tracetune.trajectories.ingest import IngestPaths, ingest, read_state
from tracetune.trajectories.io import read_trajectories
from tracetune.trajectories.sources import S3Source, SourceUnavailable, open_source

CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
BUCKET = "fault-logs"
# 48 lines of ~1 MB: more than can be in flight when the server stops (its send buffer, at most
# net.ipv4.tcp_wmem's 4 MiB, plus the client's receive window, at most tcp_rmem's 32 MiB here,
# 6 MiB on stock Ubuntu), so the client must run dry mid-body. Filler that the PII scrubber scans
# fast keeps ingest at ~30 MiB/s.
BIG_LINES = 48
PAD = 1_000_000
PAUSE_AT = 256 << 10
# Short timeouts keep each test a few seconds; the shipped defaults are in params.yaml.
FAST = {"read_timeout_s": 0.5, "connect_timeout_s": 0.5, "backoff_s": 0.05, "max_backoff_s": 0.4}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`moto_server` as a child process on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDS.items():
            mp.setenv(key, value)
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        mp.setenv("TRACETUNE_PII_KEY", "s3-fault-tests-random-0c9f2e7a")
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
                    break
                except Exception:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.1)
            yield url, proc
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            proc.wait(10)


def record(tid: str, padding: int = 0) -> dict[str, Any]:
    """A valid trajectory; `padding` bytes of notes in its tool result."""
    notes = "x" * padding
    return {
        "trajectory_id": tid,
        "task_id": "customer_tier:C-0001",
        "family": "customer_tier",
        "timestamp": "2026-11-01T00:00:00+00:00",
        "model": "m",
        "messages": [
            {"role": "user", "content": "Which tier is C-0001 in?"},
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
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": json.dumps({"tier": "gold", "notes": notes}),
            },
            {"role": "assistant", "content": "Gold."},
        ],
        "success": True,
        "steps": 2,
        "error_retries": 0,
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        "cost_usd": 0.001,
        "latency_s": 1.0,
    }


def big_body(prefix: str) -> bytes:
    return b"".join(
        json.dumps(record(f"{prefix}-{i:04d}", PAD)).encode() + b"\n" for i in range(BIG_LINES)
    )


class PauseMidBody:
    """Pauses the server once the client has read `at` bytes of the first GetObject body.

    With `resume_after_retries` set, the server is resumed (`SIGCONT`) when ingest logs that
    many retries (so the client has really stalled, however slowly it parses); otherwise it stays
    paused until the test resumes it.
    """

    def __init__(
        self, proc: subprocess.Popen[bytes], at: int, resume_after_retries: int | None
    ) -> None:
        self.proc, self.at, self.resume_after_retries = proc, at, resume_after_retries
        self.armed, self.paused_at, self.retries_seen = True, -1, 0

    def __call__(self, parsed: dict[str, Any], **_: Any) -> None:
        if self.armed and "Body" in parsed:
            self.armed = False
            parsed["Body"] = _CountingBody(parsed["Body"], self)

    def pause(self, consumed: int) -> None:
        self.paused_at = consumed
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def retried(self) -> None:
        self.retries_seen += 1
        if self.retries_seen == self.resume_after_retries:
            self.resume()


class _OnRetry(logging.Handler):
    """Sees ingest's "retry i of n" warnings (tracetune.trajectories.sources)."""

    def __init__(self, hook: PauseMidBody) -> None:
        super().__init__(logging.WARNING)
        self.hook = hook

    def emit(self, record: logging.LogRecord) -> None:
        if "retry" in record.getMessage():
            self.hook.retried()


class _CountingBody:
    def __init__(self, body: Any, trigger: PauseMidBody) -> None:
        self.body, self.trigger, self.consumed = body, trigger, 0

    def read(self, amt: int | None = None) -> bytes:
        data = self.body.read(amt)
        self.consumed += len(data)
        if self.trigger.paused_at < 0 and self.consumed >= self.trigger.at:
            self.trigger.pause(self.consumed)
        return data

    def close(self) -> None:
        self.body.close()


@pytest.fixture
def pause_mid_body(
    server: tuple[str, subprocess.Popen[bytes]],
) -> Iterator[Any]:
    """Arms a `PauseMidBody` on every boto3 client created after the call (default session)."""
    boto3.setup_default_session()
    logger = logging.getLogger("tracetune.trajectories.sources")
    handlers: list[logging.Handler] = []

    def arm(at: int, resume_after_retries: int | None) -> PauseMidBody:
        hook = PauseMidBody(server[1], at, resume_after_retries)
        assert boto3.DEFAULT_SESSION is not None
        boto3.DEFAULT_SESSION.events.register("after-call.s3.GetObject", hook)
        handlers.append(_OnRetry(hook))
        logger.addHandler(handlers[-1])
        return hook

    try:
        yield arm
    finally:
        os.kill(server[1].pid, signal.SIGCONT)
        boto3.DEFAULT_SESSION = None
        for handler in handlers:
            logger.removeHandler(handler)


def make_paths(root: Path) -> IngestPaths:
    return IngestPaths(
        root / "b", root / "q", root / "i.sqlite", root / "s.json", root / "rejected.jsonl"
    )


def test_a_stall_mid_body_is_retried_and_resumed(
    server: tuple[str, subprocess.Popen[bytes]], pause_mid_body: Any, tmp_path: Path
) -> None:
    url, _ = server
    client = boto3.client("s3", endpoint_url=url)
    key = "recover/00.jsonl"
    client.put_object(Bucket=BUCKET, Key=key, Body=big_body("r"))
    etag = client.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')
    params = IngestParams(
        source=f"s3://{BUCKET}/recover/",
        s3_endpoint_url=url,
        s3_retry=S3RetryParams(attempts=10, **FAST),
    )
    hook = pause_mid_body(PAUSE_AT, resume_after_retries=2)  # stalled, retried, then back
    source = open_source(params.source, params.s3_endpoint_url, params.s3_retry)
    paths = make_paths(tmp_path)

    report = ingest(params, paths, source)

    assert hook.paused_at >= PAUSE_AT, "the server was paused mid-body"
    assert isinstance(source, S3Source) and source.retries >= 2, "the stall was retried"
    assert (report.read, report.accepted, report.quarantined) == (BIG_LINES, BIG_LINES, 0)
    ids = sorted(t.trajectory_id for t in read_trajectories(paths.batches))
    assert ids == [f"r-{i:04d}" for i in range(BIG_LINES)]  # each line once, none lost
    mark = read_state(paths.state)["files"][f"s3://{BUCKET}/{key}"]
    assert (mark["fingerprint"], mark["lines"]) == (etag, BIG_LINES)


def test_a_persistent_stall_fails_the_stage_and_commits_nothing(
    server: tuple[str, subprocess.Popen[bytes]],
    pause_mid_body: Any,
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tasks.ingest import main

    url, _ = server
    client = boto3.client("s3", endpoint_url=url)
    small = b"".join(json.dumps(record(f"s-{i}")).encode() + b"\n" for i in range(5))
    client.put_object(Bucket=BUCKET, Key="persist/00.jsonl", Body=small)
    retry = dict(FAST, attempts=3)
    ingest_params = {"source": f"s3://{BUCKET}/persist/", "s3_endpoint_url": url, "s3_retry": retry}
    Path("params.yaml").write_text(yaml.safe_dump({"ingest": ingest_params}))
    main(["params.yaml"])  # batch 1: the small object
    state_path = in_tmp / "data/state/ingest_watermark.json"
    before = state_path.read_bytes()

    client.put_object(Bucket=BUCKET, Key="persist/01.jsonl", Body=big_body("p"))
    hook = pause_mid_body(PAUSE_AT, resume_after_retries=None)  # the fault persists
    with pytest.raises(SystemExit) as failed:
        main(["params.yaml"])
    assert failed.value.code == 1
    assert hook.paused_at > 0
    err = capsys.readouterr().err
    assert "01.jsonl" in err and "nothing was committed" in err, err
    assert state_path.read_bytes() == before, "the watermark did not move"
    assert sorted(p.name for p in (in_tmp / "data/ingested/batches").iterdir()) == [
        "batch-000001.jsonl"
    ]

    hook.resume()  # the store is back (and busy with the abandoned requests at first)
    ingest_params["s3_retry"] = {"read_timeout_s": 10.0, "backoff_s": 0.1}
    Path("params.yaml").write_text(yaml.safe_dump({"ingest": ingest_params}))
    main(["params.yaml"])  # the rerun reads the whole object
    state = read_state(state_path)
    assert state["last_batch"]["batch"] == 2
    assert (state["last_batch"]["read"], state["last_batch"]["accepted"]) == (BIG_LINES, BIG_LINES)
    assert state["files"][f"s3://{BUCKET}/persist/01.jsonl"]["lines"] == BIG_LINES


def test_an_object_replaced_while_listed_is_never_half_old(
    server: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Reads are pinned to the listed ETag: a replaced object fails the run, then is read anew."""
    url, _ = server
    writer = boto3.session.Session().client("s3", endpoint_url=url)
    key = "replaced/00.jsonl"
    old = b"".join(json.dumps(record(f"o-{i}")).encode() + b"\n" for i in range(5))
    new = b"".join(json.dumps(record(f"n-{i}")).encode() + b"\n" for i in range(7))
    writer.put_object(Bucket=BUCKET, Key=key, Body=old)
    params = IngestParams(source=f"s3://{BUCKET}/replaced/", s3_endpoint_url=url)
    source = open_source(params.source, params.s3_endpoint_url, S3RetryParams(**FAST))
    assert isinstance(source, S3Source)

    def replace(**_: Any) -> None:  # between the listing and the first GET
        writer.put_object(Bucket=BUCKET, Key=key, Body=new)

    source.client.meta.events.register("after-call.s3.ListObjectsV2", replace)
    paths = make_paths(tmp_path)
    with pytest.raises(SourceUnavailable, match="replaced after it was listed"):
        ingest(params, paths, source)
    assert not paths.state.exists() and not list(paths.batches.glob("*.jsonl"))

    source.client.meta.events.unregister("after-call.s3.ListObjectsV2", replace)
    report = ingest(params, paths, source)
    assert (report.read, report.accepted) == (7, 7)
    assert {t.trajectory_id for t in read_trajectories(paths.batches)} == {
        f"n-{i}" for i in range(7)
    }


def test_only_a_truly_truncated_gzip_is_quarantined(
    server: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Corrupt content is the object's fault (quarantined); the store's faults are not."""
    url, _ = server
    client = boto3.client("s3", endpoint_url=url)
    lines = (json.dumps(record(f"g-{i}", 2000)).encode() + b"\n" for i in range(100))
    body = gzip.compress(b"".join(lines))
    client.put_object(Bucket=BUCKET, Key="corrupt/00.jsonl.gz", Body=body[: len(body) // 2])
    params = IngestParams(
        source=f"s3://{BUCKET}/corrupt/",
        s3_endpoint_url=url,
        s3_retry=S3RetryParams(attempts=2, **FAST),
        max_quarantine_rate=1.0,
    )
    source = open_source(params.source, params.s3_endpoint_url, params.s3_retry)
    report = ingest(params, make_paths(tmp_path), source)
    assert report.reasons == {"unreadable_file": 1}
    assert 0 < report.accepted < 100 and isinstance(source, S3Source) and source.retries == 0


def test_an_unreachable_store_fails_after_bounded_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in CREDS.items():
        monkeypatch.setenv(key, value)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    waits: list[float] = []
    retry = S3RetryParams(attempts=4, backoff_s=0.5, max_backoff_s=1.0, connect_timeout_s=0.3)
    source = S3Source(
        f"s3://{BUCKET}/x/", f"http://127.0.0.1:{port}", retry=retry, sleep=waits.append
    )
    params = IngestParams(source=source.uri)
    with pytest.raises(SourceUnavailable, match=r"listing .*failed 4 times in a row"):
        ingest(params, make_paths(tmp_path), source)
    assert waits == [0.5, 1.0, 1.0]  # exponential, capped, bounded
    assert not (tmp_path / "s.json").exists()
