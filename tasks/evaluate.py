"""Stage `evaluate@<model>`: a model on the held-out tasks against the floor and two baselines.

`python -m tasks.evaluate MODEL [PARAMS_FILE]` (MODEL: `base`, `sft`, `rlvr`, ...). Outputs
(dvc.yaml): `metrics/eval_<model>.json` (the shape the registry gate reads), the report, the
rollouts and the cache record in `reports/eval/<model>/`, PNG plots in
`reports/eval_plots/<model>/`, and an MLflow run `evaluate_<model>` (docs/evaluation.md): the
headline metrics (`tsr`, `tsr_ci_low`, `steps_per_task`, `cost_per_task`, ...), the report with
its plots beside it, the comparison of every evaluated model with both baselines and the floor,
and a run per baseline arm with the same metric keys.

Evaluating `base` *is* the prompt-only baseline; its rollouts stay in `reports/eval/base/` and
any later evaluation reuses them while their cache key still matches (tracetune.evaluation.
harness), else it re-runs the base model and refreshes that cache. The do-nothing floor is a
scripted arm (no model), run on the same tasks every time: it costs a verifier call per task.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from tasks._common import stage_params, write_json
from tracetune.config import Params


def eval_paths(params: Params, model: str) -> dict[str, Path]:
    reports = params.paths.reports
    return {
        "out": reports / "eval" / model,
        "plots": reports / "eval_plots" / model,
        "metrics": params.paths.metrics / f"eval_{model}.json",
        "baseline": reports / "eval" / "base",
    }


def _settings(
    params: Params, model: str, path: str, heldout_total: int, max_turns: int
) -> dict[str, Any]:
    ev = params.evaluate
    return {
        "model": model,
        "model_path": path,
        "heldout_tasks_before_cap": heldout_total,
        "max_tasks": ev.max_tasks,
        "batch_size": ev.batch_size,
        "max_new_tokens": ev.max_new_tokens,
        "max_turns": max_turns,
        "max_turns_from": "evaluate.max_turns" if ev.max_turns is not None else "environment",
        "environment_max_steps": params.environment.max_steps,
        "decoding": "greedy" if ev.greedy else f"sampled, T={ev.temperature}, seed={ev.seed}",
        "decoder": ev.decoder,
        "grounded_arguments": params.environment.grounded_arguments,
        "pricing": ev.pricing[model].model_dump() if model in ev.pricing else None,
        "environment": params.environment.class_path,
    }


def run(params: Params, model: str, progress: bool = True) -> dict[str, Any]:
    """Evaluate `model`; returns (and writes) the metrics payload.

    The MLflow run `evaluate_<model>` spans the rollouts, so its duration is the evaluation's.
    """
    from tracetune.evaluation import harness
    from tracetune.tracking import stage_run

    harness.pricing_for(params.evaluate, model)  # fail before any rollout when prices are missing
    path = harness.model_path(params, model)
    tags = {"tracetune.model": model, "model_path": path}
    with stage_run(params.tracking, f"evaluate_{model}", tags):
        return _evaluate(params, model, path, progress)


def _evaluate(params: Params, model: str, path: str, progress: bool) -> dict[str, Any]:
    import mlflow

    from tracetune.agent.rollout import EnvPool
    from tracetune.environments.pseudonymised import model_env_factory
    from tracetune.evaluation import harness
    from tracetune.evaluation.metrics import deltas, summarize
    from tracetune.evaluation.plots import write_plots
    from tracetune.evaluation.report import headline_metrics, render_report
    from tracetune.tracking import log_report
    from tracetune.trajectories.tool_errors import build_rule

    ev = params.evaluate
    paths = eval_paths(params, model)
    envs = EnvPool(model_env_factory(params))  # the world as training data showed it
    probe = envs.acquire()
    heldout = harness.select_heldout(probe, params)
    max_turns = harness.turn_limit(ev, probe)
    ends = frozenset(probe.terminating_tools())
    envs.release(probe)
    if not heldout.tasks:
        raise RuntimeError(f"no held-out tasks to evaluate in {params.paths.curated_dir}")

    started = time.perf_counter()
    counts: dict[str, int] = {}
    candidate = harness.run_model(
        model, path, heldout.tasks, params, envs, progress, counts, max_turns
    )
    seconds = time.perf_counter() - started
    key = harness.cache_key(path, heldout.tasks, params, max_turns)
    mlflow.set_tag("eval_cache_key", key)
    harness.write_rollouts(paths["out"], candidate, key, {"model": model, "model_path": path})

    if model == harness.PROMPT_ONLY:
        prompt_only = candidate
    else:
        prompt_only = _prompt_only(
            params, heldout.tasks, envs, paths["baseline"], progress, max_turns
        )
    floor = harness.run_floor(heldout.tasks, params, envs, max_turns)
    production = harness.production_baseline(params.paths.ingested, heldout.log_ids)

    base_pricing = harness.pricing_for(ev, harness.PROMPT_ONLY)
    probe = envs.acquire()
    rule = build_rule(params.tool_errors, probe)
    envs.release(probe)
    arms = {
        "candidate": summarize(
            candidate,
            harness.pricing_for(ev, model),
            max_turns=max_turns,
            terminating=ends,
            rule=rule,
        ),
        "baseline_prompt_only": summarize(
            prompt_only, base_pricing, max_turns=max_turns, terminating=ends, rule=rule
        ),
        "baseline_production": summarize(production, rule=rule),
        "baseline_floor": summarize(
            floor, harness.FREE, max_turns=max_turns, terminating=ends, rule=rule
        ),
    }
    payload: dict[str, Any] = {
        "model": model,
        "model_path": path,
        "n_tasks": len(heldout.tasks),
        **arms,
        "delta": deltas(*arms.values()),
    }
    settings = _settings(params, model, path, heldout.total, max_turns)
    settings["grounded_tokens"] = counts.get("constrained", 0)
    settings["grounding_overrode_model"] = counts.get("overridden", 0)
    plot_files = write_plots(payload, paths["plots"])
    report = paths["out"] / "report.md"
    rel = [Path("..", "..", "eval_plots", model, p.name).as_posix() for p in plot_files]
    markdown = render_report(payload, settings, rel)
    report.write_text(markdown)
    write_json(paths["metrics"], payload)

    mlflow.log_params({k: str(v) for k, v in settings.items()})
    mlflow.log_metrics(headline_metrics(payload["candidate"], payload["delta"]))
    mlflow.log_metric("rollout_seconds", seconds)
    mlflow.log_metrics({f"grounding_{k}_tokens": v for k, v in counts.items()})
    mlflow.log_artifact(str(paths["metrics"]))
    mlflow.log_artifact(str(paths["out"] / harness.ROLLOUTS_FILE))
    log_report(markdown, plot_files, "report")
    log_comparison(params, model, payload)
    return payload


BASELINE_RUNS = {
    "baseline_floor": "baseline_floor",
    "baseline_production": "baseline_production",
    "baseline_prompt_only": "baseline_prompt_only",
}


def log_comparison(params: Params, model: str, payload: dict[str, Any]) -> None:
    """The side-by-side view: the comparison table (this run and the pipeline's parent), and
    the baselines as runs of their own with the same metric keys as the candidates, so the
    runs table lists production and the floor beside base, sft and rlvr."""
    import mlflow

    from tracetune.evaluation.report import (
        comparison_markdown,
        comparison_rows,
        read_evals,
        report_html,
    )
    from tracetune.tracking import parent_run_id

    evals = read_evals(params.paths.metrics) | {model: payload}
    rows = comparison_rows(evals, reference=model)
    text = comparison_markdown(rows)
    files = {
        "comparison.md": text,
        "comparison.html": report_html(text, {}, "comparison"),
    }
    active = mlflow.active_run()
    assert active is not None  # called inside the evaluate run
    run = mlflow.get_run(active.info.run_id)
    parent = parent_run_id(run)
    client = mlflow.MlflowClient()
    for name, content in files.items():
        mlflow.log_text(content, name)
        if parent:
            client.log_text(parent, content, name)
    mlflow.log_dict({"rows": rows}, "comparison.json")
    if parent:
        client.log_dict(parent, {"rows": rows}, "comparison.json")
    _log_baseline_runs(client, run, parent, model, payload)


def _log_baseline_runs(
    client: Any, run: Any, parent: str | None, model: str, payload: dict[str, Any]
) -> None:
    """One run per baseline arm: under the pipeline's parent once per pipeline (the prompt-only
    one only when `evaluate_base` is not there), else under this evaluate run."""
    from mlflow.entities import Metric

    from tracetune.evaluation.report import headline_metrics

    owner = parent or run.info.run_id
    siblings = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{owner}'",
        max_results=1000,
    )
    present = {r.data.tags.get("tracetune.stage") for r in siblings}
    inherited = {
        k: v for k, v in run.data.tags.items() if k.startswith(("prefect.", "tracetune.pipeline"))
    }
    now = int(time.time() * 1000)
    for arm, name in BASELINE_RUNS.items():
        block = payload.get(arm)
        skip = name in present or (
            arm == "baseline_prompt_only" and (model == "base" or "evaluate_base" in present)
        )
        if not isinstance(block, dict) or skip:
            continue
        child = client.create_run(
            run.info.experiment_id,
            run_name=name,
            tags={
                "mlflow.parentRunId": owner,
                "tracetune.stage": name,
                "tracetune.measured_by": f"evaluate_{model}",
                **inherited,
            },
        )
        metrics = [Metric(k, v, now, 0) for k, v in headline_metrics(block).items()]
        client.log_batch(child.info.run_id, metrics=metrics)
        client.set_terminated(child.info.run_id, "FINISHED")


def _prompt_only(
    params: Params,
    tasks: list[Any],
    envs: Any,
    baseline_dir: Path,
    progress: bool,
    max_turns: int,
) -> list[Any]:
    """The base model's rollouts: the cached ones when their key matches, else a fresh run."""
    from tracetune.evaluation import harness

    path = harness.model_path(params, harness.PROMPT_ONLY)
    key = harness.cache_key(path, tasks, params, max_turns)
    cached = harness.load_cached_rollouts(baseline_dir, key)
    if cached is not None:
        return cached
    fresh = harness.run_model(
        harness.PROMPT_ONLY, path, tasks, params, envs, progress, max_turns=max_turns
    )
    meta = {"model": harness.PROMPT_ONLY, "model_path": path}
    harness.write_rollouts(baseline_dir, fresh, key, meta)
    return fresh


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m tasks.evaluate MODEL [PARAMS_FILE]", file=sys.stderr)
        raise SystemExit(2)
    model, rest = args[0], args[1:]
    params = stage_params(rest)
    payload = run(params, model)
    report = eval_paths(params, model)["out"] / "report.md"
    print("\n".join(evaluation_lines(model, payload, report)))


