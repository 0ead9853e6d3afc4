"""The world as the model learned it: an environment seen through the ingest's pseudonymisation.

Why: ingest replaces PII in production logs with keyed pseudonyms, so a fine-tuned model has
only ever read `mara.lind…@example.com` and `"name": "<name:…>"`. Evaluated against the raw
environment it meets real addresses and names for the first time, and the small model misread
fields it had learned to read (measured on the embedded default: SFT TSR 0.755 -> 0.530 once
names were pseudonymised at ingest). Serving a model behind the same reversible
pseudonymisation it was trained behind is the usual fix (a "reversible anonymiser" at the model
boundary): the model reads pseudonyms, the world receives real values.

`PseudonymisedEnvironment` wraps any environment: every message the model reads (the opening
messages, tool results, the user's later turns) passes through the same `Scrubber` ingest uses,
with the episode's earlier messages as context (a name found by key in one result is replaced
in the next); every value the model sends back (tool arguments, the messages and answer the
verifier judges) has its pseudonyms restored from an in-memory map that never leaves the
process. Evaluation, RLVR and `tracetune predict` use it when `ingest.pii.at_serving` is on and
ingest scrubs (`model_env_factory`); the simulator and the data stages see the raw world.

Known limit: ingest scrubs a whole logged conversation at once, so a name the user typed before
any tool result named it is replaced there too; live, the user's first message is scrubbed
before any result exists, and only detector-found values (emails, phones, cards) are replaced in
it (docs/data.md "PII at serving").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracetune.environments.base import (
    Call,
    Environment,
    EpisodeRecord,
    Grounded,
    Observation,
    Outcome,
    Solver,
    Task,
    Tool,
)
from tracetune.trajectories.pii import Scrubber, restore_pseudonyms

if TYPE_CHECKING:
    from tracetune.config import Params


class PseudonymisedEnvironment(Environment):
    """`inner` with pseudonymised observations and restored actions (module docstring).

    Everything else (tasks, tools, splits, oracle, caps) is the inner environment's.
    """

    def __init__(self, inner: Environment, scrubber: Scrubber) -> None:  # no super(): delegates
        if scrubber.originals is None:
            raise ValueError("the scrubber must remember originals (Scrubber(remember=True))")
        self.inner = inner
        self.scrubber = scrubber
        self.name = inner.name
        self.system_prompt = inner.system_prompt
        self.tool_error_keys = inner.tool_error_keys
        self.tool_error_patterns = inner.tool_error_patterns
        self._seen: list[str] = []  # the episode's raw texts so far: context for keyed values

    # --- what the model reads ------------------------------------------------------------
    def reset(self, task: Task) -> list[dict[str, Any]]:
        self._seen = []
        return [self._shown_message(m) for m in self.inner.reset(task)]

    def step(self, call: Call) -> Observation:
        obs = self.inner.step(replace(call, arguments=self._restored_arguments(call.arguments)))
        return replace(obs, content=self._shown(obs.content))

    def user_reply(self, messages: Sequence[dict[str, Any]]) -> str | None:
        reply = self.inner.user_reply(self._restored_messages(messages))
        return None if reply is None else self._shown(reply)

    # --- what the world receives ---------------------------------------------------------
    def verify_episode(self, episode: EpisodeRecord) -> Outcome:
        return self.inner.verify_episode(
            replace(
                episode,
                messages=self._restored_messages(episode.messages),
                final_answer=self.restore(episode.final_answer),
            )
        )

    def verify(self, final_answer: str | None) -> Outcome:
        return self.inner.verify(self.restore(final_answer))

    def restore(self, text: str | None) -> str | None:
        """`text` with the real values back in place of the pseudonyms the model copied."""
        if text is None:
            return None
        return restore_pseudonyms(text, self._originals)

    # --- the rest is the inner environment's ---------------------------------------------
    @property
    def task(self) -> Task | None:  # type: ignore[override]
        return self.inner.task

    @property
    def max_steps(self) -> int:  # type: ignore[override]
        return self.inner.max_steps

    @property
    def max_turns(self) -> int:
        return self.inner.max_turns

    def _tools(self) -> Sequence[Tool]:
        return self.inner._tools()

    def _reset(self, task: Task) -> None:
        self.inner._reset(task)

    def tasks(self, n: int, seed: int, families: Sequence[str] | None = None) -> list[Task]:
        return self.inner.tasks(n, seed, families)

    def families(self) -> list[str]:
        return self.inner.families()

    def task_by_id(self, task_id: str) -> Task:
        return self.inner.task_by_id(task_id)

    def task_count(self, families: Sequence[str] | None = None) -> int | None:
        return self.inner.task_count(families)

    def splits(self) -> Mapping[str, Sequence[str]] | None:
        return self.inner.splits()

    def oracle(self, task: Task) -> Solver | None:
        return self.inner.oracle(task)

    def tool_schemas(self) -> list[dict[str, Any]]:
        return self.inner.tool_schemas()

    def grounded_arguments(self) -> dict[str, dict[str, Grounded]]:
        return self.inner.grounded_arguments()

    def tool_names(self) -> list[str]:
        return self.inner.tool_names()

    def read_only_tools(self) -> set[str]:
        return self.inner.read_only_tools()

    def terminating_tools(self) -> set[str]:
        return self.inner.terminating_tools()

    # --- helpers -------------------------------------------------------------------------
    @property
    def _originals(self) -> dict[str, str]:
        return self.scrubber.originals or {}

    def _shown(self, text: str) -> str:
        """One new text as ingest would have written it, the episode so far as context."""
        scrubbed = self.scrubber.scrub_obj({"seen": list(self._seen), "new": text})
        self._seen.append(text)
        return str(scrubbed["new"])

    def _shown_message(self, message: dict[str, Any]) -> dict[str, Any]:
        content = message.get("content")
        if not isinstance(content, str):
            return message
        return {**message, "content": self._shown(content)}

    def _restored_messages(self, messages: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
        return tuple(_restore_obj(dict(m), self._originals) for m in messages)

    def _restored_arguments(self, arguments: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(arguments, dict):
            return _restore_obj(dict(arguments), self._originals)
        try:
            decoded = json.loads(arguments)
        except (TypeError, ValueError):
            return restore_pseudonyms(arguments, self._originals)  # broken JSON stays broken
        if isinstance(decoded, dict | list):
            return json.dumps(_restore_obj(decoded, self._originals), ensure_ascii=False)
        return arguments


def _restore_obj(obj: Any, originals: dict[str, str]) -> Any:
    """A JSON-like value with pseudonyms restored in every string (a new value, not in place)."""
    if isinstance(obj, str):
        return restore_pseudonyms(obj, originals)
    if isinstance(obj, dict):
        return {k: _restore_obj(v, originals) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_restore_obj(v, originals) for v in obj]
    return obj


def serves_pseudonymised(params: Params) -> bool:
    """True when the model must meet the world as its training data showed it."""
    pii = params.ingest.pii
    return pii.enabled and pii.at_serving


def model_env_factory(
    params: Params, max_steps: int | None = None, root: Path | None = None
) -> Callable[[], Environment]:
    """Fresh environments for a model to act in (evaluation, RLVR, serving): the configured
    environment, behind the ingest's pseudonymisation when `serves_pseudonymised(params)`.

    One scrubber (and its pseudonym map) is shared by the factory's environments: pseudonyms
    are a function of the value and the key, so the map is the same whoever fills it.
    """
    from tracetune.agent.rollout import env_factory_from_params

    plain = env_factory_from_params(params.environment, max_steps)
    if not serves_pseudonymised(params):
        return plain
    from tracetune.trajectories.pii import key_for

    key = key_for(params, root)
    scrubber = Scrubber(params.ingest.pii, key.value, remember=True)
    return lambda: PseudonymisedEnvironment(plain(), scrubber)
