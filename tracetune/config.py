"""The typed schema of params.yaml: the one place tunables and paths are defined.

Every section forbids unknown keys, so a typo (`sft.lerning_rate`) fails loudly with the key's
path instead of silently training with a default. Stages call `load_params()` before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or does not fit the schema."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    raw_logs: Path = Path("data/raw_logs")
    ingested: Path = Path("data/ingested/trajectories.jsonl")
    quarantine: Path = Path("data/ingested/quarantine.jsonl")
    ingest_state: Path = Path("data/state/ingest_watermark.json")
    curated_dir: Path = Path("data/curated")
    reports: Path = Path("reports")
    metrics: Path = Path("metrics")
    models: Path = Path("models")


class EnvironmentParams(Section):
    """Which tool environment to use; any `module.Class` implementing `Environment` works."""

    class_path: str = "tracetune.environments.support_desk.SupportDesk"
    max_steps: int = Field(15, ge=1, description="hard cap on tool calls per episode")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class FaultRates(Section):
    """Per-trajectory probabilities of the production agent's faults."""

    wrong_tool: float = Field(0.08, ge=0, le=1)
    malformed_arguments: float = Field(0.05, ge=0, le=1)
    error_retry: float = Field(0.10, ge=0, le=1)
    redundant_call: float = Field(0.10, ge=0, le=1)
    overlong: float = Field(0.04, ge=0, le=1)
    wrong_answer: float = Field(0.25, ge=0, le=1)
    duplicate_session: float = Field(0.03, ge=0, le=1)
    pii_in_user_text: float = Field(0.15, ge=0, le=1)
    corrupt_line: float = Field(0.01, ge=0, le=1)


class Pricing(Section):
    """USD per 1k tokens, used for cost per task."""

    prompt_per_1k: float = Field(0.0005, ge=0)
    completion_per_1k: float = Field(0.0015, ge=0)


class SimulateParams(Section):
    n_trajectories: int = Field(3000, ge=1)
    seed: int = 7
    files: int = Field(3, ge=1, description="log files the batch is spread over")
    model_name: str = "prod-agent-v1"
    start_time: str = "2026-11-01T00:00:00+00:00"
    faults: FaultRates = FaultRates()
    pricing: Pricing = Pricing()
    mean_latency_s: float = Field(1.2, gt=0)


class BaseModelBuild(Section):
    """How the embedded default base model is built: tokenizer, tiny Qwen2 and its pre-training.

    STACK.md: on CPU, optimizer steps beat model size (batch 4 runs at the tokens/s of 16).
    """

    vocab_size: int = Field(1024, ge=300, description="byte-level BPE vocabulary, incl. specials")
    hidden_size: int = Field(128, ge=16)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    max_positions: int = Field(2048, ge=64, description="longest conversation the model can see")
    seq_len: int = Field(1024, ge=32, description="packed pre-training row length in tokens")
    pretrain_steps: int = Field(1200, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(3e-3, gt=0)
    corpus_size: int = Field(12000, ge=10, description="synthetic conversations generated")
    seed: int = 0


class BaseModelParams(Section):
    """The agent's base model: a hub id or a local path.

    The default `models/base` is the embedded tiny model that `tasks.base_model` builds (once,
    cached by config hash); any other hub id or path is used as it is and nothing is built.
    """

    name_or_path: str = "models/base"
    build: BaseModelBuild = BaseModelBuild()


class TrackingParams(Section):
    """MLflow. `MLFLOW_TRACKING_URI` in the environment wins over `tracking_uri` (servers)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "tracetune"
    registered_model: str = "tracetune-agent"


class Params(Section):
    paths: Paths = Paths()
    tracking: TrackingParams = TrackingParams()
    environment: EnvironmentParams = EnvironmentParams()
    simulate: SimulateParams = SimulateParams()
    base_model: BaseModelParams = BaseModelParams()


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; errors name the offending key path (e.g. `sft.lr`)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ParamsError(f"params file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    return parse_params(raw, source=str(path))


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(format_errors(exc, source)) from None


def format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} invalid value(s)"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)
