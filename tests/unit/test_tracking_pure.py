"""What MLflow shows, without a store: the report relinked to plots beside it, the comparison
of every arm, stage summaries as metrics, Prefect identity from the environment, and the gate's
reasons as a markdown list MLflow renders item by item."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from tracetune.evaluation.report import (
    comparison_markdown,
    comparison_rows,
    headline_metrics,
    relink_images,
    report_html,
)
from tracetune.registry.gate import Check, Verdict
from tracetune.registry.register import CandidatePaths, describe, report_plots
from tracetune.tracking import (
    EXPORTED_BY_ENV,
    PIPELINE_ID_ENV,
    pipeline_id,
    prefect_tags,
    summary_metrics,
    summary_params,
)


def _arm(tsr: float, n: int = 10, steps: float = 2.0, cost: float = 0.001) -> dict[str, Any]:
    return {"tsr": tsr, "tsr_ci_low": tsr - 0.1, "tsr_ci_high": tsr + 0.1, "n": n,
            "steps_mean": steps, "cost_per_task_usd": cost,
            "per_family": {"lookup": {"tsr": tsr, "n": n}}}  # fmt: skip


def _eval(model: str, tsr: float) -> dict[str, Any]:
    return {
        "model": model,
        "candidate": _arm(tsr),
        "baseline_prompt_only": _arm(0.3),
        "baseline_production": _arm(0.7, steps=3.0),
        "baseline_floor": _arm(0.1, steps=1.0, cost=0.0),
        "delta": {"tsr_vs_floor": tsr - 0.1, "tsr_vs_production": tsr - 0.7},
    }


def test_report_images_are_relinked_to_files_beside_it_and_inlined_in_html() -> None:
    text = "# r\n\n![tsr](../../eval_plots/sft/tsr.png)\n\n![x](../other/x.png)\n"
    local = relink_images(text, {"tsr.png"})
    assert "![tsr](tsr.png)" in local
    assert "![x](../other/x.png)" in local  # not logged beside it: left alone
    html = report_html(local, {"tsr.png": b"\x89PNG"})
    assert 'src="data:image/png;base64,iVBORw=="' in html
    # markdown image syntax, not a link: it renders as <img>
    assert '<img src="tsr.png" alt="tsr"' in MarkdownIt("commonmark").render(local)


def test_the_comparison_puts_floor_base_production_sft_and_rlvr_side_by_side() -> None:
    evals = {"rlvr": _eval("rlvr", 0.8), "base": _eval("base", 0.3), "sft": _eval("sft", 0.6)}
    rows = comparison_rows(evals, reference="rlvr")
    assert [r["arm"] for r in rows] == [
        "do-nothing floor",
        "prompt-only (base)",
        "production logs",
        "sft",
        "rlvr",
    ]
    assert rows[2]["tsr"] == 0.7 and rows[2]["steps_per_task"] == 3.0
    assert abs(rows[4]["tsr_over_floor"] - 0.7) < 1e-9
    table = comparison_markdown(rows)
    assert "| production logs | 70.0% [60.0%, 80.0%] | +60.0 pts | 10 | 3.00 | 0.001000 |" in table


def test_headline_metrics_are_few_and_the_same_for_every_arm() -> None:
    payload = _eval("sft", 0.6)
    keys = set(headline_metrics(payload["candidate"], payload["delta"]))
    assert keys == {"tsr", "tsr_ci_low", "tsr_ci_high", "steps_per_task", "cost_per_task",
                    "n_tasks", "tsr_vs_floor", "tsr_vs_production"}  # fmt: skip
    assert set(headline_metrics(payload["baseline_production"])) <= keys


def test_stage_summaries_become_counts_and_words() -> None:
    summary = {"read": 10, "accepted": 8, "ok": True, "batch": "b-1", "rate": 0.2,
               "quarantine_reasons": {"bad json": 2}, "files": ["a"],
               "deep": {"a": {"b": 1}}}  # fmt: skip
    assert summary_metrics(summary) == {
        "read": 10.0,
        "accepted": 8.0,
        "rate": 0.2,
        "quarantine_reasons.bad json": 2.0,
    }
    assert summary_params(summary) == {"ok": "True", "batch": "b-1"}


def test_prefect_identity_reaches_stage_processes_through_the_environment() -> None:
    exported = {
        "TRACETUNE_PREFECT_FLOW_RUN_ID": "f-1",
        "TRACETUNE_PREFECT_FLOW_RUN_NAME": "brave-otter",
        "TRACETUNE_PREFECT_FLOW_NAME": "retrain",
        EXPORTED_BY_ENV: str(os.getpid() + 1),  # another process: the flow's
    }
    assert prefect_tags(exported) == {
        "prefect.flow_run_id": "f-1",
        "prefect.flow_run_name": "brave-otter",
        "prefect.flow_name": "retrain",
    }
    assert pipeline_id(exported) == "f-1"
    # left behind in the flow's own process after the flow ended: not a flow run any more
    assert prefect_tags(exported | {EXPORTED_BY_ENV: str(os.getpid())}) == {}
    # a process a Prefect worker started for a deployment, with an API URL
    worker = {"PREFECT__FLOW_RUN_ID": "f-2", "PREFECT_API_URL": "http://prefect:4200/api"}
    assert prefect_tags(worker) == {
        "prefect.flow_run_id": "f-2",
        "prefect.flow_run_url": "http://prefect:4200/runs/flow-run/f-2",
    }
    assert prefect_tags({}) == {} and pipeline_id({}) is None
    assert pipeline_id({PIPELINE_ID_ENV: "nightly 'x'"}) == "nightly__x_"


def test_gate_reasons_are_a_markdown_list_of_blank_line_separated_items() -> None:
    checks = (
        Check("cost", False, 0.01, 0.005, "cost 0.01 > 0.005"),
        Check("tsr", True, 0.8, 0.5, "tsr 0.8 >= 0.5"),
        Check("steps", True, 2.0, 10.0, "steps 2 <= 10"),
    )
    verdict = Verdict(passed=False, checks=checks)
    reasons = verdict.reasons
    text = describe("sft", {"candidate": _arm(0.8)}, verdict)
    for reason in reasons:
        assert f"\n\n- {reason}\n" in text
    html = MarkdownIt("commonmark").render(text)
    assert html.count("<li>") == 3 and "<p>Gate failed:</p>" in html


def test_register_finds_the_plots_the_evaluate_stage_wrote(tmp_path: Path) -> None:
    plots, report = tmp_path / "eval_plots" / "sft", tmp_path / "eval" / "sft"
    plots.mkdir(parents=True)
    report.mkdir(parents=True)
    for name in ("tsr.png", "cost.png"):
        (plots / name).write_bytes(b"\x89PNG")
    (report / "extra.png").write_bytes(b"\x89PNG")
    paths = CandidatePaths(tmp_path / "eval_sft.json", tmp_path / "m", report, plots)
    assert [p.name for p in report_plots(paths)] == ["cost.png", "tsr.png", "extra.png"]


def test_configuring_a_stage_does_not_export_its_store(tmp_path: Path, monkeypatch: Any) -> None:
    """MLFLOW_TRACKING_URI is the user's override; `mlflow.set_tracking_uri` exports it, and the
    next stage run in (or started from) the same process then wrote into this stage's store."""
    from tracetune.config import TrackingParams
    from tracetune.tracking import configure, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = TrackingParams(
        tracking_uri=f"sqlite:///{tmp_path / 'a.db'}", artifact_location=str(tmp_path / "a")
    )
    configure(first)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = TrackingParams(tracking_uri=f"sqlite:///{tmp_path / 'b.db'}")
    assert tracking_uri(second) == second.tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first.tracking_uri)  # a real override stays
    configure(second)
    assert os.environ["MLFLOW_TRACKING_URI"] == first.tracking_uri
