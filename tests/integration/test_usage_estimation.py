"""Usage estimation with the configured tokenizer (a real tiny base) and its fallback."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from foreign_support import foreign_runs
from params_support import paths_under, tracking_under

from tracetune.config import UsageEstimateParams
from tracetune.trajectories.io import iter_lines
from tracetune.trajectories.usage import (
    PER_MESSAGE_TOKENS,
    estimator_from_params,
    resolve_tokenizer,
)


def test_the_tokenizer_is_the_configured_one_else_the_built_base_else_the_fallback(
    tiny_base: Path, tmp_path: Path
) -> None:
    assert resolve_tokenizer("some/hub-id", str(tiny_base)) == "some/hub-id"
    assert resolve_tokenizer(None, str(tiny_base)) == str(tiny_base)
    assert resolve_tokenizer(None, str(tmp_path / "models/base")) is None  # not built yet
    assert resolve_tokenizer(None, "Qwen/Qwen2.5-0.5B-Instruct") is None  # never a download


def test_the_ingest_stage_counts_with_the_base_tokenizer(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m tasks.ingest` on logs without usage, once the base model exists: usage is
    counted with its tokenizer (billed per assistant turn), priced, and marked."""
    import yaml
    from transformers import AutoTokenizer

    from tasks import ingest as ingest_stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store params name
    foreign, _ = foreign_runs(20, seed=2)
    src = tmp_path / "logs"
    src.mkdir()
    (src / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in foreign))
    params = {
        "paths": paths_under(tmp_path),
        "tracking": tracking_under(tmp_path),
        "ingest": {"source": str(src)},
        "base_model": {"name_or_path": str(tiny_base)},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    ingest_stage.main([str(tmp_path / "params.yaml")])
    metrics = json.loads((tmp_path / "metrics/ingest.json").read_text())
    assert metrics["usage_estimated"] == metrics["accepted"] == len(foreign)
    assert metrics["usage_counted_with"] == str(tiny_base)

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    record = orjson.loads(next(iter_lines(tmp_path / "data/ingested/batches")))
    prompt = completion = context = 0
    for message in record["messages"]:
        parts = [message.get("content") or ""]
        for call in message.get("tool_calls") or ():
            parts += [call["function"]["name"], call["function"]["arguments"]]
        text = "\n".join(p for p in parts if p)
        n = len(tok.encode(text, add_special_tokens=False)) + PER_MESSAGE_TOKENS
        if message["role"] == "assistant":
            prompt, completion = prompt + context, completion + n
        context += n
    assert record["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "estimated": True,
    }
    fallback = estimator_from_params(UsageEstimateParams(), None)
    assert fallback.estimate(record["messages"]) != (prompt, completion)  # really the tokenizer
    price = UsageEstimateParams().pricing
    expected = prompt / 1000 * price.prompt_per_1k + completion / 1000 * price.completion_per_1k
    assert abs(record["cost_usd"] - expected) < 1e-6 and record["cost_estimated"] is True
