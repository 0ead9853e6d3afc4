"""The typed schema of params.yaml: the one place tunables and paths are defined.

Every section forbids unknown keys, so a typo (`sft.lerning_rate`) fails loudly with the key's
path instead of silently training with a default. Stages call `load_params()` before any work.
Every default equals the shipped params.yaml's value (tests/unit/test_config.py holds them
equal), so an omitted key means what the shipped file says.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="constructor arguments of class_path; none by default, so that a class "
        "named without kwargs gets none meant for another (SupportDesk: db_seed 1234 built in)",
    )
    grounded_arguments: bool = Field(
        True,
        description="decode the arguments the environment declares grounded (ids, emails) only"
        " from values in the conversation: evaluation and serving (tracetune.agent.grounding)",
    )


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
    early_answer: float = Field(
        0.0, ge=0, le=1, description="answers after only some of the oracle's calls"
    )
    skip_user_turn: float = Field(
        0.2,
        ge=0,
        le=1,
        description="never waits for the user: acts on the reply the user would have given"
        " (a write without the asked-for 'yes'); only episodes whose oracle asks the user",
    )


class Pricing(Section):
    """USD per 1k tokens, used for cost per task."""

    prompt_per_1k: float = Field(0.0005, ge=0)
    completion_per_1k: float = Field(0.0015, ge=0)


class SimulateParams(Section):
    n_trajectories: int = Field(6000, ge=1)
    seed: int = Field(7, ge=0)
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

    vocab_size: int = Field(2048, ge=300, description="byte-level BPE vocabulary, incl. specials")
    pretokenizer: Literal["qwen2", "isolated"] = Field(
        "qwen2",
        description="isolated: a word is the same tokens wherever it stands (copyable); "
        "qwen2: Qwen2's split, which glues a space or quote to the word after it",
    )
    hidden_size: int = Field(128, ge=16)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    max_positions: int = Field(2048, ge=64, description="longest conversation the model can see")
    seq_len: int = Field(1024, ge=32, description="packed pre-training row length in tokens")
    copy_warmup: float = Field(
        1.0,
        ge=0,
        description="copy-drill-only steps first, as a fraction of pretrain_steps (batch 2x)",
    )
    pretrain_steps: int = Field(1200, ge=1, description="steps over the whole corpus after that")
    batch_size: int = Field(4, ge=1)
    lr: float = Field(3e-3, gt=0)
    prompt_loss_weight: float = Field(
        0.25, ge=0, le=1, description="loss weight of non-assistant tokens (0: assistant-only)"
    )
    corpus_size: int = Field(8000, ge=10, description="synthetic conversations generated")
    seed: int = Field(0, ge=0)


def is_gguf_source(name_or_path: str) -> bool:
    """Whether `base_model.name_or_path` names a GGUF file (a path or `pkg://PACKAGE/FILE`)."""
    return name_or_path.startswith("pkg://") or name_or_path.lower().endswith(".gguf")


class BaseModelParams(Section):
    """The agent's base model: a hub id, a local path, or a GGUF file.

    The default `models/base` is the embedded tiny model that `tasks.base_model` builds (once,
    cached by config hash). A GGUF source (`*.gguf` or `pkg://PACKAGE/FILE.gguf`) is converted by
    the same stage into a plain checkpoint at `paths.models/base` (once, cached by the file's
    content hash), which every later stage loads (`Params.base_model_path`). Any other hub id or
    path is used as it is and nothing is built.
    """

    name_or_path: str = "models/base"
    build: BaseModelBuild = BaseModelBuild()


class LoraParams(Section):
    """LoRA adapter shape (the recipe: r=16, alpha=32)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )


