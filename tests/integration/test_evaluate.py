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
              "cost_vs_production"}  # fmt: skip


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


def _write_logs_and_split(params: Params) -> None:
    """Production logs as ingest writes them, and a held-out split of their golden part."""
    sim = SimulateParams(n_trajectories=120, seed=5, files=1)
    records = [rec for _, rec, _ in iter_log_lines(SupportDesk(max_steps=60), sim) if rec]
    params.paths.ingested.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    (params.paths.ingested / "batch-000001.jsonl").write_text("\n".join(lines) + "\n")
    golden = [json.dumps(r) for r in records if r["success"]]
    split_curated(golden, params.paths.curated_dir, params.split)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("evaluate")
    params = _params(root, tiny_model_dir(tmp_path_factory))
    _write_logs_and_split(params)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        base = stage.run(params, "base", progress=False)
        cache = (root / "reports/eval/base/cache.json").read_text()
        sft = stage.run(params, "sft", progress=False)
    return {"root": root, "params": params, "base": base, "sft": sft, "cache_before": cache}


def test_metrics_file_has_the_agreed_shape(evaluated: dict[str, Any]) -> None:
    root = evaluated["root"]
    for model in ("base", "sft"):
        payload = json.loads((root / "metrics" / f"eval_{model}.json").read_text())
        assert set(payload) == {"model", "model_path", "n_tasks", "candidate",
                                "baseline_prompt_only", "baseline_production", "delta"}  # fmt: skip
        assert payload["model"] == model and payload["n_tasks"] == 6
        assert set(payload["candidate"]) == M_KEYS
        assert set(payload["baseline_prompt_only"]) == M_KEYS
        assert set(payload["baseline_production"]) <= M_KEYS
        assert set(payload["delta"]) == DELTA_KEYS
        cand = payload["candidate"]
        assert cand["n"] == 6 and 0.0 <= cand["tsr_ci_low"] <= cand["tsr"] <= cand["tsr_ci_high"]
        assert sum(v["n"] for v in cand["per_family"].values()) == 6
        assert sum(cand["failures"].values()) == round(6 * (1 - cand["tsr"]))
        production = payload["baseline_production"]
        # Every logged episode of a held-out task, the failed ones too (curation kept only the
        # golden ones, so a baseline from heldout_tasks.json ids alone would score 100%).
        assert production["n"] > 0 and production["tsr"] < 1.0
    assert evaluated["base"]["model_path"].endswith("tiny_agent_model")


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
    from mlflow.tracking import MlflowClient

    params: Params = evaluated["params"]
    client = MlflowClient(tracking_uri=params.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("eval-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "tags.`tracetune.stage` = 'evaluate_sft'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["candidate.n"] == 6.0
    assert "delta.tsr_vs_production" in run.data.metrics
    assert "baseline_production.tsr" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval_sft.json", "report.md", "rollouts.jsonl", "plots"} <= names
