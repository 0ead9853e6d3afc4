"""Where production logs come from: a local folder (or file) or an S3 prefix, as byte streams.

Both give the same two things: a listing of log objects (`.jsonl`, `.jsonl.gz`) with a
fingerprint that changes when the content changes, and a stream of an object's (decompressed)
bytes, optionally from an offset. The ingest watermark is built on these two alone.

A local file's fingerprint is its stat signature (size, mtime, ctime, inode): a rewrite of the
same size is caught without reading anything. Whether a changed file only grew is decided by a
hash of everything read so far (`prefix_hasher`), which ingest keeps feeding while it reads.

S3 goes through boto3, so credentials come from the standard AWS chain (environment, profile,
instance role) and `AWS_ENDPOINT_URL` or `ingest.s3_endpoint_url` point it at MinIO, moto or any
S3-compatible store. Listing is paginated; objects are streamed, never read whole into memory.
Transport faults (timeouts, dropped connections, 5xx) are retried with backoff, a body read
resuming at the byte where it stopped (`Range`, pinned to the listed ETag by `If-Match`); when
they persist, `SourceUnavailable` is raised. It is deliberately not an `OSError`, so that ingest
never mistakes a stalled download for a truncated (corrupt) object.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tracetune.config import S3RetryParams
from tracetune.trajectories.io import JSONL_SUFFIXES

# Names read from a folder (a file named as the source is read whatever its name); what is in
# them is recognised by content (tracetune.trajectories.readers), never by these suffixes.
LOG_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".json.gz", ".ndjson", ".ndjson.gz")
READ_BUFFER = 1 << 20
RACY_NS = 2_000_000_000  # a file changed this recently may change again unseen
STAT_SIGNATURE = re.compile(r"s\d+m\d+c\d+i\d+(?:racy\d+)?")  # what `stat_fingerprint` writes
log = logging.getLogger(__name__)


class SourceUnavailable(RuntimeError):
    """The store did not deliver a listing or an object, even after retries.

    A transport fault, not bad data: the batch fails and commits nothing, so the watermark stays
    where it was and the next run reads the object again, whole.
    """


def new_hasher() -> Any:
    """The hash of an appendable file's bytes read so far.

    SHA-256: with the SHA extensions of current x86 and ARM CPUs it is the fastest of hashlib's
    hashes (2.4x blake2b on the reference machine, docs/data.md).
    """
    return hashlib.sha256()


@dataclass(frozen=True)
class SourceObject:
    uri: str
    size: int
    fingerprint: str  # changes whenever the content changes
    compressed: bool
    appendable: bool  # a growing local .jsonl file: later runs read only the new tail


class LogSource(ABC):
    uri: str

    @abstractmethod
    def objects(self) -> Iterator[SourceObject]:
        """Log objects in a stable (name) order."""

    @abstractmethod
    def open(self, obj: SourceObject, offset: int = 0) -> IO[bytes]:
        """The object's decompressed bytes from `offset` (offsets only for appendable objects)."""

    def prefix_hasher(self, obj: SourceObject, n: int) -> Any:
        """A hasher fed with the first `n` bytes: tells an appended file from a rewritten one.

        Ingest keeps feeding it the lines it reads, so the mark of a file is the hash of exactly
        the bytes read, at no extra pass. Only appendable objects need it.
        """
        return new_hasher()

    def content_hash(self, obj: SourceObject) -> str:
        """A hash of the whole stored object, for one that is read whole (not appendable).

        Only where the fingerprint may change while the bytes do not (a local file's stat
        signature): the same hash then means "touched, not changed". "" (the default) where the
        fingerprint names the content already (an ETag).
        """
        return ""


def _is_log(name: str) -> bool:
    return name.endswith(LOG_SUFFIXES)


