"""Stage `rlvr`: GRPO from the SFT model when the recipe's rule says so.

The rule (`rlvr.mode: rule`): run only when SFT's held-out TSR (`metrics/eval_sft.json` ->
`candidate.tsr`) is below `rlvr.when_sft_tsr_below`; `always` / `never` force it. The decision
and its reason are printed, tagged on the MLflow run and written to `metrics/rlvr.json`.

Outputs (dvc.yaml) either way, so `dvc repro` stays consistent: `models/rlvr/merged` (the RLVR
model, or a copy of the SFT model plus `models/rlvr/SKIPPED` with the reason), the resumable
checkpoints in `models/rlvr_checkpoints` (persisted), `metrics/rlvr.json`, the reward / health
curve `reports/rlvr/curve.csv` (`dvc plots`), and an MLflow run with the health metrics per
step and the data versions (SFT model hash, held-out task list hash).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from tasks._common import stage_params, write_json
from tracetune.config import Params
from tracetune.tracking import stage_run
from tracetune.training.grpo import Decision, RLVRResult

# reports/rlvr/curve.csv: column -> key in TRL's step logs
CURVE_COLUMNS = {
    "step": "step",
    "reward": "reward",
    "reward_std": "reward_std",
    "success_rate": "health/success_rate",
    "tool_call_rate": "health/tool_call_rate",
    "zero_advantage_share": "health/zero_advantage_share",
    "mean_steps": "health/mean_steps",
    "completion_tokens": "health/completion_tokens",
    "format_error_rate": "health/format_error_rate",
    "kl": "kl",
    "entropy": "entropy",
    "loss": "loss",
    "step_time": "step_time",
}


def rlvr_paths(params: Params) -> dict[str, Path]:
    models = params.paths.models
    return {
        "sft": models / "sft",
        "eval_sft": params.paths.metrics / "eval_sft.json",
        "heldout": params.paths.curated_dir / "heldout_tasks.json",
        "out": models / "rlvr",
        "checkpoints": models / "rlvr_checkpoints",
        "curve": params.paths.reports / "rlvr" / "curve.csv",
        "metrics": params.paths.metrics / "rlvr.json",
    }


def write_curve(history: list[dict[str, Any]], path: Path) -> None:
    """The per-step reward and health curve (an empty table with a header when skipped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CURVE_COLUMNS))
        writer.writeheader()
        for row in history:
            writer.writerow({col: row.get(key) for col, key in CURVE_COLUMNS.items()})


