"""Register an evaluated candidate: one MLflow run, one model version, gate verdict as tags.

The order matters for safety. The verdict is computed *before* the version exists and its tags
are written in the same request that creates the version, so there is no moment at which a
version exists without its verdict. Only after the version is READY (a server may still be
copying files) does `challenger` move, inside the registry lock (approval.set_challenger).
The champion never moves here, except with `registry.auto_approve` (non-production only).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracetune.config import Params
from tracetune.registry.client import (
    CANDIDATE_TAG,
    CHAMPION,
    CONTENT_TAG,
    EVAL_TAG,
    GATE_CHAMPION,
    GATE_FAILED,
    GATE_PARAMS,
    GATE_REASONS,
    GATE_VERDICT,
    MODEL_PATH_TAG,
    Registry,
    ensure_registered_model,
    json_tag,
    open_registry,
    store_init_lock,
    wait_until_ready,
)
from tracetune.registry.gate import CANDIDATE, Verdict, evaluate_gate, validate_eval
from tracetune.registry.lineage import Lineage, build_lineage, flatten

if TYPE_CHECKING:
    from huggingface_hub import ModelCard
    from mlflow.entities.model_registry import ModelVersion

AUTO_APPROVER = "auto-approve"


@dataclass(frozen=True)
class CandidatePaths:
    """Where a candidate's evaluation, model, report and plots are (params.paths + its name)."""

    eval_file: Path
    model_dir: Path
    report_dir: Path
    plots_dir: Path | None = None


@dataclass(frozen=True)
class RegisterResult:
    """What `tasks.register` writes to `metrics/register.json`."""

    model: str
    candidate: str
    version: str
    verdict: str
    failed: list[str]
    reasons: list[str]
    challenger: bool
    champion: str | None
    run_id: str
    model_uri: str
    lineage: dict[str, Any] = field(default_factory=dict)
    auto_approved: bool = False
    seconds: float = 0.0
    reused: bool = False  # the same model and evaluation were registered before: no new version
    checks: list[dict[str, Any]] = field(default_factory=list)  # each gate check: value, bound

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- pure helpers -------------------------------------------------------------------------------


def load_eval(path: Path) -> dict[str, Any]:
    """An `eval_<model>.json`, checked for what the gate needs."""
    if not path.exists():
        raise FileNotFoundError(f"evaluation metrics not found: {path} (run the evaluate stage)")
    metrics = json.loads(path.read_text())
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: expected a JSON object")
    validate_eval(metrics)
    return metrics


def resolve_model_dir(path: Path) -> Path:
    """The directory holding `config.json`: the path itself or its `merged/` export (SFT)."""
    for candidate in (path, path / "merged"):
        if (candidate / "config.json").exists():
            return candidate
    raise FileNotFoundError(f"no model (config.json) in {path} or {path / 'merged'}")


def candidate_paths(
    params: Params, candidate: str, metrics: Mapping[str, Any] | None = None
) -> CandidatePaths:
    """Paths by convention; the eval file's `model_path` (what was really evaluated) wins."""
    eval_file = params.paths.metrics / f"eval_{candidate}.json"
    model_dir = params.paths.models / candidate
    if metrics and metrics.get("model_path"):
        model_dir = Path(str(metrics["model_path"]))
    reports = params.paths.reports
    return CandidatePaths(
        eval_file, model_dir, reports / "eval" / candidate, reports / "eval_plots" / candidate
    )


def content_key(model_dir: Path, eval_file: Path) -> str:
    """What makes two registrations the same: the model's files and its evaluation's bytes."""
    import hashlib

    from tracetune.agent.model import content_hash

    model = content_hash(resolve_model_dir(model_dir))
    return hashlib.sha256(f"{model}:{content_hash(eval_file)}".encode()).hexdigest()[:32]