class LocalSource(LogSource):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.uri = str(path)

    def objects(self) -> Iterator[SourceObject]:
        if not self.path.exists():
            raise FileNotFoundError(f"ingest source {self.path} does not exist")
        files = [self.path] if self.path.is_file() else sorted(self.path.rglob("*"))
        for file in files:
            if file.is_file() and (file == self.path or _is_log(file.name)):
                st = file.stat()
                compressed = file.name.endswith(".gz")
                fingerprint = stat_fingerprint(st, time.time_ns())
                yield SourceObject(str(file), st.st_size, fingerprint, compressed, not compressed)

    def prefix_hasher(self, obj: SourceObject, n: int) -> Any:
        hasher = new_hasher()
        with open(obj.uri, "rb") as handle:
            while n > 0:
                block = handle.read(min(n, READ_BUFFER))
                if not block:
                    break
                hasher.update(block)
                n -= len(block)
        return hasher

    def content_hash(self, obj: SourceObject) -> str:
        return str(self.prefix_hasher(obj, obj.size).hexdigest())  # the stored (gzip) bytes

    def open(self, obj: SourceObject, offset: int = 0) -> IO[bytes]:
        handle = open(obj.uri, "rb", buffering=READ_BUFFER)  # noqa: SIM115 - the caller closes it
        if obj.compressed:
            return _gunzip(handle)
        handle.seek(offset)
        return handle


def stat_fingerprint(st: Any, now_ns: int) -> str:
    """Size, mtime, ctime and inode: any write or replace changes one, reading none does.

    ctime cannot be set from user space, so even a same-size rewrite that restores the mtime
    (`cp -p`, `touch -d`) changes the fingerprint. A change only means "look again": the prefix
    hash then decides between appended, rewritten and merely touched.

    File times tick at the kernel's clock granularity (milliseconds), so a file changed less than
    `RACY_NS` ago could change again within the same tick unseen ("racily clean", as git calls
    it): its fingerprint then carries the listing time and never matches, and the next run checks
    its bytes instead.
    """
    # Letters between the numbers: a 19-digit nanosecond time standing alone would read as a
    # card number (Luhn passes one time in ten) to anyone scanning the exported watermark.
    signature = f"s{st.st_size}m{st.st_mtime_ns}c{st.st_ctime_ns}i{st.st_ino}"
    if now_ns - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
        return f"{signature}racy{now_ns}"
    return signature


def is_stat_fingerprint(fingerprint: str) -> bool:
    """A local file's stat signature, which says when to look again, not what the file holds.

    It changes when a file is only touched, and a racy one differs on every run, so it stays in
    the index and out of the exported watermark: that file is a DVC dependency of the stages
    after ingest, and must not change when no log did. An ETag (hex digits) or a trace's state
    (`OK:2`) cannot match; those name content, so they are exported.
    """
    return STAT_SIGNATURE.fullmatch(fingerprint) is not None


