"""The serving check: load `models:/<name>@champion` from the registry and let it act.

Why an episode and not a text completion: what we promote is an *agent*. Loading the weights
proves little; running one task in the tool environment through the same rollout engine that
evaluation uses (`tracetune.agent.rollout`) proves the registered artifact carries everything
an agent needs: weights, tokenizer, chat template with tool calls, stop tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tracetune.config import Params

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tracetune.environments.base import Environment, Task


@dataclass(frozen=True)
class EpisodeReport:
    """One served episode, as `tracetune predict` prints it."""

    model_uri: str
    version: str | None
    task_id: str
    family: str
    goal: str
    success: bool
    reward: float
    steps: int
    ended_by: str
    failure: str | None
    final_answer: str | None
    seconds: float
    messages: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def alias_uri(name: str, alias: str) -> str:
    return f"models:/{name}@{alias}"


def prepare_for_agent(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """What `tracetune.agent.model.load_model` does after loading, for a registry load:
    left padding, a pad token, our chat template if needed, and stop at end of turn."""
    from tracetune.agent.model import stop_token_ids
    from tracetune.agent.template import END_OF_TEXT, ensure_chat_template

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = END_OF_TEXT if END_OF_TEXT in vocab else tokenizer.eos_token
    ensure_chat_template(tokenizer)
    model.eval()
    gen: Any = model.generation_config
    if gen is not None:
        current = gen.eos_token_id
        eos = [current] if isinstance(current, int) else list(current or [])
        gen.eos_token_id = sorted(set(eos) | set(stop_token_ids(tokenizer)))
        gen.pad_token_id = tokenizer.pad_token_id


def load_registered_agent(
    model_uri: str, device: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer of a registered version, through MLflow's transformers flavor."""
    import mlflow

    from tracetune.agent.model import pick_device_dtype

    components = mlflow.transformers.load_model(model_uri, return_type="components")
    model, tokenizer = components["model"], components["tokenizer"]
    device, _ = pick_device_dtype(device)
    model.to(device)
    prepare_for_agent(model, tokenizer)
    return model, tokenizer


def pick_task(env: Environment, task_id: str | None, seed: int) -> Task:
    """The named task, or the first of a seeded draw."""
    from tracetune.registry.client import RegistryError

    if not task_id:
        return env.tasks(1, seed=seed)[0]
    try:
        return env.task_by_id(task_id)
    except (KeyError, ValueError) as exc:
        example = env.tasks(1, seed=seed)[0].id
        raise RegistryError(
            f"no task {task_id!r} in environment {env.name} ({exc.args[0] if exc.args else exc}); "
            f"task ids look like {example!r}, or leave out --task-id for a drawn task"
        ) from None


def missing_alias_hint(model: str, alias: str) -> str:
    """What to do when an alias is unset: each alias is set by a different step."""
    from tracetune.registry.client import CHALLENGER, CHAMPION

    if alias == CHAMPION:
        return f"approve a challenger first (`tracetune approve {model} VERSION --by NAME`)"
    if alias == CHALLENGER:
        return (
            "a version becomes challenger when it passes the promotion gate at registration "
            "(`dvc repro register`); `tracetune registry status` shows each version's verdict"
        )
    return f"`tracetune registry status {model}` lists the aliases that exist"


def run_episode(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    params: Params,
    task: Task,
    *,
    name: str = "champion",
    max_new_tokens: int = 128,
) -> tuple[Any, float, str | None]:
    """One greedy episode through the rollout engine; (RolloutResult, seconds, the answer the
    user receives: pseudonyms the model copied restored to the real values)."""
    from tracetune.agent.rollout import ModelPolicy, RolloutConfig, run_rollouts
    from tracetune.environments.pseudonymised import PseudonymisedEnvironment, model_env_factory

    env = model_env_factory(params)()  # the world as the training data showed it
    # The evaluation's turn limit (by default the environment's own), so a served episode
    # gets the turns an evaluated one gets.
    turns = params.evaluate.max_turns or env.max_turns
    config = RolloutConfig(
        max_new_tokens=max_new_tokens, max_turns=turns, batch_size=1, greedy=True
    )
    grounding = params.environment.grounded_arguments
    policy = ModelPolicy.from_config(model, tokenizer, name, config, grounding=grounding)
    started = time.perf_counter()
    (result,) = run_rollouts(
        [task],
        policy,
        lambda: env,
        config,
        pricing=params.simulate.pricing,
        id_prefix=f"predict-{name}",
        progress=False,
    )
    seconds = time.perf_counter() - started
    answer = result.trajectory.final_answer
    if isinstance(env, PseudonymisedEnvironment):
        answer = env.restore(answer)
    return result, seconds, answer


def predict(
    params: Params,
    model_name: str | None = None,
    alias: str = "champion",
    *,
    task_id: str | None = None,
    seed: int = 0,
    max_new_tokens: int = 128,
) -> EpisodeReport:
    """Load `models:/<name>@<alias>` and run one episode in the configured environment."""
    from tracetune.environments.base import load_environment
    from tracetune.registry.client import RegistryError, open_registry

    registry = open_registry(params.tracking, model_name)
    version = registry.alias(alias)
    if version is None:
        raise RegistryError(
            f"{registry.name} has no @{alias}; {missing_alias_hint(registry.name, alias)}"
        )
    env = load_environment(params.environment.class_path, **params.environment.kwargs)
    task = pick_task(env, task_id, seed)  # before the model loads: a typo fails at once
    uri = alias_uri(registry.name, alias)
    model, tokenizer = load_registered_agent(uri)
    result, seconds, answer = run_episode(
        model, tokenizer, params, task, name=f"{registry.name}-v{version}",
        max_new_tokens=max_new_tokens,
    )  # fmt: skip
    traj = result.trajectory
    return EpisodeReport(
        model_uri=uri,
        version=version,
        task_id=task.id,
        family=task.family,
        goal=task.goal,
        success=bool(result.outcome.success),
        reward=float(result.outcome.reward),
        steps=int(traj.steps),
        ended_by=result.ended_by,
        failure=traj.failure,
        final_answer=answer,
        seconds=round(seconds, 3),
        messages=[m.model_dump(exclude_none=True) for m in traj.messages],
    )
