"""Stage `sft`: fine-tune the base model on the curated golden trajectories.

Outputs (dvc.yaml): `models/sft/merged` (+ `models/sft/adapter` with LoRA), the resumable
checkpoints in `models/sft_checkpoints` (persisted across crashed runs), `metrics/sft.json`,
the loss curve `reports/sft/curve.csv` (`dvc plots`), and an MLflow run.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from tasks._common import stage_params, write_json
from tracetune.config import Params
from tracetune.environments.base import load_environment
from tracetune.tracking import stage_run
from tracetune.training.sft import SFTResult, file_md5, is_main_process, train_sft


def sft_paths(params: Params) -> dict[str, Path]:
    models = params.paths.models
    return {
        "train": params.paths.curated_dir / "train.jsonl",
        "out": models / "sft",
        "checkpoints": models / "sft_checkpoints",
        "curve": params.paths.reports / "sft" / "curve.csv",
        "metrics": params.paths.metrics / "sft.json",
    }


def write_curve(history: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ["step", "epoch", "loss", "learning_rate", "grad_norm"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k) for k in keys})


def filter_families(train: Path, exclude: list[str], out_dir: Path) -> Path:
    """`train` without the trajectories of `exclude` families (`sft.exclude_families`)."""
    if not exclude:
        return train
    out = out_dir / "train.jsonl"
    with train.open(encoding="utf-8") as src, out.open("w", encoding="utf-8") as dst:
        for line in src:
            if line.strip() and json.loads(line).get("family") not in exclude:
                dst.write(line)
    return out


def flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= flat(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return {prefix: value}


def run(params: Params) -> SFTResult:
    import mlflow

    paths = sft_paths(params)
    if not paths["train"].exists():
        raise FileNotFoundError(
            f"curated train set missing: {paths['train']} (run the curate stage)"
        )
    env = load_environment(params.environment.class_path, **params.environment.kwargs)
    if not is_main_process():  # `accelerate launch` (infra/accelerate): rank 0 tracks and writes
        with tempfile.TemporaryDirectory() as tmp:
            train = filter_families(paths["train"], params.sft.exclude_families, Path(tmp))
            return train_sft(
                params.sft,
                params.base_model_path(),
                train,
                env.tool_schemas(),
                paths["out"],
                paths["checkpoints"],
            )
    data_md5 = file_md5(paths["train"])
    # A killed or failed run must not leave the last run's metrics looking current; the model
    # folder stays the last complete one (saves are atomic) until this run replaces it.
    paths["metrics"].unlink(missing_ok=True)
    with stage_run(params.tracking, "sft", {"data.train_md5": data_md5}) as active:
        mlflow.log_params(flat("sft", params.sft.model_dump(mode="json")))
        mlflow.log_param("base_model", params.base_model.name_or_path)
        with tempfile.TemporaryDirectory() as tmp:
            train = filter_families(paths["train"], params.sft.exclude_families, Path(tmp))
            result = train_sft(
                params.sft,
                params.base_model_path(),
                train,
                env.tool_schemas(),
                paths["out"],
                paths["checkpoints"],
            )
        for row in result.history:
            metrics = {k: float(row[k]) for k in ("loss", "learning_rate", "grad_norm") if k in row}
            mlflow.log_metrics({f"train.{k}": v for k, v in metrics.items()}, step=int(row["step"]))
        summary = {k: v for k, v in result.metrics().items() if isinstance(v, int | float)}
        mlflow.log_metrics({f"sft.{k}": float(v) for k, v in summary.items()})
        mlflow.log_artifacts(str(paths["out"] / "merged"), artifact_path="model")
        write_curve(result.history, paths["curve"])
        mlflow.log_artifact(str(paths["curve"]))
        write_json(paths["metrics"], result.metrics() | {"mlflow_run_id": active.info.run_id})
    return result


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console

    from tracetune.console import num

    result = run(stage_params(argv))
    cuts = result.cuts
    windows = (
        f" ({cuts['windowed']} long conversations cut into windows, "
        f"{cuts['turns_dropped']} assistant turns fit nowhere)"
        if cuts.get("windowed")
        else ""
    )
    Console().print(
        f"[bold]SFT[/bold]: {result.examples} examples{windows}, {result.steps} steps, "
        f"loss {num(result.first_loss)} -> {num(result.final_loss)}, "
        f"{result.tokens_per_second:.0f} tokens/s, {result.seconds:.0f} s",
        soft_wrap=True,
    )


if __name__ == "__main__":
    main()
