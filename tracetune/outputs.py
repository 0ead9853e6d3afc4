"""Atomic model outputs: a stage's output folder is the old one or the complete new one, never
half of either.

A save writes into a temporary sibling (`.NAME.tmp-PID`, same file system), then swaps it into
place. On Linux the swap is one `renameat2(RENAME_EXCHANGE)`: a `kill -9` at any instant leaves
the old folder or the new one at the path. Where that call is missing, the swap is two renames
(old aside to `.NAME.old`, new in), and the next save (or `recover`) puts the old folder back if
a kill fell between them. What a killed save left behind is removed by the next one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@lru_cache(maxsize=1)
def _renameat2() -> Any:
    """glibc's `renameat2`, or None (not Linux, an old libc, a sandbox refusing it)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        func = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False when the system cannot."""
    func = _renameat2()
    if func is None:
        return False
    rc = func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover(target: Path) -> None:
    """Undo what a killed save left: the old folder back in place if a kill fell between the
    two renames of the fallback swap, and no temporary siblings."""
    old = _old(target)
    if old.exists() and not target.exists():
        old.rename(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Data on disk before the rename that publishes it (a power cut must not publish holes)."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())


@contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield an empty temporary sibling to write the new output into; on a clean exit it
    replaces `target` in one step. An exception (or a kill) leaves `target` as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(new: Path, target: Path) -> None:
    """Put the folder `new` at `target`, replacing what is there in one step where possible."""
    if not target.exists():
        new.rename(target)
        return
    if _exchange(new, target):  # `new` now holds the old output
        shutil.rmtree(new, ignore_errors=True)
        return
    old = _old(target)
    target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