class _ShortBody(Exception):
    """The body ended before the listed size: the connection dropped mid-object."""


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: a timeout, a dropped or refused connection, throttling, a 5xx."""
    from botocore.exceptions import (
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        ResponseStreamingError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from urllib3.exceptions import HTTPError

    if isinstance(exc, ClientError):
        meta = exc.response.get("ResponseMetadata", {})
        code = exc.response.get("Error", {}).get("Code", "")
        status = int(meta.get("HTTPStatusCode") or 0)
        return status >= 500 or status == 429 or code in {"SlowDown", "RequestTimeout"}
    transient = (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError)
    return isinstance(exc, (*transient, HTTPError, _ShortBody, ConnectionError, TimeoutError))


class _S3Body(io.RawIOBase):
    """An S3 object's bytes as a raw stream that survives stalls and dropped connections.

    A failed read is retried (by `S3Source.pause_or_fail`) with a new request for the rest of the
    object (`Range: bytes=<pos>-`), pinned to the listed ETag, so the bytes delivered are exactly
    the listed object's, each once. Only bytes actually returned advance `pos`.
    """

    def __init__(self, source: S3Source, key: str, obj: SourceObject) -> None:
        self.source, self.key, self.obj = source, key, obj
        self.pos, self.body = 0, None  # type: int, Any

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        failures = 0
        while True:
            try:
                if self.body is None:
                    if self.pos >= self.obj.size:
                        return 0  # the connection broke after the last byte arrived
                    self.body = self.source.get_body(self.key, self.obj.fingerprint, self.pos)
                data = self.body.read(len(buffer))
                if not data and self.pos < self.obj.size:
                    raise _ShortBody(f"the body ended at byte {self.pos} of {self.obj.size}")
                break
            except Exception as exc:
                self._drop_body()
                failures += 1
                where = f"reading {self.obj.uri} at byte {self.pos} of {self.obj.size}"
                self.source.pause_or_fail(failures, exc, where)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def _drop_body(self) -> None:
        body, self.body = self.body, None
        if body is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                body.close()

    def close(self) -> None:
        self._drop_body()
        super().close()


class S3Source(LogSource):
    def __init__(
        self,
        uri: str,
        endpoint_url: str | None = None,
        client: Any = None,
        page_size: int = 1000,
        retry: S3RetryParams | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"ingest.source '{uri}' must look like s3://bucket/prefix")
        self.uri, self.bucket, self.prefix, self.page_size = uri, bucket, prefix, page_size
        self.retry, self.sleep = retry or S3RetryParams(), sleep
        self.retries = 0  # transient faults ridden out so far
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                connect_timeout=self.retry.connect_timeout_s,
                read_timeout=self.retry.read_timeout_s,
                retries={"total_max_attempts": 1},  # one retry policy: ours (`pause_or_fail`)
            )
            client = boto3.client("s3", endpoint_url=endpoint_url or None, config=config)
        self.client = client

    def pause_or_fail(self, failures: int, exc: BaseException, what: str) -> None:
        """Wait before the next try, or raise `SourceUnavailable` when retrying cannot help."""
        detail = f"{what}: {type(exc).__name__}: {exc}"
        if not is_transient(exc):
            if "PreconditionFailed" in str(exc):
                detail += " (the object was replaced after it was listed; the next run reads it)"
            raise SourceUnavailable(detail) from exc
        if failures >= self.retry.attempts:
            raise SourceUnavailable(
                f"{detail} (failed {failures} times in a row, ingest.s3_retry.attempts)"
            ) from exc
        delay = min(self.retry.backoff_s * 2 ** (failures - 1), self.retry.max_backoff_s)
        log.warning("%s; retry %d of %d in %.2f s", detail, failures, self.retry.attempts, delay)
        self.retries += 1
        self.sleep(delay)

    def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        failures = 0
        while True:
            try:
                return fn(**kwargs)
            except Exception as exc:
                failures += 1
                self.pause_or_fail(failures, exc, what)

    def objects(self) -> Iterator[SourceObject]:
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.prefix,
            "MaxKeys": self.page_size,
        }
        while True:
            page = self._call(f"listing {self.uri}", self.client.list_objects_v2, **kwargs)
            for item in page.get("Contents", ()):
                key = item["Key"]
                if _is_log(key):
                    yield SourceObject(
                        f"s3://{self.bucket}/{key}",
                        int(item["Size"]),
                        str(item["ETag"]).strip('"'),
                        key.endswith(".gz"),
                        False,  # S3 objects are immutable: a change is a new object
                    )
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def get_body(self, key: str, etag: str, start: int) -> Any:
        """One request for the object's bytes from `start`; fails (412) if it was replaced."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "IfMatch": f'"{etag}"'}
        if start:
            kwargs["Range"] = f"bytes={start}-"
        return self.client.get_object(**kwargs)["Body"]

    def open(self, obj: SourceObject, offset: int = 0) -> IO[bytes]:
        key = obj.uri.removeprefix(f"s3://{self.bucket}/")
        stream = io.BufferedReader(_S3Body(self, key, obj), READ_BUFFER)
        return _gunzip(stream) if obj.compressed else stream


class _GzipStream(gzip.GzipFile):
    """Decompressed lines of a gzip stream; closing it closes the underlying stream too.

    No extra read-ahead buffer: when the file is truncated, every line before the damage is
    still delivered (the error then names the line where reading stopped).
    """

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        super().__init__(fileobj=inner, mode="rb")

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._inner.close()


def _gunzip(handle: IO[bytes]) -> IO[bytes]:
    return _GzipStream(handle)  # type: ignore[return-value]  # a binary stream


def open_source(
    source: str, endpoint_url: str | None = None, retry: S3RetryParams | None = None
) -> LogSource:
    """`s3://bucket/prefix` or a local path."""
    if source.startswith("s3://"):
        return S3Source(source, endpoint_url, retry=retry)
    return LocalSource(Path(source))
