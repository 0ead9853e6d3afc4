"""Reading and writing trajectory files with bounded memory.

Every stage streams: files are read line by line, sets that would grow with the input (seen
trajectory ids, duplicate keys) live in SQLite on disk, and parallel work runs over a bounded
window of chunks, so peak memory does not depend on how many trajectories flow through.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from tracetune.trajectories.schema import Trajectory

T = TypeVar("T")
R = TypeVar("R")

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def jsonl_files(path: Path) -> list[Path]:
    """`path` itself, or the `.jsonl` files under it in name order (batches sort by number)."""
    if path.is_file():
        return [path]
    if not path.exists():
        return []
    return sorted(p for p in path.rglob("*.jsonl") if p.is_file())


def iter_lines(path: Path) -> Iterator[str]:
    """Non-empty lines of a file or of every `.jsonl` file under a folder."""
    for file in jsonl_files(path):
        with file.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield line.rstrip("\n")


def read_trajectories(path: Path | str) -> Iterator[Trajectory]:
    """Trajectories from a `Trajectory`-schema JSONL file or folder (curated/ingested output).

    These files were validated when written, so a line that does not parse is a real error: it
    raises with the file and line instead of being skipped.
    """
    for file in jsonl_files(Path(path)):
        with file.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield Trajectory.model_validate_json(line)
                except ValueError as exc:
                    raise ValueError(f"{file}:{number}: not a valid trajectory: {exc}") from exc


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int = 1,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[R]:
    """`map(fn, items)` over `workers` processes, in order, with at most 2 x workers in flight.

    `ProcessPoolExecutor.map` submits the whole input up front (memory grows with it); this
    window keeps the input streaming. With one worker everything runs in-process.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(
        workers, mp_context=mp.get_context(method), initializer=initializer, initargs=initargs
    ) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class DiskSet:
    """A set of strings kept in SQLite: membership tests without memory growing with the input.

    `add` returns False when the key was already there. Changes belong to one transaction until
    `commit()`; `rollback()` forgets them (a failed batch leaves no trace).
    """

    def __init__(self, path: Path | str = "", table: str = "keys") -> None:
        self.path = str(path) or ""
        self.table = table
        self.conn = sqlite3.connect(self.path or "")  # "" = a private temporary file
        self.conn.execute("PRAGMA cache_size=-8000")  # 8 MB page cache, spills to disk
        if not self.path:
            self.conn.execute("PRAGMA journal_mode=OFF")
            self.conn.execute("PRAGMA synchronous=OFF")
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (k TEXT PRIMARY KEY) WITHOUT ROWID")

    def add(self, key: str) -> bool:
        cur = self.conn.execute(f"INSERT OR IGNORE INTO {self.table} VALUES (?)", (key,))
        return cur.rowcount == 1

    def add_many(self, keys: list[str]) -> list[bool]:
        """`add` for each of `keys` in order (a repeat within the list is False after its
        first), in one lookup per 500 keys and one insert: a statement per key was most of the
        caller's share of the work (curation's dedupe in the main process)."""
        seen: set[str] = set()
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            query = f"SELECT k FROM {self.table} WHERE k IN ({','.join('?' * len(part))})"
            seen.update(row[0] for row in self.conn.execute(query, part))
        fresh = []
        for key in keys:
            fresh.append(key not in seen)
            seen.add(key)
        new = [(key,) for key, ok in zip(keys, fresh, strict=True) if ok]
        self.conn.executemany(f"INSERT INTO {self.table} VALUES (?)", new)
        return fresh

    def __contains__(self, key: object) -> bool:
        row = self.conn.execute(f"SELECT 1 FROM {self.table} WHERE k=?", (key,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        return int(self.conn.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0])

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


@contextmanager
def atomic_writer(path: Path) -> Iterator[Any]:
    """Write `path` through a temporary sibling that replaces it only when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
