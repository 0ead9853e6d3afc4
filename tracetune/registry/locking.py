"""One promotion at a time per registered model, whatever the backend.

MLflow keeps aliases unique, so two promoters can never leave two champions; what they *can*
do is lose an update of our bookkeeping (the champion history both read, extended and wrote
back) or alias a version another process is still registering. Every change of the champion or
challenger alias therefore runs inside `registry_lock`:

- a **local store** (`sqlite:///path`, a file store) gets an `fcntl.flock` on a file in the
  machine's temporary folder, keyed by the store's absolute path (`lock_dir`): the kernel
  releases it when the holder dies, so there are no stale locks, and nothing is left beside the
  store in the user's repository (a local store is only shared by processes on this machine);
- a **server** (`http(s)://`, or a database URI) gets a lock made of the registry itself: a
  registered model named `<model>.lock`. Creating a registered model is an atomic
  create-if-absent in every MLflow store (a unique key in the database), so exactly one process
  succeeds; it deletes the entry when done. A holder that dies leaves it behind, so the entry
  carries an expiry and a waiter removes an expired one.

Callers still verify after writing (`approval._verify`), so a lock that was broken (an expired
lease, someone writing by hand) surfaces as an error instead of a silent lost update.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from mlflow import MlflowClient

LOCK_SUFFIX = ".lock"
OWNER_TAG = "tracetune.lock.owner"
EXPIRES_TAG = "tracetune.lock.expires"
DEFAULT_TTL_S = 300.0


class RegistryLockTimeout(TimeoutError):
    """Another promotion held the lock for longer than we were willing to wait."""


def local_store_path(tracking_uri: str) -> Path | None:
    """The file or folder behind a local store, or None for servers and database servers."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative.db and sqlite:////abs/path.db (SQLAlchemy's spelling)
        path = unquote(tracking_uri.split(":///", 1)[1]) if ":///" in tracking_uri else ""
        return Path(path).resolve() if path and path != ":memory:" else None
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (or a Windows drive)
        return Path(tracking_uri).resolve()
    return None


def lock_dir(store: Path) -> Path:
    """Where the file locks of one local store live: outside the workspace, one folder per
    store (its resolved path hashed), so two workspaces never share a lock by accident."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(store.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "tracetune-locks" / f"{store.name}-{digest}"


def lock_file_for(store: Path, model_name: str) -> Path:
    """One lock file per registered model of a local store (`lock_dir`)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)
    return lock_dir(store) / f"{safe}{LOCK_SUFFIX}"


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@contextmanager
def file_lock(path: Path, timeout_s: float, poll_s: float = 0.02) -> Iterator[None]:
    """An exclusive `flock` on `path`, waiting at most `timeout_s`."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RegistryLockTimeout(
                        f"registry lock {path} still held after {timeout_s:.0f} s"
                    ) from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def _try_create(client: MlflowClient, lock_name: str, owner: str, ttl_s: float) -> bool:
    """One attempt at the atomic create-if-absent; False when someone else holds it."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            lock_name,
            tags={OWNER_TAG: owner, EXPIRES_TAG: f"{time.time() + ttl_s:.3f}"},
            description="tracetune promotion lock (deleted when the promotion ends)",
        )
    except MlflowException as exc:
        # RESOURCE_DOES_NOT_EXIST: it existed when our insert failed and was gone when the
        # store read it back to word its "already exists" error (the holder released it in
        # between; MLflow's SQL store does that read). Either way not ours yet: try again.
        if _error_code(exc) in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            return False
        raise
    return True


def _holder(client: MlflowClient, lock_name: str) -> tuple[str, float] | None:
    """(owner, expiry) of the current holder, or None when the lock vanished meanwhile."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock_name)
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    try:
        expires = float(model.tags.get(EXPIRES_TAG, "0"))
    except ValueError:
        expires = 0.0
    return model.tags.get(OWNER_TAG, ""), expires


def _delete_if_owner(client: MlflowClient, lock_name: str, owner: str) -> None:
    """Delete the lock entry only while `owner` still holds it (never someone else's)."""
    from mlflow.exceptions import MlflowException

    holder = _holder(client, lock_name)
    if holder is None or holder[0] != owner:
        return
    try:
        client.delete_registered_model(lock_name)
    except MlflowException as exc:
        if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise


@contextmanager
def server_lock(
    client: MlflowClient,
    model_name: str,
    timeout_s: float,
    ttl_s: float = DEFAULT_TTL_S,
    poll_s: float = 0.2,
) -> Iterator[str]:
    """The registered-model lock (see the module docstring); yields the owner id."""
    import random

    lock_name = f"{model_name}{LOCK_SUFFIX}"
    owner = owner_id()
    deadline = time.monotonic() + timeout_s
    while not _try_create(client, lock_name, owner, ttl_s):
        holder = _holder(client, lock_name)
        if holder is not None and holder[1] < time.time():
            _delete_if_owner(client, lock_name, holder[0])  # an expired lease: its holder died
            continue
        if time.monotonic() >= deadline:
            who = holder[0] if holder else "?"
            raise RegistryLockTimeout(
                f"registry lock {lock_name!r} held by {who} for more than {timeout_s:.0f} s"
            )
        time.sleep(poll_s * (1 + random.random()))
    try:
        yield owner
    finally:
        _delete_if_owner(client, lock_name, owner)


@contextmanager
def registry_lock(
    client: MlflowClient, tracking_uri: str, model_name: str, timeout_s: float
) -> Iterator[None]:
    """The lock that fits the backend of `tracking_uri` (module docstring)."""
    store = local_store_path(tracking_uri)
    if store is not None:
        with file_lock(lock_file_for(store, model_name), timeout_s):
            yield
    else:
        with server_lock(client, model_name, timeout_s):
            yield


def is_lock_model(name: str) -> bool:
    """Whether a registered model is one of our lock entries (hidden from listings)."""
    return name.endswith(LOCK_SUFFIX)