def run_metrics(metrics: Mapping[str, Any], verdict: Verdict) -> dict[str, float]:
    """The register run's few metrics: the candidate's headline numbers under the keys every
    evaluate run uses (`tsr`, `tsr_ci_low`, `steps_per_task`, `cost_per_task`, `tsr_vs_*`) and
    `gate.passed`. Baselines, families and failures are in the logged eval file and comparison.
    """
    from tracetune.evaluation.report import headline_metrics

    block = metrics.get(CANDIDATE) or {}
    out = headline_metrics(block, metrics.get("delta") or {})
    if isinstance(metrics.get("n_tasks"), int | float):
        out["n_tasks"] = float(metrics["n_tasks"])
    out["gate.passed"] = 1.0 if verdict.passed else 0.0
    return out


def version_tags(
    candidate: str,
    model_dir: Path,
    metrics: Mapping[str, Any],
    verdict: Verdict,
    gate_params: Mapping[str, Any],
    lineage: Lineage,
) -> dict[str, str]:
    """Every tag the version is created with: verdict, reasons, metrics summary, lineage."""
    block = dict(metrics[CANDIDATE])
    block.pop("failures", None)
    tags = {
        CANDIDATE_TAG: candidate,
        MODEL_PATH_TAG: str(model_dir),
        GATE_VERDICT: verdict.label,
        GATE_REASONS: json.dumps(verdict.reasons),
        GATE_FAILED: ",".join(verdict.failed),
        GATE_CHAMPION: verdict.champion_version or "none",
        GATE_PARAMS: json.dumps(dict(gate_params), sort_keys=True),
        EVAL_TAG: json.dumps(block, sort_keys=True),
        "tracetune.n_tasks": str(metrics.get("n_tasks", block.get("n"))),
        "tracetune.tsr": f"{float(block['tsr']):.4f}",
        "tracetune.tsr_ci": f"[{block.get('tsr_ci_low')}, {block.get('tsr_ci_high')}]",
        "tracetune.steps_mean": str(block.get("steps_mean")),
        "tracetune.cost_per_task_usd": str(block.get("cost_per_task_usd")),
    }
    return tags | lineage.tags()


def describe(candidate: str, metrics: Mapping[str, Any], verdict: Verdict) -> str:
    """The version description for the MLflow UI: a summary, then one list item per gate check.

    Blocks are separated by blank lines: MLflow's markdown view runs single-newline-separated
    lines together into one paragraph.
    """
    c = metrics[CANDIDATE]
    blocks = [
        f"{candidate}: TSR {c['tsr']:.3f} [{c.get('tsr_ci_low', 0):.3f}, "
        f"{c.get('tsr_ci_high', 1):.3f}] on {c.get('n')} held-out tasks, "
        f"{c.get('steps_mean', 0):.2f} steps, ${c.get('cost_per_task_usd', 0):.5f}/task.",
        f"Gate {verdict.label}:",
        *(f"- {reason}" for reason in verdict.reasons),
    ]
    return "\n\n".join(blocks) + "\n"


def model_card(candidate: str, report_dir: Path, summary: str) -> ModelCard:
    """A card from the evaluation report: also keeps MLflow from asking the Hub for one."""
    from huggingface_hub import ModelCard

    report = report_dir / "report.md"
    body = report.read_text() if report.exists() else "(no evaluation report)"
    return ModelCard(
        f"---\nlicense: other\ntags: [tracetune, {candidate}]\n---\n\n"
        f"# tracetune agent: {candidate}\n\n{summary}\n\n{body}\n"
    )


def pip_requirements() -> list[str]:
    """Pinned to what is installed: without an explicit list MLflow imports torchvision."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in ("torch", "transformers", "tokenizers", "accelerate", "safetensors"):
        try:
            reqs.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


# --- registry side ------------------------------------------------------------------------------


def find_version(registry: Registry, key: str) -> ModelVersion | None:
    """The version registered earlier from the same content (the oldest if several)."""
    found = registry.client.search_model_versions(
        f"name = '{registry.name}' and tags.`{CONTENT_TAG}` = '{key}'"
    )
    return min(found, key=lambda mv: int(mv.version)) if found else None


def reused_result(registry: Registry, mv: ModelVersion, started: float) -> RegisterResult:
    """The result of an earlier registration, read back from its version's tags."""
    from tracetune.registry.client import CHALLENGER

    tags = mv.tags or {}
    return RegisterResult(
        model=registry.name,
        candidate=tags.get(CANDIDATE_TAG, ""),
        version=str(mv.version),
        verdict=tags.get(GATE_VERDICT, "unknown"),
        failed=[f for f in tags.get(GATE_FAILED, "").split(",") if f],
        reasons=json_tag(tags, GATE_REASONS, []),
        challenger=registry.alias(CHALLENGER) == str(mv.version),
        champion=registry.alias(CHAMPION),
        run_id=str(mv.run_id),
        model_uri=f"models:/{registry.name}/{mv.version}",
        seconds=round(time.perf_counter() - started, 2),
        reused=True,
    )