class SFTParams(Section):
    """Supervised fine-tuning on golden trajectories (assistant-only loss).

    Defaults are the shipped params.yaml's, tuned for the embedded tiny base: it trains in full
    (LoRA on a 0.6M-parameter model barely learns, STACK.md); set `use_lora: true` (and the
    recipe's 2-3 epochs, a lower learning rate) for pretrained hub bases.
    """

    use_lora: bool = False
    lora: LoraParams = LoraParams()
    epochs: float = Field(4, gt=0)
    max_steps: int = Field(
        -1, ge=-1, description="-1: no limit, run the epochs; >0 caps optimizer steps"
    )
    learning_rate: float = Field(2e-3, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=32, description="longer examples are dropped, not truncated")
    batching: Literal["grouped", "packed", "padded"] = Field(
        "grouped",
        description="grouped: length-grouped batches (least padding without cross-attention cost);"
        " packed: padding-free best-fit packing (pays off with flash-attention on GPU);"
        " padded: plain random batches (TRL's default)",
    )
    share_prefix: bool = Field(
        True,
        description="run each batch's common prefix (system turn + tool schemas) once and reuse"
        " its cache for every row: same loss and gradients, about half the compute"
        " (tracetune/training/prefix.py); ignored with batching: packed",
    )
    trained_positions_only: bool = Field(
        False,
        description="on CPU, TRL's LM head projects only the positions that have a label (TRL"
        " does so on GPUs only): same loss and gradients up to float order, the step 1.33x"
        " faster on the embedded default; off by default until more runs than two decide its"
        " effect on held-out TSR (docs/benchmarks.md, Demo time)",
    )
    max_examples: int = Field(0, ge=0, description="0: all curated train examples")
    exclude_families: list[str] = Field(
        default_factory=list,
        description="task families kept out of SFT (e.g. to leave RLVR something to learn)",
    )
    family_alpha: float = Field(
        1.0,
        ge=0,
        le=1,
        description="data mix by task family: each family's share of an epoch is proportional"
        " to its count ** family_alpha (1: as logged; 0: every family equal), re-drawn per epoch;"
        " an epoch keeps the train set's size (tracetune/training/mixing.py)",
    )
    rekey_ids: list[str] = Field(
        default_factory=list,
        description="regexes of identifiers (order ids, customer ids) re-drawn consistently"
        " within each trajectory, freshly in every epoch, so the model cannot memorise the world"
        " (tracetune/training/rekey.py); []: train on the logged ids",
    )
    save_steps: int = Field(200, ge=1)
    logging_steps: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)

    @field_validator("max_steps")
    @classmethod
    def _steps_or_no_limit(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 steps trains nothing: -1 (no limit, run the epochs) or >= 1")
        return value


class RLVRRewardParams(Section):
    """Episode reward = verifier outcome + optional shaping (docs/training.md, "Rewards").

    Shaping terms are small next to the outcome (+1/-1) so that they break ties between
    failures (the tiny model's usual case) without ever outweighing a success.
    """

    success: float = 1.0
    failure: float = -1.0
    format_weight: float = Field(0.1, ge=0, description="x share of turns that parsed")
    valid_call_weight: float = Field(
        0.1, ge=0, description="x share of calls with a known tool and schema-valid arguments"
    )
    step_penalty: float = Field(0.05, ge=0, description="per extra assistant step")
    free_steps: int | None = Field(
        None,
        ge=0,
        description="steps allowed without penalty; null: the fewest steps of a successful "
        "episode in the same group (no penalty when none succeeded)",
    )
    per_call_credit: Literal["off", "reward", "token"] = Field(
        "token",
        description="ToolPO-style credit per tool call: off; reward (summed into the episode "
        "reward); token (added to the advantage of that call's tokens, centred per group)",
    )
    useful_call: float = Field(0.1, ge=0, description="valid, first-time, successful call")
    redundant_call: float = Field(0.1, ge=0, description="penalty: the same call repeated")
    failed_call: float = Field(
        0.2, ge=0, description="penalty: malformed turn, unknown tool, invalid arguments, step cap"
    )
    useful_requires_success: bool = Field(
        True, description="credit useful calls only in successful episodes (no reward hacking)"
    )


class RLVRHealthParams(Section):
    """Collapse detection (`tracetune.training.health.HealthCallback`): stop early, say why."""

    enabled: bool = True
    min_tool_call_rate: float = Field(
        0.0, ge=0, le=1, description="collapse when the share of episodes calling a tool is <= this"
    )
    tool_call_patience: int = Field(3, ge=1, description="consecutive steps at that rate")
    max_zero_advantage_share: float = Field(
        0.95, ge=0, le=1, description="collapse when more groups than this have one reward"
    )
    zero_advantage_patience: int = Field(8, ge=1, description="consecutive steps above it")


class RLVRParams(Section):
    """Stage `rlvr`: GRPO from the SFT model with rewards from the environment's verifier.

    `mode: rule` runs RLVR only when SFT's held-out TSR (`eval_sft.json` -> candidate.tsr) is
    below `when_sft_tsr_below`; `always` / `never` force it. Training tasks are drawn from the
    environment by `seed` (held-out task ids are excluded; from the `train` split when the
    environment declares one). `families: all` (or []) trains on every family the environment
    has, so the default names none of any one environment's families.
    """

    mode: Literal["rule", "always", "never"] = "rule"
    when_sft_tsr_below: float = Field(0.8, ge=0, le=1)
    use_lora: bool = Field(
        False, description="train a LoRA adapter (the SFT adapter when there is one)"
    )
    lora: LoraParams = LoraParams()
    families: list[str] = Field(
        default_factory=list, description="all (or []): every family of the environment"
    )
    n_tasks: int = Field(256, ge=1, description="training tasks drawn from the environment")
    steps: int = Field(30, ge=1, description="GRPO optimizer steps")
    group_size: int = Field(8, ge=2, description="episodes per task (GRPO's G)")
    tasks_per_step: int = Field(2, ge=1, description="tasks per step; episodes = x group_size")
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "constant"
    beta: float = Field(0.02, ge=0, description="KL coefficient against the SFT model")
    epsilon: float = Field(0.2, gt=0, description="PPO clip range")
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(64, ge=1, description="per assistant turn")
    max_episode_steps: int = Field(6, ge=1, description="assistant turns per episode")
    max_completion_tokens: int = Field(
        1024, ge=16, description="model + tool tokens after the prompt; longer episodes are cut"
    )
    rollout_batch_size: int = Field(32, ge=1, description="episodes decoded together")
    train_micro_batch: int | None = Field(
        None,
        ge=1,
        description="episodes per forward/backward in the loss, the step's gradient accumulated"
        " over the rest (a pretrained model's long traces need ~1 GB per episode); none: all"
        " of a step's episodes at once",
    )
    activation_checkpointing: bool = Field(
        False,
        description="recompute each layer's activations in backward instead of keeping them:"
        " ~30% more compute, a fraction of the memory (long traces on a pretrained model)",
    )
    screen_episodes: int = Field(
        0,
        ge=0,
        description="before training, sample this many episodes per training task from the SFT"
        " model and keep only the tasks with both a success and a failure (a GRPO group with one"
        " outcome has zero advantage and teaches nothing); 0: train on every drawn task",
    )
    save_steps: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    rewards: RLVRRewardParams = RLVRRewardParams()
    health: RLVRHealthParams = RLVRHealthParams()

    @field_validator("families", mode="before")
    @classmethod
    def _every_family(cls, value: Any) -> Any:
        """`all` is every family: the same as an empty list."""
        return [] if value == "all" else value


def _default_eval_pricing() -> dict[str, Pricing]:
    # A self-hosted small model costs a fraction of the production agent's API (simulate.pricing).
    small = Pricing(prompt_per_1k=0.0001, completion_per_1k=0.0002)
    return {"base": small, "sft": small, "rlvr": small}


class EvaluateParams(Section):
    """Stage `evaluate`: a model's rollouts on the held-out tasks against two baselines.

    Model paths: `models[name]` when given, else `base_model.name_or_path` for `base` and
    `paths.models/<name>/merged` otherwise (the SFT and RLVR stages' merged models).
    `pricing[name]` prices each evaluated model's tokens (USD per 1k); the production baseline
    keeps its logged cost.
    """

    max_tasks: int = Field(200, ge=1, description="held-out tasks evaluated (families in turn)")
    batch_size: int = Field(32, ge=1, description="episodes decoded together")
    max_new_tokens: int = Field(96, ge=1, description="per assistant turn")
    max_turns: int | None = Field(
        None,
        ge=1,
        description="assistant turns per episode; null: the environment's own "
        "(Environment.max_turns: environment.max_steps + 1 unless it says otherwise)",
    )
    greedy: bool = True
    temperature: float = Field(1.0, gt=0, description="when greedy is false")
    seed: int = Field(0, ge=0)
    decoder: Literal["loop", "hf"] = Field(
        "loop", description="loop: tracetune's KV-cached batch decoder; hf: model.generate"
    )
    models: dict[str, str] = Field(default_factory=dict, description="name -> hub id or path")
    pricing: dict[str, Pricing] = Field(default_factory=_default_eval_pricing)


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
    min_margin_vs_floor: float = Field(
        0.05, ge=-1, le=1, description="TSR gain over the do-nothing floor (eval's baseline_floor)"
    )
    champion_non_inferiority_margin: float = Field(0.1, ge=0, le=1)
    use_confidence_intervals: bool = True


class RegisterParams(Section):
    """Stage `register` and promotion: gate, approval and the registry lock."""

    candidate: str = Field("rlvr", description="eval_<candidate>.json / models/<candidate>")
    gate: GateParams = GateParams()
    auto_approve: bool = Field(False, description="skip the human approval (never in production)")
    approval_timeout_s: int = Field(86_400, ge=1, description="the approval flow's pause")
    lock_timeout_s: float = Field(120.0, gt=0, description="wait for a concurrent promotion")


# Structured keys that hold PII wherever they appear, and what makes `name` a person's name.
PII_KEYS: tuple[str, ...] = (
    "first_name",
    "last_name",
    "full_name",
    "middle_name",
    "customer_name",
    "contact_name",
    "address",
    "street",
    "street_address",
    "address_line1",
    "address_line2",
    "zip",
    "zip_code",
    "postal_code",
    "postcode",
    "phone",
    "phone_number",
    "mobile",
    "ssn",
    "date_of_birth",
    "dob",
)
PERSON_KEYS: tuple[str, ...] = (
    "customer_id",
    "user_id",
    "account_id",
    "person_id",
    "email",
    "phone",
    "first_name",
    "last_name",
    "address",
)


class PiiParams(Section):
    """PII scrub, applied at ingest so that nothing versioned ever holds PII (docs/data.md).

    Values become keyed pseudonyms (HMAC of the value): the same email is the same pseudonym in
    the user text, the tool arguments and the tool results, so trajectories stay coherent.
    """

    enabled: bool = True
    emails: bool = True
    phones: bool = True
    cards: bool = True
    ssns: bool = Field(True, description="US social security numbers (AAA-GG-SSSS)")
    card_luhn: bool = Field(True, description="only Luhn-valid card-like numbers count as cards")
    phone_region: str = Field(
        "US", min_length=2, max_length=2, description="region of phone numbers without +country"
    )
    phone_min_digits: int = Field(8, ge=5, le=15, description="shorter numbers are not phones")
    keys: list[str] = Field(
        default_factory=lambda: list(PII_KEYS),
        description="keys whose values in structured tool results/arguments are PII",
    )
    keys_beside: dict[str, list[str]] = Field(
        default_factory=lambda: {"name": list(PERSON_KEYS)},
        description="keys that are PII only in an object that also holds one of these keys"
        " (`name` of a customer, not of a product)",
    )
    key_env: str = Field(
        "TRACETUNE_PII_KEY", description="environment variable holding the pseudonym secret"
    )
    key_block: str | None = Field(
        None, description="Prefect Secret block holding the secret (read when key_env is unset)"
    )
    demo_key_file: Path = Field(
        Path(".tracetune/pii.key"),
        description="the embedded demo's random per-workspace key (gitignored, dvcignored)",
    )
    at_serving: bool = Field(
        True,
        description="evaluation, RLVR and serving show the model pseudonymised text, as in"
        " its training data, and restore the values in its tool calls and answers",
    )

    @field_validator("phone_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        """An unknown region would make every national-form number pass unnoticed."""
        import phonenumbers

        region = value.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a region phonenumbers knows (ISO 3166, e.g. US)")
        return region


class FieldMapping(Section):
    """How to read logs whose layout differs from ours; empty = our own layout (docs/data.md)."""

    fields: dict[str, str] = Field(
        default_factory=dict, description="our field (dotted) <- their field (dotted)"
    )
    success_from_reward: str | None = Field(
        None,
        description="their reward/score field (a number, a boolean, a numeric string or a"
        " yes/no, pass/fail label); success = score >= success_threshold",
    )
    success_threshold: float = 0.5
    derive_id: list[str] | Literal["content"] | None = Field(
        None,
        description="when a record logs no trajectory_id: 'content' (a hash of the record as"
        " read) or their fields (dotted) joined by ':' (e.g. [task_id, trial])",
    )
    roles: dict[str, str] = Field(default_factory=dict, description="their role -> ours")
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="values for fields their logs lack"
    )
    drop: list[str] = Field(default_factory=list, description="their extra fields to ignore")
    derive_steps: bool = Field(False, description="count steps from the messages when absent")


class S3RetryParams(Section):
    """How ingest rides out a slow or flaky S3 store (docs/data.md, docs/reliability.md).

    Every request and every stalled or broken body read is retried with exponential backoff;
    a read resumes at the byte where it stopped. After `attempts` failed tries in a row the stage
    fails and commits nothing: a transport fault is never mistaken for a truncated object.
    """

    attempts: int = Field(5, ge=1, description="tries per request or stalled read, then fail")
    backoff_s: float = Field(1.0, ge=0, description="wait before the first retry; doubles each")
    max_backoff_s: float = Field(30.0, ge=0, description="cap on one wait")
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0, description="a body silent this long is a stall")


class UsageEstimateParams(Section):
    """Token usage and cost for logs that carry none (docs/data.md, "Usage estimation").

    Estimated values are marked (`usage.estimated`, `cost_estimated`) and never judged by a gate.
    """

    enabled: bool = Field(True, description="estimate missing usage/cost (false: quarantine)")
    tokenizer: str | None = Field(
        None,
        description="tokenizer to count with (path or hub id); null: base_model.name_or_path "
        "when it is on disk, else `chars_per_token`",
    )
    chars_per_token: float = Field(
        4.0, gt=0, description="the fallback count when no tokenizer is available"
    )
    pricing: Pricing = Field(
        default_factory=Pricing, description="USD per 1k tokens for the estimated cost"
    )


LogFormat = Literal["auto", "tracetune", "openai_chat", "otel_genai", "mlflow_traces"]


class IngestParams(Section):
    """Stage `ingest`: where logs come from, and what a batch may quarantine."""

    source: str = Field("data/raw_logs", description="a local folder/file or s3://bucket/prefix")
    mlflow_experiment: str | None = Field(
        None,
        description="also read the traces of this MLflow experiment (name or id) in the"
        " project's tracking store (tracking.tracking_uri); null: none",
    )
    format: LogFormat = Field(
        "auto",
        description="how to read each log object (docs/data.md); auto: recognised by content,"
        " an object no reader recognises fails the stage",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible store (MinIO, moto)")
    s3_retry: S3RetryParams = S3RetryParams()
    max_quarantine_rate: float = Field(0.05, ge=0, le=1)
    workers: int = Field(1, ge=1, description="parser processes (1: in-process)")
    full_refresh: bool = Field(False, description="forget the watermark, re-ingest everything")
    mapping: FieldMapping = FieldMapping()
    pii: PiiParams = PiiParams()
    usage: UsageEstimateParams = UsageEstimateParams()

    @field_validator("source")
    @classmethod
    def _not_mlflow(cls, value: str) -> str:
        if value.startswith("mlflow:"):
            raise ValueError(
                "MLflow traces are read through ingest.mlflow_experiment: DVC tracks"
                " ingest.source as the stage's dependency and cannot hash an mlflow:// URL"
            )
        return value


class RawGateParams(Section):
    """Gate on an ingested batch. Production logs hold failed, messy episodes: faults the agent
    makes (malformed JSON, unknown tools) are bounded by `mostly`; what a logger must always get
    right (answered calls, an assistant turn, sane logged costs and times) is near-strict."""

    roles_ok_mostly: float = Field(0.99, ge=0, le=1)
    answered_calls_mostly: float = Field(0.99, ge=0, le=1)
    args_json_mostly: float = Field(0.85, ge=0, le=1)
    known_tools_mostly: float = Field(0.85, ge=0, le=1)
    steps_consistent_mostly: float = Field(0.99, ge=0, le=1)
    tool_error_free_mostly: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of trajectories with no failed tool call (tool_errors): below it,"
        " a tool or the environment was down",
    )
    max_steps: int = Field(100, ge=1)
    max_total_tokens: int = Field(2_000_000, ge=1)
    max_cost_usd: float = Field(5.0, gt=0)
    max_latency_s: float = Field(3600.0, gt=0)
    min_timestamp: datetime = datetime(2020, 1, 1, tzinfo=UTC)
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
    workers: int = Field(1, ge=1, description="processes deriving gate columns (1: in-process)")


def _tool_error_defaults() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from tracetune.trajectories.tool_errors import DEFAULT_KEYS, DEFAULT_PATTERNS

    return DEFAULT_KEYS, DEFAULT_PATTERNS


class ToolErrorParams(Section):
    """What counts as a failed tool call in a tool message (tracetune/trajectories/tool_errors.py).

    One rule for curation's error-retry filter, the raw gate and the evaluation reports.
    """

    json_keys: list[str] = Field(
        default_factory=lambda: list(_tool_error_defaults()[0]),
        description="a JSON-object result with one of these keys set (not null/false/empty)",
    )
    text_patterns: list[str] = Field(
        default_factory=lambda: list(_tool_error_defaults()[1]),
        description="regexes (Python `re.search`) for text results",
    )
    from_environment: bool = Field(
        True, description="also what the environment declares (tool_error_keys/_patterns)"
    )

    @field_validator("text_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        import re

        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {pattern!r} does not compile: {exc}") from None
        return patterns


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
    seed: int = Field(13, ge=0)


class OrchestrateParams(Section):
    """The Prefect flow's own behaviour (flows/retrain.py); stage commands stay in dvc.yaml.

    Schedules, work pools and images are deploy-time settings and live in prefect.yaml only.
    """

    dvc_push: bool = Field(True, description="push the ingested snapshot, then all outs")
    dvc_pull: bool = Field(False, description="pull the DVC cache first (no shared workspace)")
    transient_retries: int = Field(3, ge=0, description="S3/network retries; training: never")
    retry_delay_s: float = Field(10.0, ge=0)
    progress_every_s: float = Field(
        120.0, gt=0, description="a progress bar's line in the run log: per 25% or this often"
    )
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
    approval_deployment: str = Field(
        "approval/approval", description="`flow/deployment` a registered challenger waits in"
    )


class Params(Section):
    paths: Paths = Paths()
    tracking: TrackingParams = TrackingParams()
    environment: EnvironmentParams = EnvironmentParams()
    simulate: SimulateParams = SimulateParams()
    base_model: BaseModelParams = BaseModelParams()
    sft: SFTParams = SFTParams()
    rlvr: RLVRParams = RLVRParams()
    evaluate: EvaluateParams = EvaluateParams()
    ingest: IngestParams = IngestParams()
    gates: ValidateParams = ValidateParams()  # `validate` would shadow BaseModel.validate
    curate: CurateParams = CurateParams()
    tool_errors: ToolErrorParams = ToolErrorParams()
    split: SplitParams = SplitParams()
    orchestrate: OrchestrateParams = OrchestrateParams()
    registry: RegisterParams = RegisterParams()  # `register` would shadow ABCMeta.register

    def base_model_path(self) -> str:
        """What later stages load as the base: the converted checkpoint for a GGUF source."""
        name = self.base_model.name_or_path
        return str(self.paths.models / "base") if is_gguf_source(name) else name


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; errors name the offending key path (e.g. `sft.lr`)."""
    path = Path(path)
    return parse_params(read_yaml(path, "params file"), source=str(path))


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content ({} when empty); a missing or malformed file is a `ParamsError`
    naming the file, so params files and profiles fail the same way."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ParamsError(f"{what} not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc


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


def check_environment(params: EnvironmentParams, source: str = "params") -> None:
    """Import `environment.class_path` and build it with `environment.kwargs`, as every stage
    will: a path that does not import, a class that is not an `Environment`, or arguments its
    constructor refuses fail here with the file and key, not later as a stage's traceback."""
    import importlib

    from tracetune.environments.base import Environment

    def fail(key: str, message: str) -> ParamsError:
        return ParamsError(f"{source}: 1 invalid value(s)\n  environment.{key}: {message}")

    path = params.class_path
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise fail("class_path", f"'{path}' must be 'module.Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import can fail in any way: missing module, its own bug
        raise fail("class_path", f"cannot import '{module_name}': {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise fail("class_path", f"module '{module_name}' has no attribute '{attr}'")
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise fail("class_path", f"'{path}' is not a tracetune Environment subclass")
    try:
        env = cls(**params.kwargs)  # as the stages build it (load_environment)
    except Exception as exc:
        raise fail(
            "kwargs", f"{cls.__name__}(**kwargs) failed: {type(exc).__name__}: {exc}"
        ) from None
    try:  # a constructor may only store its arguments; drawing one task uses them
        env.tasks(1, seed=0)
    except Exception as exc:
        raise fail(
            "kwargs", f"{cls.__name__}(**kwargs).tasks(1) failed: {type(exc).__name__}: {exc}"
        ) from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping's leaves (lists and empty mappings are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out |= flatten(value, dotted)
        else:
            out[dotted] = value
    return out


def load_profile(path: Path | str) -> dict[str, Any]:
    """A profile (e.g. params-smollm2.yaml) as dotted-key overrides of params.yaml.

    A profile is a partial params tree in the same schema: only the keys it changes. It is
    validated here against the defaults, and again merged over params.yaml when applied
    (`tracetune run --profile`), so a typo fails before anything runs.
    """
    path = Path(path)
    raw = read_yaml(path, "profile")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: a profile is a mapping of params.yaml sections")
    parse_params(raw, source=str(path))
    return flatten(raw)


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`key.path=value` strings (values read as YAML: numbers, booleans, lists) as overrides."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"expected key.path=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out
