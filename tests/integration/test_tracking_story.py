"""MLflow tells the story of a pipeline without digging (issue 22, item 4), on a real SQLite
store: one parent run per pipeline execution with a nested run per stage, runs as long as the
work they wrap, and tags that link each run to its Prefect flow run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tracetune.config import TrackingParams
from tracetune.tracking import (
    EXPORTED_BY_ENV,
    PIPELINE_ID_ENV,
    PIPELINE_TAG,
    PREFECT_ENV,
    stage_run,
)

STAGE_IN_A_PROCESS = """
import sys, time
from tracetune.config import TrackingParams
from tracetune.tracking import stage_run
params = TrackingParams(tracking_uri=sys.argv[1], artifact_location=sys.argv[2], experiment="story")
with stage_run(params, sys.argv[3]):
    time.sleep(0.2)
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLFLOW_TRACKING_URI", PIPELINE_ID_ENV, EXPORTED_BY_ENV, *PREFECT_ENV.values()):
        monkeypatch.delenv(var, raising=False)


def _params(root: Path) -> TrackingParams:
    return TrackingParams(
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        artifact_location=str(root / "mlartifacts"),
        experiment="story",
    )


def _runs(params: TrackingParams) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=params.tracking_uri)
    experiment = client.get_experiment_by_name(params.experiment)
    assert experiment is not None
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def _ms(run: Any) -> int:
    return int(run.info.end_time - run.info.start_time)


def test_stages_of_one_pipeline_nest_under_a_parent_that_spans_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _params(tmp_path)
    monkeypatch.setenv(PIPELINE_ID_ENV, "nightly-42")
    started = time.perf_counter()
    with stage_run(params, "ingest"):
        time.sleep(0.3)  # the stage's work
    measured = time.perf_counter() - started
    with pytest.raises(RuntimeError), stage_run(params, "curate"):
        time.sleep(0.1)
        raise RuntimeError("a bug")
    monkeypatch.delenv(PIPELINE_ID_ENV)
    with stage_run(params, "alone"):
        pass

    runs = _runs(params)
    parent = runs["pipeline nightly-42"]
    assert parent.data.tags["tracetune.stage"] == "pipeline"
    assert parent.data.tags[PIPELINE_TAG] == "nightly-42"
    for name in ("ingest", "curate"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "mlflow.parentRunId" not in runs["alone"].data.tags
    assert runs["ingest"].info.status == "FINISHED" and runs["curate"].info.status == "FAILED"
    assert _ms(runs["ingest"]) >= 300 and _ms(runs["curate"]) >= 100
    assert _ms(runs["ingest"]) <= measured * 1000 + 50
    # the parent spans its stages and ends as the last one did
    assert parent.info.start_time <= runs["ingest"].info.start_time
    assert parent.info.end_time >= runs["curate"].info.end_time
    assert parent.info.status == "FAILED"
    assert not any(k.startswith("prefect.") for r in runs.values() for k in r.data.tags)


@pytest.mark.slow  # ~30 s: a fresh Prefect API for the test harness
def test_runs_under_a_prefect_flow_link_to_its_flow_run(tmp_path: Path) -> None:
    from prefect import flow
    from prefect.runtime import flow_run
    from prefect.testing.utilities import prefect_test_harness

    from tracetune.tracking import export_prefect_context

    params = _params(tmp_path)

    @flow(name="story-flow")
    def pipeline() -> dict[str, str]:
        export_prefect_context()
        with stage_run(params, "in_flow"):
            time.sleep(0.1)
        subprocess.run(
            [sys.executable, "-c", STAGE_IN_A_PROCESS, params.tracking_uri,
             params.artifact_location, "in_stage_process"],
            check=True,
            env=dict(os.environ),
        )  # fmt: skip
        return {"id": str(flow_run.id), "name": str(flow_run.name)}

    with prefect_test_harness(server_startup_timeout=300):  # loaded 2 cores: > 90 s seen
        ran = pipeline()
        with stage_run(params, "after_flow"):  # same process, outside the flow: no link
            pass

    runs = _runs(params)
    parent = runs[f"pipeline {ran['name']}"]
    assert parent.data.tags[PIPELINE_TAG] == ran["id"]
    for name in ("in_flow", "in_stage_process"):
        tags = runs[name].data.tags
        assert tags["prefect.flow_run_id"] == ran["id"]
        assert tags["prefect.flow_run_name"] == ran["name"]
        assert tags["prefect.flow_name"] == "story-flow"
        assert tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{ran['id']}")
        assert tags["prefect.flow_run_url"].startswith("http")
        assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert _ms(runs["in_stage_process"]) >= 200
    after = runs["after_flow"].data.tags
    assert "mlflow.parentRunId" not in after
    assert not any(k.startswith("prefect.") for k in after)


DATA_STAGES = {
    "ingest": ("ingest.json", "accepted"),
    "validate_raw": ("validate_raw.json", "rows"),
    "curate": ("curate.json", "kept"),
    "split": ("data_summary.json", "split.train"),
    "validate_curated": ("validate_curated.json", "rows"),
}


@pytest.mark.slow  # ~45 s on a loaded 2-core machine: five stages and their gates
def test_every_data_stage_has_a_run_with_its_counts_and_summary(
    tmp_path: Path, sim_lines: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data stages' entry points, as `dvc repro` runs them, on simulated production logs."""
    import importlib

    import yaml
    from params_support import paths_under, tracking_under

    src = tmp_path / "logs"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(sim_lines) + "\n")
    params_file = tmp_path / "params.yaml"
    tracking = tracking_under(tmp_path, experiment="story")
    settings = {
        "paths": paths_under(tmp_path),
        "tracking": tracking,
        "ingest": {"source": str(src)},
        "gates": {"curated": {"min_rows": 100}},  # 400 simulated lines keep ~220
    }
    params_file.write_text(yaml.safe_dump(settings))
    monkeypatch.setenv(PIPELINE_ID_ENV, "data-1")
    for stage in DATA_STAGES:
        importlib.import_module(f"tasks.{stage}").main([str(params_file)])

    runs = _runs(TrackingParams(**tracking))
    parent = runs["pipeline data-1"].info.run_id
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    for stage, (artifact, count) in DATA_STAGES.items():
        run = runs[stage]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.metrics[count] > 0, stage
        assert artifact in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert runs["validate_raw"].data.params["status"] == "passed"
    ingest = runs["ingest"].data.metrics
    assert ingest["read"] == ingest["accepted"] + ingest["quarantined"]
