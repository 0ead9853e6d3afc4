"""Where production logs come from: a local folder (or file) or an S3 prefix, as byte streams.

Both give the same two things: a listing of log objects (`.jsonl`, `.jsonl.gz`) with a
fingerprint that changes when the content changes, and a stream of an object's (decompressed)
bytes, optionally from an offset. The ingest watermark is built on these two alone.

S3 goes through boto3, so credentials come from the standard AWS chain (environment, profile,
instance role) and `AWS_ENDPOINT_URL` or `ingest.s3_endpoint_url` point it at MinIO, moto or any
S3-compatible store. Listing is paginated; objects are streamed, never read whole into memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tracetune.trajectories.io import JSONL_SUFFIXES

# Names read from a folder (a file named as the source is read whatever its name); what is in
# them is recognised by content (tracetune.trajectories.readers), never by these suffixes.
LOG_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".json.gz", ".ndjson", ".ndjson.gz")
HEAD_BYTES = 4096
READ_BUFFER = 1 << 20


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

    def head_hash(self, obj: SourceObject, n: int = HEAD_BYTES) -> str:
        """Hash of the first `n` bytes: tells an appended file from a replaced one."""
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
                size = file.stat().st_size
                obj = SourceObject(str(file), size, "", file.name.endswith(".gz"), False)
                head = self.head_hash(obj, HEAD_BYTES)
                yield SourceObject(
                    str(file), size, f"{size}:{head}", obj.compressed, not obj.compressed
                )

    def head_hash(self, obj: SourceObject, n: int = HEAD_BYTES) -> str:
        with open(obj.uri, "rb") as handle:
            return hashlib.sha1(handle.read(n)).hexdigest()

    def open(self, obj: SourceObject, offset: int = 0) -> IO[bytes]:
        handle = open(obj.uri, "rb", buffering=READ_BUFFER)  # noqa: SIM115 - the caller closes it
        if obj.compressed:
            return _gunzip(handle)
        handle.seek(offset)
        return handle


class _BodyReader(io.RawIOBase):
    """A botocore StreamingBody as a raw stream, so `io.BufferedReader` can iterate its lines."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


class S3Source(LogSource):
    def __init__(
        self, uri: str, endpoint_url: str | None = None, client: Any = None, page_size: int = 1000
    ) -> None:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"ingest.source '{uri}' must look like s3://bucket/prefix")
        self.uri, self.bucket, self.prefix, self.page_size = uri, bucket, prefix, page_size
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint_url or None)
        self.client = client

    def objects(self) -> Iterator[SourceObject]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": self.page_size}
        )
        for page in pages:
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

    def open(self, obj: SourceObject, offset: int = 0) -> IO[bytes]:
        key = obj.uri.removeprefix(f"s3://{self.bucket}/")
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        stream = io.BufferedReader(_BodyReader(body), READ_BUFFER)
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


def open_source(source: str, endpoint_url: str | None = None) -> LogSource:
    """`s3://bucket/prefix` or a local path."""
    if source.startswith("s3://"):
        return S3Source(source, endpoint_url)
    return LocalSource(Path(source))
