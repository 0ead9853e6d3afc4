"""The typed schema of params.yaml: the one place tunables and paths are defined.

Every section forbids unknown keys, so a typo (`sft.lerning_rate`) fails loudly with the key's
path instead of silently training with a default. Stages call `load_params()` before any work.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or does not fit the schema."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    raw_logs: Path = Path("data/raw_logs")
    # Ingest appends one file per batch to these folders (DVC caches each batch once).
    ingested: Path = Path("data/ingested/batches")
    quarantine: Path = Path("data/ingested/quarantine")
    ingest_state: Path = Path("data/state/ingest_watermark.json")
    ingest_index: Path = Path("data/state/ingest_index.sqlite")
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


class LoraParams(Section):
    """LoRA adapter shape (the recipe: r=16, alpha=32)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class SFTParams(Section):
    """Supervised fine-tuning on golden trajectories (assistant-only loss).

    `use_lora: true` is the right default for pretrained bases; the embedded tiny base trains in
    full (LoRA on a 0.6M-parameter model barely learns, STACK.md), so params.yaml turns it off.
    """

    use_lora: bool = True
    lora: LoraParams = LoraParams()
    epochs: float = Field(3, gt=0)
    max_steps: int = Field(-1, description="-1: run the epochs; >0 caps optimizer steps")
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=32, description="longer examples are dropped, not truncated")
    batching: Literal["grouped", "packed", "padded"] = Field(
        "grouped",
        description="grouped: length-grouped batches (least padding without cross-attention cost);"
        " packed: padding-free best-fit packing (pays off with flash-attention on GPU);"
        " padded: plain random batches (TRL's default)",
    )
    max_examples: int = Field(0, ge=0, description="0: all curated train examples")
    save_steps: int = Field(200, ge=1)
    logging_steps: int = Field(10, ge=1)
    seed: int = 0


