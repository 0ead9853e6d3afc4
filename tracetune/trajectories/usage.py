"""What a log leaves out that every later stage needs: token usage, cost and the final answer.

Many harnesses log no token usage (or zeros). The schema, the gates and the evaluation's cost
column need it, so ingest estimates it instead of quarantining the line or letting a gate fail
every row: the conversation is counted the way a chat API bills it (each assistant turn is one
call whose prompt is everything before it), with the configured tokenizer, or, before any
tokenizer exists (ingest runs before the base model is built), at `chars_per_token` characters
per token. The cost is priced with `ingest.usage.pricing`. Both are marked (`usage.estimated`,
`cost_estimated`) in the data; gates skip them and the evaluation report shows their share.

The final answer is the text of the last assistant message that has any
(`schema.final_answer`): the conversation may end with the user's goodbye or a tool result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracetune.config import Pricing, UsageEstimateParams
from tracetune.trajectories.schema import final_answer, message_text

PER_MESSAGE_TOKENS = 4  # role and turn markers around each message (ChatML: 3 to 5)
FALLBACK = "chars_per_token"


@dataclass
class UsageEstimator:
    """Counts tokens of a conversation and prices them; picklable (the tokenizer loads lazily
    in the process that counts)."""

    tokenizer: str | None = None
    chars_per_token: float = 4.0
    pricing: Pricing = field(default_factory=Pricing)
    enabled: bool = True
    _tok: Any = field(default=None, repr=False, compare=False)

    @property
    def source(self) -> str:
        """What counts the tokens, for the report."""
        return self.tokenizer or f"{FALLBACK}={self.chars_per_token:g}"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_tok": None}

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self.tokenizer is None:
            return math.ceil(len(text) / self.chars_per_token)
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.tokenizer)
        return len(self._tok.encode(text, add_special_tokens=False))

    def message_tokens(self, message: dict[str, Any]) -> int:
        return self.count(message_text(message)) + PER_MESSAGE_TOKENS

    def estimate(self, messages: list[dict[str, Any]]) -> tuple[int, int]:
        """(prompt, completion) tokens: each assistant turn is billed the context before it."""
        prompt = completion = context = 0
        for message in messages:
            n = self.message_tokens(message)
            if message.get("role") == "assistant":
                prompt += context
                completion += n
            context += n
        return prompt, completion

    def cost(self, prompt: int, completion: int) -> float:
        p = self.pricing
        return round(prompt / 1000 * p.prompt_per_1k + completion / 1000 * p.completion_per_1k, 8)

    def complete(self, record: dict[str, Any]) -> bool:
        """Fill in (in place) the final answer, usage and cost a record lacks; True when usage
        or cost was estimated. Records that are not trajectories are left to the schema."""
        messages = record.get("messages")
        if not isinstance(messages, list):
            return False
        messages = [m for m in messages if isinstance(m, dict)]
        if record.get("final_answer") is None:
            answer = final_answer(messages)
            if answer is not None:
                record["final_answer"] = answer
        if not self.enabled:
            return False
        estimated = False
        usage = record.get("usage")
        if not _logged_usage(usage):
            prompt, completion = self.estimate(messages)
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "estimated": True}
            record["usage"] = usage
            estimated = True
        cost = record.get("cost_usd")
        no_cost = cost is None or (estimated and cost == 0)  # a zero beside zero usage: unlogged
        if no_cost and isinstance(usage, dict):
            tokens = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
            if all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                record["cost_usd"] = self.cost(*tokens)  # type: ignore[arg-type]
                record["cost_estimated"] = True
                estimated = True
        return estimated


def _logged_usage(usage: Any) -> bool:
    """Usage a harness really logged: some token count above zero (zeros are a placeholder: no
    conversation with an assistant turn used no tokens)."""
    if not isinstance(usage, dict):
        return False
    counts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens")]
    numbers = [c for c in counts if isinstance(c, int | float) and not isinstance(c, bool)]
    return len(numbers) == 2 and sum(numbers) > 0


def resolve_tokenizer(configured: str | None, base_model: str | None) -> str | None:
    """The tokenizer to count with: the configured one, else the base model's when it is on
    disk with a tokenizer (it may not be built yet: ingest runs first), else None (fallback)."""
    if configured:
        return configured
    if base_model:
        folder = Path(base_model)
        if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
            return str(folder)
    return None


def estimator_from_params(params: UsageEstimateParams, base_model: str | None) -> UsageEstimator:
    return UsageEstimator(
        tokenizer=resolve_tokenizer(params.tokenizer, base_model),
        chars_per_token=params.chars_per_token,
        pricing=params.pricing,
        enabled=params.enabled,
    )
