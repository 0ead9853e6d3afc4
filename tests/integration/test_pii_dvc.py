"""Raw logs never reach the DVC cache or remote; the demo's key stays out of git and DVC.

A fresh `git init`-ed copy of the working tree runs `simulate` and `ingest` through `dvc repro`
and pushes to its local remote, as the flow does. The simulated "production" logs hold the
customers' emails and names; the cache and the remote must hold only scrubbed batches.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from flow_support import keep_stages, tiny_repo

from flows.stages import dvc_argv, stage_env
from tracetune.environments.support_desk import SupportDesk
from tracetune.trajectories.pii import find_pii


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