def champion_reference(registry: Registry) -> tuple[dict[str, Any] | None, str | None]:
    """The current champion's stored metrics block and its version (None, None without one)."""
    champion = registry.alias(CHAMPION)
    if champion is None:
        return None, None
    block = json_tag(registry.version(champion).tags or {}, EVAL_TAG)
    return (block if isinstance(block, dict) else None), champion


def report_plots(paths: CandidatePaths) -> list[Path]:
    """The evaluation's PNG plots: in the plots folder (what the evaluate stage writes) and
    any beside the report."""
    found: dict[str, Path] = {}
    for folder in (paths.plots_dir, paths.report_dir):
        if folder is not None and folder.is_dir():
            for png in sorted(folder.glob("*.png")):
                found.setdefault(png.name, png)
    return list(found.values())


def log_candidate_run(
    params: Params,
    candidate: str,
    paths: CandidatePaths,
    metrics: Mapping[str, Any],
    verdict: Verdict,
    lineage: Lineage,
    summary: str,
    extra_files: list[Path],
) -> str:
    """Into the active `register` run: params, metrics, lineage, the report with its plots
    beside it, the comparison with both baselines, and the model itself, logged under the
    registered model's name. Returns the logged model's URI."""
    import mlflow

    from tracetune.agent.model import load_model
    from tracetune.evaluation.report import comparison_markdown, comparison_rows, read_evals
    from tracetune.tracking import log_report

    model_dir = resolve_model_dir(paths.model_dir)
    mlflow.log_params(flatten("", params.model_dump(mode="json")) | {"candidate": candidate})
    mlflow.log_metrics(run_metrics(metrics, verdict))
    mlflow.set_tags(lineage.tags() | {GATE_VERDICT: verdict.label})
    mlflow.log_artifact(str(paths.eval_file), artifact_path="eval")
    report = paths.report_dir / "report.md"
    if report.is_file():
        log_report(report.read_text(), report_plots(paths), "eval/report")
    if paths.report_dir.is_dir():
        for extra in sorted(paths.report_dir.iterdir()):
            if extra.is_file() and extra.name != "report.md" and extra.suffix != ".png":
                mlflow.log_artifact(str(extra), artifact_path="eval/report")
    evals = read_evals(params.paths.metrics) | {candidate: dict(metrics)}
    rows = comparison_rows(evals, reference=candidate)
    mlflow.log_text(comparison_markdown(rows), "eval/comparison.md")
    mlflow.log_dict(lineage.as_dict(), "lineage/lineage.json")
    mlflow.log_dict(verdict.as_dict(), "gate/verdict.json")
    mlflow.log_text(summary, "gate/description.md")
    for extra in extra_files:
        if extra.is_file():
            mlflow.log_artifact(str(extra), artifact_path="lineage")
    model, tokenizer = load_model(str(model_dir.resolve()), device="cpu")
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer},
        name=params.tracking.registered_model,
        task="text-generation",
        pip_requirements=pip_requirements(),
        model_card=model_card(candidate, paths.report_dir, summary),
        metadata={"tracetune_candidate": candidate, "gate": verdict.label},
    )
    return str(info.model_uri)


