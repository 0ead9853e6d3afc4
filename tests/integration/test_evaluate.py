"""The evaluate stage end to end: a real tiny model, a real held-out split, real production logs
(the simulator's), a real MLflow SQLite store; nothing of our stack is mocked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from params_support import paths_under, tracking_under
from rollout_support import tiny_model_dir

from tasks import evaluate as stage
from tracetune.config import Params, SimulateParams, parse_params
from tracetune.environments.support_desk import SupportDesk
from tracetune.trajectories.simulator import iter_log_lines
from tracetune.trajectories.split import split_curated

M_KEYS = {"tsr", "tsr_ci_low", "tsr_ci_high", "n", "steps_mean", "steps_median", "tokens_in",
          "tokens_out", "cost_per_task_usd", "latency_s", "per_family", "failures"}  # fmt: skip
DELTA_KEYS = {"tsr_vs_prompt_only", "tsr_vs_production", "steps_vs_production",
              "cost_vs_production", "tsr_vs_floor", "prompt_only_tsr_vs_floor",
              "production_tsr_vs_floor"}  # fmt: skip
ROLLOUT_KEYS = M_KEYS | {"cut_by_turn_limit"}  # arms the evaluation ran, not read from logs


def _params(root: Path, model: Path) -> Params:
    shutil.copytree(model, root / "models" / "sft")
    return parse_params(
        {
            "paths": paths_under(root),
            "tracking": tracking_under(root, experiment="eval-test"),
            "base_model": {"name_or_path": str(model)},
            "evaluate": {"max_tasks": 6, "batch_size": 4, "max_new_tokens": 12, "max_turns": 2},
            "split": {"heldout_fraction": 0.3, "seed": 1},
        }
    )


def _write_logs_and_split(params: Params) -> list[dict[str, Any]]:
    """Production logs as ingest writes them, and a held-out split of their golden part (the
    evaluation set: every held-out task of the logs, as the split stage writes it)."""
    sim = SimulateParams(n_trajectories=120, seed=5, files=1)
    records = [rec for _, rec, _ in iter_log_lines(SupportDesk(max_steps=60), sim) if rec]
    params.paths.ingested.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    (params.paths.ingested / "batch-000001.jsonl").write_text("\n".join(lines) + "\n")
    golden = [json.dumps(r) for r in records if r["success"]]
    logged = [(r["task_id"], r["family"]) for r in records]
    split_curated(golden, params.paths.curated_dir, params.split, logged=logged)
    return records


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("evaluate")
    params = _params(root, tiny_model_dir(tmp_path_factory))
    logs = _write_logs_and_split(params)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        base = stage.run(params, "base", progress=False)
        cache = (root / "reports/eval/base/cache.json").read_text()
        sft = stage.run(params, "sft", progress=False)
    return {
        "root": root,
        "params": params,
        "base": base,
        "sft": sft,
        "cache_before": cache,
        "logs": logs,
    }


def test_metrics_file_has_the_agreed_shape(evaluated: dict[str, Any]) -> None:
    root = evaluated["root"]
    for model in ("base", "sft"):
        payload = json.loads((root / "metrics" / f"eval_{model}.json").read_text())
        assert set(payload) == {"model", "model_path", "n_tasks", "candidate",
                                "baseline_prompt_only", "baseline_production", "baseline_floor",
                                "delta"}  # fmt: skip
        assert payload["model"] == model and payload["n_tasks"] == 6
        assert set(payload["candidate"]) == ROLLOUT_KEYS
        assert set(payload["baseline_prompt_only"]) == ROLLOUT_KEYS
        assert set(payload["baseline_floor"]) == ROLLOUT_KEYS
        assert set(payload["baseline_production"]) <= M_KEYS
        assert set(payload["delta"]) == DELTA_KEYS
        cand = payload["candidate"]
        assert cand["n"] == 6 and 0.0 <= cand["tsr_ci_low"] <= cand["tsr"] <= cand["tsr_ci_high"]
        assert sum(v["n"] for v in cand["per_family"].values()) == 6
        assert sum(cand["failures"].values()) == round(6 * (1 - cand["tsr"]))
    assert evaluated["base"]["model_path"].endswith("tiny_agent_model")


def test_every_arm_is_measured_on_the_evaluated_tasks(evaluated: dict[str, Any]) -> None:
    """Production counts every logged episode of the evaluated tasks (failed ones too) and no
    other: before, it counted every held-out episode of the logs (230 against 15 tasks)."""
    root = evaluated["root"]
    rollouts = [json.loads(x) for x in (root / "reports/eval/sft/rollouts.jsonl").open()]
    evaluated_ids = {r["task_id"] for r in rollouts}
    assert len(evaluated_ids) == 6
    logged = [r for r in evaluated["logs"] if r["task_id"] in evaluated_ids]
    production = evaluated["sft"]["baseline_production"]
    assert production["n"] == len(logged) > 0
    assert production["tsr"] == round(sum(r["success"] for r in logged) / len(logged), 6)
    for arm in ("candidate", "baseline_prompt_only", "baseline_floor"):
        assert evaluated["sft"][arm]["n"] == 6


def test_the_do_nothing_floor_is_measured_beside_every_arm(evaluated: dict[str, Any]) -> None:
    sft = evaluated["sft"]
    floor = sft["baseline_floor"]
    # support_desk gives nothing away: a declining answer with no tool call solves no task.
    assert floor["tsr"] == 0.0 and floor["steps_mean"] == 1.0 and floor["cost_per_task_usd"] == 0
    assert floor["cut_by_turn_limit"] == 0
    assert sft["delta"]["tsr_vs_floor"] == sft["candidate"]["tsr"]
    report = (evaluated["root"] / "reports/eval/sft/report.md").read_text()
    assert "| do-nothing floor |" in report and "TSR over the floor" in report
    assert "do-nothing floor" in report.split("## TSR per task family")[1]


def test_outputs_are_written(evaluated: dict[str, Any]) -> None:
    root = evaluated["root"]
    out = root / "reports/eval/sft"
    report = (out / "report.md").read_text()
    assert "# Evaluation: `sft`" in report and "prompt-only" in report
    rollouts = (out / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 6 and json.loads(rollouts[0])["model"] == "sft"
    for name in ("tsr.png", "steps.png", "cost.png"):
        assert (root / "reports/eval_plots/sft" / name).read_bytes()[:4] == b"\x89PNG"


def test_prompt_only_baseline_is_reused_from_the_base_cache(evaluated: dict[str, Any]) -> None:
    root = evaluated["root"]
    assert (root / "reports/eval/base/cache.json").read_text() == evaluated["cache_before"]
    base_block = evaluated["base"]["candidate"]
    assert evaluated["sft"]["baseline_prompt_only"] == base_block
    # Same weights under greedy decoding: the candidate does exactly what the base did.
    same = ("tsr", "steps_mean", "tokens_in", "tokens_out", "failures", "per_family")
    assert {k: evaluated["sft"]["candidate"][k] for k in same} == {k: base_block[k] for k in same}
    assert evaluated["sft"]["delta"]["tsr_vs_prompt_only"] == 0.0


def test_mlflow_run_holds_metrics_and_artifacts(evaluated: dict[str, Any]) -> None:
    import re

    from mlflow.tracking import MlflowClient

    params: Params = evaluated["params"]
    client = MlflowClient(tracking_uri=params.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("eval-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "tags.`tracetune.stage` = 'evaluate_sft'")
    assert len(runs) == 1
    run = runs[0]
    # a few headline metrics, the same keys for every run; the detail is in the artifacts
    metrics = run.data.metrics
    assert metrics["n_tasks"] == 6.0 and metrics["tsr"] == evaluated["sft"]["candidate"]["tsr"]
    assert {"tsr_ci_low", "tsr_ci_high", "steps_per_task", "cost_per_task"} <= set(metrics)
    assert {"tsr_vs_floor", "tsr_vs_production", "rollout_seconds"} <= set(metrics)
    assert not any(k.startswith(("baseline_", "candidate.", "delta.")) for k in metrics)
    assert len(metrics) < 20
    # the run spans the rollouts, not just the logging
    assert run.info.end_time - run.info.start_time >= 1000 * metrics["rollout_seconds"]

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "eval_sft.json",
        "rollouts.jsonl",
        "report",
        "comparison.md",
        "comparison.html",
    } <= names
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/tsr.png"} <= report
    local = Path(client.download_artifacts(run.info.run_id, "report"))
    text = (local / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((local / link).read_bytes()[:4] == b"\x89PNG" for link in links)
    assert "data:image/png;base64," in (local / "report.html").read_text()

    comparison = Path(client.download_artifacts(run.info.run_id, "comparison.md")).read_text()
    for arm in ("do-nothing floor", "prompt-only (base)", "production logs", "| sft |"):
        assert arm in comparison

    # production and the floor are runs of their own, with the same metric keys as the models
    baselines = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
    )
    by_name = {r.info.run_name: r for r in baselines}
    assert {"baseline_production", "baseline_floor"} <= set(by_name)
    production = evaluated["sft"]["baseline_production"]
    assert by_name["baseline_production"].data.metrics["tsr"] == production["tsr"]
    assert "steps_per_task" in by_name["baseline_floor"].data.metrics