def read_eval(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def log_history(history: list[dict[str, Any]]) -> None:
    """Every numeric step log (reward terms, health, KL, entropy) as MLflow metrics."""
    import mlflow

    for row in history:
        metrics = {
            "rlvr." + k.replace("/", "."): float(v)
            for k, v in row.items()
            if isinstance(v, int | float) and k != "step"
        }
        mlflow.log_metrics(metrics, step=int(row["step"]))


def heldout_ids(params: Params, env: Any) -> set[str]:
    """The evaluation's task ids, as the environment builds them (pseudonymised ids resolved)."""
    from tracetune.trajectories.pii import key_for
    from tracetune.trajectories.split import load_heldout_tasks

    held = load_heldout_tasks(env, params.paths.curated_dir, params.ingest.pii, key=key_for(params))
    return {t.id for t in held.tasks}


def run(params: Params) -> RLVRResult:
    """Decide, then train or copy; write every out in both cases."""
    import mlflow
    from rich.console import Console

    from tasks.sft import flat
    from tracetune.training.grpo import decide, model_md5, skip_rlvr

    console = Console()
    paths = rlvr_paths(params)
    decision = decide(params.rlvr, read_eval(paths["eval_sft"]))
    style = "green" if decision.run else "yellow"
    console.print(f"[bold {style}]RLVR decision[/]: {decision.reason}")
    if not (paths["sft"] / "merged").exists():
        raise FileNotFoundError(f"SFT model missing: {paths['sft'] / 'merged'} (run the sft stage)")
    sft_md5 = model_md5(paths["sft"] / "merged")  # the lineage tag and the run identity
    tags = {
        "rlvr.ran": decision.run,
        "rlvr.decision": decision.reason,
        "data.sft_model_md5": sft_md5,
    }
    if paths["heldout"].exists():
        from tracetune.training.sft import file_md5

        tags["data.heldout_tasks_md5"] = file_md5(paths["heldout"])
    # A killed or failed run must not leave the last run's metrics looking current; the model
    # folder stays the last complete one (saves are atomic) until this run replaces it.
    paths["metrics"].unlink(missing_ok=True)
    with stage_run(params.tracking, "rlvr", tags) as active:
        mlflow.log_params(flat("rlvr", params.rlvr.model_dump(mode="json")))
        if decision.run:
            result = _train(params, paths, decision, sft_md5)
            if not result.ran:  # the screen found nothing to learn: the SFT model was kept
                console.print(f"[bold yellow]RLVR skipped[/]: {result.decision['reason']}")
                _mark_no_checkpoints(paths["checkpoints"], result.decision["reason"])
        else:
            skip_rlvr(paths["sft"], paths["out"], decision)
            _mark_no_checkpoints(paths["checkpoints"], decision.reason)
            result = RLVRResult(ran=False, decision=decision.as_dict())
        log_history(result.history)
        summary = {k: v for k, v in result.metrics().items() if isinstance(v, int | float)}
        mlflow.log_metrics({f"rlvr.{k}": float(v) for k, v in summary.items()})
        if result.screening:
            mlflow.log_dict(result.screening, "screening.json")
            kept = sum(result.screening["kept"].values())
            mlflow.log_metric("rlvr.screen_kept_tasks", float(kept))
        write_curve(result.history, paths["curve"])
        mlflow.log_artifact(str(paths["curve"]))
        if result.ran:
            mlflow.log_artifacts(str(paths["out"] / "merged"), artifact_path="model")
        write_json(paths["metrics"], result.metrics() | {"mlflow_run_id": active.info.run_id})
    return result


def _train(params: Params, paths: dict[str, Path], decision: Decision, sft_md5: str) -> RLVRResult:
    from tracetune.environments.base import load_environment
    from tracetune.environments.pseudonymised import model_env_factory
    from tracetune.training.grpo import train_rlvr, training_tasks

    rl = params.rlvr
    env = load_environment(params.environment.class_path, **params.environment.kwargs)
    held = heldout_ids(params, env) if paths["heldout"].exists() else set()
    tasks = training_tasks(env, rl.n_tasks, rl.seed, rl.families, held, params.split)
    if not tasks:
        raise ValueError(f"no training tasks left for rlvr.families={rl.families}")
    # The episode's step cap: `max_episode_steps` turns can make at most that many calls
    # each, so the environment's own cap (tool calls) stays the one in params.
    factory = model_env_factory(params)  # the world as the SFT data showed it
    env_key = json.dumps(params.environment.model_dump(mode="json"), sort_keys=True)
    return train_rlvr(
        rl,
        paths["sft"],
        tasks,
        factory,
        paths["out"],
        paths["checkpoints"],
        decision,
        env_key,
        sft_md5=sft_md5,
    )


def _mark_no_checkpoints(checkpoint_dir: Path, reason: str) -> None:
    """A skipped run still leaves its checkpoints out (dvc.yaml lists it, and DVC fails a
    stage whose out is missing); a marker says why it holds no checkpoint."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / "SKIPPED").write_text(f"RLVR skipped: {reason}\n")


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console

    params = stage_params(argv)
    result = run(params)
    console = Console()
    if not result.ran:
        console.print(f"[bold]RLVR[/bold] skipped: {result.decision['reason']}")
        return
    for line in rlvr_lines(result, params):
        console.print(line, soft_wrap=True)
    if result.stopped_early:
        console.print(f"[bold red]stopped early[/]: {result.stopped_early}")


def rlvr_lines(result: RLVRResult, params: Params) -> list[str]:
    """The stage's closing lines: what it did, then why its reward is not held-out TSR.

    A walk-through saw the printed training reward fall (0.217 -> -0.514) while held-out TSR
    rose: the two measure different things, and the console must say so where the reward is.
    """
    from tracetune.console import num

    rl = params.rlvr
    decoding = "greedy decoding" if params.evaluate.greedy else "sampled decoding"
    return [
        f"[bold]RLVR[/bold]: {result.steps} GRPO steps on {result.train_tasks} tasks, "
        f"training reward {num(result.reward_first)} -> {num(result.reward_last)} "
        f"(mean of the first / last 5 steps), training success {num(result.success_first)} -> "
        f"{num(result.success_last)}, {num(result.episodes_per_second)} episodes/s, "
        f"{num(result.seconds_per_step)} s/step",
        f"  note: the training reward is the mean over {rl.group_size * rl.tasks_per_step} "
        f"episodes sampled at temperature {num(rl.temperature)} on the {rl.tasks_per_step} "
        "training tasks each step drew (outcome +1/-1 plus shaping): it moves with which tasks "
        "came up;",
        f"  held-out TSR (evaluate@rlvr) is {decoding} on tasks RLVR never trains on: judge the "
        "model by that, not by this reward (docs/training.md)",
    ]


if __name__ == "__main__":
    main()