def register_candidate(
    params: Params,
    candidate: str,
    *,
    eval_file: Path | None = None,
    model_dir: Path | None = None,
    report_dir: Path | None = None,
    plots_dir: Path | None = None,
    dvc_lock: Path = Path("dvc.lock"),
    params_file: Path | None = Path("params.yaml"),
) -> RegisterResult:
    """Gate, log and register one candidate; `challenger` moves if the gate passed.

    Idempotent: the same model files and evaluation registered again return the earlier
    version (`reused`), so a retried or repeated `dvc repro` never duplicates versions."""
    from tracetune.registry.locking import registry_lock
    from tracetune.tracking import configure, stage_run

    started = time.perf_counter()
    eval_path = eval_file or candidate_paths(params, candidate).eval_file
    metrics = load_eval(eval_path)
    default = candidate_paths(params, candidate, metrics)
    paths = CandidatePaths(
        eval_path,
        model_dir or default.model_dir,
        report_dir or default.report_dir,
        plots_dir or default.plots_dir,
    )
    resolve_model_dir(paths.model_dir)  # fail before anything is written

    settings = params.registry
    registry = open_registry(params.tracking, lock_timeout_s=settings.lock_timeout_s)
    with store_init_lock(registry.tracking_uri, settings.lock_timeout_s):
        configure(params.tracking)  # two first runs on a fresh store would race to create it
    ensure_registered_model(registry, "tracetune agent models (docs/registry.md)")
    key = content_key(paths.model_dir, eval_path)
    # One registration at a time per model, so two identical ones cannot both miss the other.
    with registry_lock(
        registry.client, registry.tracking_uri, f"{registry.name}.register", settings.lock_timeout_s
    ):
        earlier = find_version(registry, key)
        if earlier is not None:
            return reused_result(registry, earlier, started)
        # The `register` run spans the gate, logging the model, the version and the aliases,
        # so its duration is the stage's.
        with stage_run(params.tracking, "register", {CANDIDATE_TAG: candidate}) as run:
            return _register_new(
                params, registry, candidate, paths, metrics, key, started, dvc_lock,
                params_file, run.info.run_id,
            )  # fmt: skip


def _register_new(
    params: Params,
    registry: Registry,
    candidate: str,
    paths: CandidatePaths,
    metrics: dict[str, Any],
    key: str,
    started: float,
    dvc_lock: Path,
    params_file: Path | None,
    run_id: str,
) -> RegisterResult:
    import mlflow

    from tracetune.registry.approval import approve, set_challenger
    from tracetune.tracking import git_commit

    settings = params.registry
    eval_path = paths.eval_file
    champion_block, champion_version = champion_reference(registry)
    verdict = evaluate_gate(metrics, settings.gate, champion_block, champion_version)
    lineage = build_lineage(
        dvc_lock=dvc_lock,
        data_dir=params.paths.curated_dir,
        model_dir=paths.model_dir,
        git_commit=git_commit(),
        eval_file=eval_path,
        params_file=params_file,
    )
    summary = describe(candidate, metrics, verdict)
    extras = [p for p in (dvc_lock, params_file) if p is not None]
    model_uri = log_candidate_run(
        params, candidate, paths, metrics, verdict, lineage, summary, extras
    )
    tags = version_tags(
        candidate,
        paths.model_dir,
        metrics,
        verdict,
        settings.gate.model_dump(mode="json"),
        lineage,
    ) | {CONTENT_TAG: key}
    mv = mlflow.register_model(model_uri, registry.name, await_registration_for=0, tags=tags)
    version = str(mv.version)
    wait_until_ready(registry, version)
    registry.client.update_model_version(registry.name, version, description=summary)
    mlflow.set_tags(
        {"tracetune.model_version": version, "tracetune.registered_model": registry.name}
    )
    challenger = set_challenger(registry, version) if verdict.passed else False
    auto = False
    if verdict.passed and settings.auto_approve:
        approve(registry, version, AUTO_APPROVER, "registry.auto_approve is on (non-production)")
        auto = True
    return RegisterResult(
        model=registry.name,
        candidate=candidate,
        version=version,
        verdict=verdict.label,
        failed=verdict.failed,
        reasons=verdict.reasons,
        challenger=challenger,
        champion=registry.alias(CHAMPION),
        run_id=run_id,
        model_uri=f"models:/{registry.name}/{version}",
        lineage=lineage.as_dict(),
        auto_approved=auto,
        seconds=round(time.perf_counter() - started, 2),
        checks=verdict.as_dict()["checks"],
    )
