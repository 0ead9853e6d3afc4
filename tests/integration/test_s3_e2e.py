"""S3 end to end on a real S3-compatible server on loopback (moto in server mode).

Production logs are read from a bucket by the flow (`ingest_source=s3://...`), the ingested
snapshot goes to a DVC remote in a bucket and comes back with `dvc pull` in another copy, and
MLflow writes artifacts to a bucket (`MLFLOW_S3_ENDPOINT_URL`, `artifact_location=s3://...`).
Only the stages that touch S3 run here (the rest of the pipeline is source-agnostic and covered
by test_flow_e2e.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from flow_support import copy_worktree, keep_stages, tiny_repo

from flows.retrain import retrain
from tracetune.config import load_params

CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
LOGS, DVC_STORE, ARTIFACTS = "prod-logs", "dvc-store", "mlflow-artifacts"

# ~100 s on the shared 2-core machine (a Prefect test server of its own, DVC over S3, MLflow);
# the default suite covers ingest from S3 and DVC push/pull in test_s3_dvc.py.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    """moto's S3 on a free loopback port; boto3, s3fs (DVC) and MLflow all pointed at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDS.items():
            mp.setenv(key, value)
        mp.setenv("AWS_ENDPOINT_URL", url)  # boto3 (ingest) and s3fs (DVC deps and remote)
        mp.setenv("MLFLOW_S3_ENDPOINT_URL", url)
        client = boto3.client("s3", endpoint_url=url)
        for bucket in (LOGS, DVC_STORE, ARTIFACTS):
            client.create_bucket(Bucket=bucket)
        try:
            yield url
        finally:
            server.stop()


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # loaded 2 cores: > 90 s seen
        yield


def run(root: Path, *argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", *argv], cwd=root, check=True, capture_output=True, text=True
    )
    return done.stdout


def keys(url: str, bucket: str) -> list[str]:
    listed = boto3.client("s3", endpoint_url=url).list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in listed.get("Contents", [])]


def upload_simulated_logs(root: Path, url: str) -> int:
    """The simulator's logs, moved into the bucket: production writes there, not to our disk."""
    run(root, "tasks.simulate")
    client, lines = boto3.client("s3", endpoint_url=url), 0
    for path in sorted((root / "data/raw_logs").glob("*.jsonl")):
        client.upload_file(str(path), LOGS, f"agent/2026/11/{path.name}")
        lines += sum(1 for line in path.read_text().splitlines() if line.strip())
    shutil.rmtree(root / "data/raw_logs")
    (root / "metrics/simulate.json").unlink()
    return lines


def use_s3_remote(root: Path, url: str) -> None:
    run(root, "dvc", "remote", "add", "-d", "-f", "s3", f"s3://{DVC_STORE}/tracetune")
    run(root, "dvc", "remote", "modify", "s3", "endpointurl", url)


def test_logs_dvc_remote_and_mlflow_artifacts_in_buckets(
    s3_url: str, harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tiny_repo(
        tmp_path / "worker", {"tracking.artifact_location": f"s3://{ARTIFACTS}/tracetune"}
    )
    keep_stages(root, ("simulate", "ingest"))
    lines = upload_simulated_logs(root, s3_url)
    use_s3_remote(root, s3_url)

    state = retrain(repo=str(root), ingest_source=f"s3://{LOGS}/agent/", return_state=True)
    assert state.is_completed(), state.result(raise_on_failure=False)
    status = {s["name"]: s["status"] for s in state.result()["stages"]}
    assert (status["simulate"], status["ingest"]) == ("skipped", "ran")  # no simulator for S3
    ingested = json.loads((root / "metrics/ingest.json").read_text())
    assert json.dumps(ingested).count(str(lines)) >= 1, (lines, ingested)
    assert load_params(root / "params.yaml").ingest.source == f"s3://{LOGS}/agent/"
    assert f"path: s3://{LOGS}/agent/" in (root / "dvc.lock").read_text()  # lineage: the bucket
    assert keys(s3_url, DVC_STORE), "the snapshot was pushed to the S3 remote"

    # Another machine restores the exact snapshot from the bucket.
    other = copy_worktree(tmp_path / "elsewhere")
    for name in ("dvc.lock", "params.yaml", "dvc.yaml", ".dvc/config"):
        shutil.copy2(root / name, other / name)
    run(other, "dvc", "pull", "ingest")
    batches = sorted(p.relative_to(root) for p in (root / "data/ingested").rglob("*.jsonl"))
    assert batches
    for rel in batches:
        assert (other / rel).read_bytes() == (root / rel).read_bytes()

    # MLflow: runs of every stage log their artifacts to the bucket.
    import mlflow

    from tracetune.tracking import stage_run

    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: monkeypatch undoes it afterwards,
    # or later tests' stage subprocesses would log into this test's S3-backed store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    tracking = load_params(root / "params.yaml").tracking
    with stage_run(tracking, "s3-check") as active:
        mlflow.log_text("artifacts live in S3", "probe/hello.txt")
        assert active.info.artifact_uri.startswith(f"s3://{ARTIFACTS}/tracetune/")
    assert any(k.endswith("probe/hello.txt") for k in keys(s3_url, ARTIFACTS))
