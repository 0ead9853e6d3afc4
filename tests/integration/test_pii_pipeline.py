"""Raw logs never reach the DVC cache or remote; the key: secret in production, the demo's own.

A fresh `git init`-ed copy of the working tree runs `simulate` and `ingest` through `dvc repro`
and pushes to its local remote, as the flow does. The simulated "production" logs hold the
customers' emails and names; the cache and the remote must hold only scrubbed batches.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from flow_support import keep_stages, tiny_repo

from flows.stages import dvc_argv, stage_env
from tracetune.environments.support_desk import SupportDesk
from tracetune.trajectories.pii import PiiKeyMissing, find_pii, resolve_key


def run(root: Path, *args: str) -> str:
    env = stage_env()
    env.pop("TRACETUNE_PII_KEY", None)  # the embedded demo: its own per-workspace key
    done = subprocess.run(
        dvc_argv(*args), cwd=root, env=env, check=True, capture_output=True, text=True
    )
    return done.stdout


def test_simulated_logs_stay_out_of_the_dvc_cache_and_remote(tmp_path: Path) -> None:
    root = tiny_repo(tmp_path / "repo", {"simulate.n_trajectories": 120, "simulate.files": 1})
    keep_stages(root, ("simulate", "ingest"))
    run(root, "repro", "ingest")
    run(root, "push")

    raw = "".join(p.read_text() for p in (root / "data/raw_logs").glob("*.jsonl"))
    env = SupportDesk()
    env.reset(env.tasks(1, seed=0)[0])
    names = {n for (n,) in env.db.execute("SELECT name FROM customers") if n in raw}
    assert names and find_pii(raw)  # the raw logs do hold PII: this test can fail

    stored = [
        p
        for folder in (root / ".dvc/cache", root / ".dvc-remote")
        for p in folder.rglob("*")
        if p.is_file()
    ]
    assert any("batch-000001" in p.read_text(errors="replace") for p in stored if "dir" in p.name)
    for path in stored:
        text = path.read_bytes().decode("utf-8", errors="replace")
        assert not find_pii(text), f"{path}: {find_pii(text)[:3]}"
        assert not [n for n in names if n in text], path

    key = root / ".tracetune/pii.key"
    assert key.exists() and oct(key.stat().st_mode & 0o777) == "0o600"
    secret = key.read_text().strip()
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored=no", "--untracked-files=all"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert ".tracetune" not in status
    assert not any(secret in p.read_bytes().decode(errors="replace") for p in stored)
    data = [p for p in (root / "data").rglob("*") if p.is_file()]
    assert not any(secret in p.read_bytes().decode(errors="replace") for p in data)
    assert "demo workspace key" in (root / "metrics/ingest.json").read_text()
    assert os.environ.get("TRACETUNE_PII_KEY")  # the test process keeps its own


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # loaded 2 cores: > 90 s seen
        yield


@pytest.mark.slow  # ~70 s: a fresh Prefect API for the Secret block and the flow
def test_a_production_run_needs_a_secret_key_from_env_or_a_prefect_block(
    harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.blocks.system import Secret

    from flows.retrain import retrain, share_pii_key
    from tracetune.config import PiiParams, load_params, parse_params

    monkeypatch.delenv("TRACETUNE_PII_KEY")
    root = tiny_repo(tmp_path / "repo")
    prod = tmp_path / "agent-logs"
    prod.mkdir()
    # No key: the flow refuses before any stage runs (nothing simulated, read or written).
    state = retrain(repo=str(root), ingest_source=str(prod), return_state=True)
    assert state.is_failed()
    assert "no PII pseudonym key" in str(state.result(raise_on_failure=False))
    assert not (root / "data").exists() and not (root / "metrics").exists()

    # A Prefect Secret block holds it: read, and handed to the stage processes.
    Secret(value="a-secret-from-a-prefect-block").save("tt-pii-key", overwrite=True)
    key = resolve_key(PiiParams(key_block="tt-pii-key"), demo=False)
    assert key.value == b"a-secret-from-a-prefect-block"
    assert key.origin == "Prefect Secret tt-pii-key"
    with pytest.raises(PiiKeyMissing, match="cannot be read"):
        resolve_key(PiiParams(key_block="no-such-block"), demo=False)
    params = parse_params({"ingest": {"source": str(prod), "pii": {"key_block": "tt-pii-key"}}})
    share_pii_key(params, root)
    assert os.environ["TRACETUNE_PII_KEY"] == "a-secret-from-a-prefect-block"
    assert load_params(root / "params.yaml").ingest.source == str(prod)