class TrackingParams(Section):
    """MLflow. `MLFLOW_TRACKING_URI` in the environment wins over `tracking_uri` (servers)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "tracetune"
    registered_model: str = "tracetune-agent"


class GateParams(Section):
    """Promotion gate (docs/registry.md). With `use_confidence_intervals`, TSR floors use the
    lower 95% bound and comparisons the bounds of the difference, so a lucky small eval fails."""

    min_tsr: float = Field(0.5, ge=0, le=1)
    max_steps_per_task: float = Field(10.0, gt=0)
    max_cost_per_task_usd: float = Field(0.005, ge=0)
    min_margin_vs_prompt_only: float = Field(0.05, ge=-1, le=1)
    min_margin_vs_production: float = Field(0.0, ge=-1, le=1)
    champion_non_inferiority_margin: float = Field(0.05, ge=0, le=1)
    use_confidence_intervals: bool = True


class RegisterParams(Section):
    """Stage `register` and promotion: gate, approval and the registry lock."""

    candidate: str = Field("sft", description="eval_<candidate>.json / models/<candidate>")
    gate: GateParams = GateParams()
    auto_approve: bool = Field(False, description="skip the human approval (never in production)")
    approval_timeout_s: int = Field(86_400, ge=1, description="the approval flow's pause")
    lock_timeout_s: float = Field(120.0, gt=0, description="wait for a concurrent promotion")


class PiiParams(Section):
    """PII scrub, applied at ingest so that nothing versioned ever holds PII (docs/data.md).

    Values become keyed pseudonyms (HMAC of the value): the same email is the same pseudonym in
    the user text, the tool arguments and the tool results, so trajectories stay coherent.
    """

    enabled: bool = True
    emails: bool = True
    phones: bool = True
    cards: bool = True
    card_luhn: bool = Field(False, description="only Luhn-valid card-like numbers count as cards")
    key_env: str = Field(
        "TRACETUNE_PII_KEY", description="environment variable holding the pseudonym secret"
    )


class FieldMapping(Section):
    """How to read logs whose layout differs from ours; empty = our own layout (docs/data.md)."""

    fields: dict[str, str] = Field(
        default_factory=dict, description="our field (dotted) <- their field (dotted)"
    )
    success_from_reward: str | None = Field(
        None, description="their numeric reward field; success = reward >= success_threshold"
    )
    success_threshold: float = 0.5
    roles: dict[str, str] = Field(default_factory=dict, description="their role -> ours")
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="values for fields their logs lack"
    )
    drop: list[str] = Field(default_factory=list, description="their extra fields to ignore")
    derive_steps: bool = Field(False, description="count steps from the messages when absent")


class IngestParams(Section):
    """Stage `ingest`: where logs come from, and what a batch may quarantine."""

    source: str = Field("data/raw_logs", description="a local folder/file or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible store (MinIO, moto)")
    max_quarantine_rate: float = Field(0.05, ge=0, le=1)
    workers: int = Field(1, ge=1, description="parser processes (1: in-process)")
    full_refresh: bool = Field(False, description="forget the watermark, re-ingest everything")
    mapping: FieldMapping = FieldMapping()
    pii: PiiParams = PiiParams()


class RawGateParams(Section):
    """Gate on an ingested batch. Production logs hold failed, messy episodes: faults the agent
    makes (malformed JSON, unknown tools) are bounded by `mostly`; what a logger must always get
    right (answered calls, role order, sane costs and times) is near-strict."""

    roles_ok_mostly: float = Field(0.99, ge=0, le=1)
    answered_calls_mostly: float = Field(0.99, ge=0, le=1)
    args_json_mostly: float = Field(0.85, ge=0, le=1)
    known_tools_mostly: float = Field(0.85, ge=0, le=1)
    steps_consistent_mostly: float = Field(0.99, ge=0, le=1)
    max_steps: int = Field(100, ge=1)
    max_total_tokens: int = Field(2_000_000, ge=1)
    max_cost_usd: float = Field(5.0, gt=0)
    max_latency_s: float = Field(3600.0, gt=0)
    min_timestamp: datetime = datetime(2020, 1, 1, tzinfo=timezone.utc)
    max_future_skew_s: float = Field(300.0, ge=0)


class CuratedGateParams(Section):
    """Gate on the curated set (train + held-out)."""

    min_rows: int = Field(500, ge=0)
    required_families: list[str] | None = Field(None, description="null: every environment family")
    max_duplicate_rate: float = Field(0.01, ge=0, le=1)


class ValidateParams(Section):
    raw: RawGateParams = RawGateParams()
    curated: CuratedGateParams = CuratedGateParams()
    failed_rows_shown: int = Field(5, ge=1, description="rows listed per failed expectation")


class CurateParams(Section):
    """The golden filter and dedupe; each rule can be switched off and reports its drops."""

    require_success: bool = True
    step_limit: int = Field(15, ge=1, description="keep trajectories with fewer steps than this")
    max_error_retries: int = Field(0, ge=0)
    drop_redundant_calls: bool = True
    drop_empty_turns: bool = True
    keep_pseudonymised: bool = True
    dedupe_exact: bool = True
    dedupe_near: bool = True
    workers: int = Field(1, ge=1, description="judging processes (1: in-process)")


class SplitParams(Section):
    """Held-out tasks by a seeded hash of the task id: stable as data grows, no leakage."""

    heldout_fraction: float = Field(0.15, ge=0, lt=1)
    heldout_families: list[str] = Field(default_factory=list, description="held out whole")
    seed: int = 13


class OrchestrateParams(Section):
    """The Prefect flow's own behaviour (flows/retrain.py); stage commands stay in dvc.yaml.

    Schedules, work pools and images are deploy-time settings and live in prefect.yaml only.
    """

    dvc_push: bool = Field(True, description="push the ingested snapshot, then every out at the end")
    dvc_pull: bool = Field(False, description="pull the DVC cache first (no shared workspace)")
    transient_retries: int = Field(3, ge=0, description="S3/network retries; training: never")
    retry_delay_s: float = Field(10.0, ge=0)
    training_stages: list[str] = Field(
        default_factory=lambda: ["base_model", "sft", "rlvr"],
        description="no retries; dispatched to the gpu pool when the flow is told to",
    )
    force_stages: list[str] = Field(
        default_factory=lambda: ["ingest"],
        description="always run: DVC cannot see new objects in a remote log source",
    )
    gpu_deployment: str = Field(
        "train-stage/gpu-train", description="`flow/deployment` that runs one training stage"
    )


class Params(Section):
    paths: Paths = Paths()
    tracking: TrackingParams = TrackingParams()
    environment: EnvironmentParams = EnvironmentParams()
    simulate: SimulateParams = SimulateParams()
    base_model: BaseModelParams = BaseModelParams()
    sft: SFTParams = SFTParams()
    ingest: IngestParams = IngestParams()
    gates: ValidateParams = ValidateParams()  # `validate` would shadow BaseModel.validate
    curate: CurateParams = CurateParams()
    split: SplitParams = SplitParams()
    orchestrate: OrchestrateParams = OrchestrateParams()
    registry: RegisterParams = RegisterParams()  # `register` would shadow ABCMeta.register


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
