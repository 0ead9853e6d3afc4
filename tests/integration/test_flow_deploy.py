"""`prefect deploy` of prefect.yaml against a real Prefect server on loopback, read back.

The pools are created as Kubernetes pools with our job templates (infra/k8s), so the server
validates every deployment's job variables (image, gpu_count, requests) against them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from flow_support import copy_worktree

from tracetune.config import load_params

IMAGES = {
    "TRACETUNE_IMAGE": "registry.test/tracetune:1",
    "TRACETUNE_GPU_IMAGE": "registry.test/tt-gpu:1",
}
LOGS = "s3://prod-logs/agent/"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")


@pytest.fixture(scope="module")
def server_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Prefect server on a free loopback port with its own PREFECT_HOME (SQLite)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") and k != "PYTHONDONTWRITEBYTECODE"
    } | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    log = (home / "server.log").open("wb")
    argv = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(api, proc)
        yield env | {"PREFECT_API_URL": api}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_prefect_yaml_deploys_with_cron_pools_and_job_variables(
    server_env: dict[str, str], tmp_path: Path
) -> None:
    repo = copy_worktree(tmp_path / "repo")
    env = server_env | IMAGES | {"TRACETUNE_LOGS_URI": LOGS}
    done = subprocess.run(
        [sys.executable, "-m", "flows.deploy", "--pool-type", "kubernetes", "--json"],
        cwd=repo,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    got = {d["name"]: d for d in json.loads(done.stdout)}
    assert set(got) == {"retrain/nightly", "train-stage/gpu-train", "approval/approval"}

    nightly = got["retrain/nightly"]
    assert (nightly["pool"], nightly["pool_type"]) == ("cpu", "kubernetes")
    assert nightly["crons"] == ["0 3 * * *"] and nightly["active"] == [True]
    assert nightly["parameters"]["ingest_source"] == LOGS  # logs from S3, not the simulator
    assert nightly["parameters"]["dispatch_training"] is True
    assert nightly["parameters"]["approval"] == "deployment"
    assert nightly["job_variables"]["image"] == IMAGES["TRACETUNE_IMAGE"]

    gpu = got["train-stage/gpu-train"]
    assert gpu["pool"] == "gpu" and gpu["crons"] == []
    assert gpu["job_variables"]["image"] == IMAGES["TRACETUNE_GPU_IMAGE"]
    assert gpu["job_variables"]["gpu_count"] == 1
    assert got["approval/approval"]["pool"] == "cpu"

    # The flow finds its helpers by the names params.yaml gives them.
    orchestrate = load_params(repo / "params.yaml").orchestrate
    assert {orchestrate.gpu_deployment, orchestrate.approval_deployment} <= set(got)