BASELINES = (
    ("baseline_production", "production"),
    ("baseline_prompt_only", "prompt-only"),
    ("baseline_floor", "floor"),
)


def evaluation_lines(model: str, payload: dict[str, Any], report: Path) -> list[str]:
    """Three rounded lines: the model, the baselines' TSR, where the full report is.

    Every arm's interval, steps and cost stay in the report and `metrics/eval_<model>.json`;
    the flow's closing table puts the models side by side.
    """
    from tracetune.console import num

    block = payload.get("candidate") or {}
    tsr = block.get("tsr")
    head = f"evaluation of {model} on {payload.get('n_tasks')} held-out tasks: TSR " + (
        "n/a"
        if tsr is None
        else f"{num(tsr)} [{num(block.get('tsr_ci_low'))}, {num(block.get('tsr_ci_high'))}]"
    )
    for key, unit in (("steps_mean", " steps/task"), ("cost_per_task_usd", "/task")):
        if block.get(key) is not None:
            head += f", {'$' if unit == '/task' else ''}{num(block[key])}{unit}"
    baselines = []
    for arm, label in BASELINES:
        other = (payload.get(arm) or {}).get("tsr")
        if other is not None:
            gap = "" if tsr is None else f" ({'+' if tsr - other > 0 else ''}{num(tsr - other)})"
            baselines.append(f"{label} {num(other)}{gap}")
    lines = [head]
    if baselines:
        lines.append("  baselines' TSR (this model's gap): " + ", ".join(baselines))
    lines.append(f"  report: {report}")
    return lines


if __name__ == "__main__":
    main()
