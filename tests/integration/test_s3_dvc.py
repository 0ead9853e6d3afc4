"""Real S3 on loopback (moto's server): ingest from a bucket, and DVC push / pull via an S3 remote.

Nothing of our stack is mocked: boto3 talks HTTP to a local S3-compatible server, DVC runs as a
subprocess in a real `git init` + `dvc init` repository.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tracetune.config import IngestParams
from tracetune.trajectories.ingest import IngestPaths, ingest
from tracetune.trajectories.io import read_trajectories
from tracetune.trajectories.sources import S3Source

CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def put(client, bucket: str, key: str, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
    body = ("\n".join(lines) + "\n").encode()
    client.put_object(
        Bucket=bucket, Key=key, Body=gzip.compress(body) if key.endswith(".gz") else body
    )


def test_ingest_from_a_bucket_incrementally(
    s3_url: str, sim_lines: list[str], tmp_path: Path
) -> None:
    client = boto3.client("s3", endpoint_url=s3_url)
    client.create_bucket(Bucket="prod-logs")
    chunks = [sim_lines[i : i + 60] for i in range(0, 300, 60)]
    for k, chunk in enumerate(chunks[:4]):
        put(client, "prod-logs", f"agent/2026/11/{k:02d}.jsonl" + (".gz" if k % 2 else ""), chunk)
    put(client, "prod-logs", "agent/README.txt", ["not a log"])
    put(client, "prod-logs", "other/00.jsonl", chunks[4])

    paths = IngestPaths(
        tmp_path / "b", tmp_path / "q", tmp_path / "i.sqlite", tmp_path / "s.json", tmp_path / "r"
    )
    params = IngestParams(source="s3://prod-logs/agent/", s3_endpoint_url=s3_url)
    source = S3Source(params.source, s3_url, page_size=2)  # forces pagination
    assert len(list(source.objects())) == 4

    first = ingest(params, paths, source)
    assert first.read == 240 == first.accepted + first.quarantined
    assert first.files["new"] == 4

    again = ingest(params, paths)  # built from params: endpoint from ingest.s3_endpoint_url
    assert again.batch is None and again.read == 0 and again.files["unchanged"] == 4

    put(client, "prod-logs", "agent/2026/11/04.jsonl", chunks[4])
    third = ingest(params, paths, source)
    assert (third.batch, third.read, third.files["new"]) == (2, 60, 1)
    ids = [t.trajectory_id for t in read_trajectories(paths.batches)]
    assert len(ids) == len(set(ids)) == first.accepted + third.accepted


def dvc(repo: Path, *args: str) -> str:
    env = os.environ | CREDS | {"DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_dvc_push_then_pull_restores_the_data(s3_url: str, tmp_path: Path) -> None:
    boto3.client("s3", endpoint_url=s3_url).create_bucket(Bucket="dvc-store")
    repo = tmp_path / "repo"
    (repo / "data/curated").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    # What `dvc remote add -d s3 s3://...` + `dvc remote modify s3 endpointurl ...` write
    # (written directly: each dvc call costs seconds of start-up).
    (repo / ".dvc/config").write_text(
        "[core]\n    analytics = false\n    remote = s3\n"
        f"['remote \"s3\"']\n    url = s3://dvc-store/tracetune\n    endpointurl = {s3_url}\n"
    )
    files = {
        "train.jsonl": "".join(json.dumps({"i": i}) + "\n" for i in range(100)),
        "heldout_tasks.json": json.dumps({"tasks": ["a", "b"]}),
    }
    for name, text in files.items():
        (repo / "data/curated" / name).write_text(text)
    dvc(repo, "add", "data/curated")
    dvc(repo, "push")

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data/curated")
    dvc(repo, "pull")
    for name, text in files.items():
        assert (repo / "data/curated" / name).read_text() == text
    keys = boto3.client("s3", endpoint_url=s3_url).list_objects_v2(Bucket="dvc-store")
    assert keys["KeyCount"] >= 3  # the directory manifest and both files


@pytest.mark.slow
def test_data_stages_under_dvc_repro_twice(tmp_path: Path) -> None:
    """The real dvc.yaml on a small simulated batch: repro runs every data stage, then nothing."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("tasks", "tracetune"):
        shutil.copytree(root / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["simulate"]["n_trajectories"] = 600
    params["gates"]["curated"]["min_rows"] = 100
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    env_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["PATH"], old_path = env_path, os.environ.get("PATH", "")
    try:
        first = dvc(repo, "repro", "validate_curated")
        for stage in ("ingest", "validate_raw", "curate", "split", "validate_curated"):
            assert f"Running stage '{stage}'" in first
        second = dvc(repo, "repro", "validate_curated")
        assert "Running stage" not in second
        metrics = json.loads(dvc(repo, "metrics", "show", "--json"))
    finally:
        os.environ["PATH"] = old_path
    shown = json.dumps(metrics)  # the data's headline row; the full summary is a plain out
    assert "metrics/data.json" in shown and "metrics/data_summary.json" not in shown
    assert (repo / "data/curated/heldout_tasks.json").exists()
