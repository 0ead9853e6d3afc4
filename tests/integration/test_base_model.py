"""The embedded base model: its corpus knows nothing of our environment; it builds, saves,
reloads through `load_model` like a hub model, generates; the real one copies unseen ids."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from tasks import base_model as stage
from tracetune.agent.base_model import (
    build_base_model,
    config_hash,
    generate_replies,
    is_built,
    make_probes,
    run_probes,
)
from tracetune.agent.corpus import ENTITY_NOUNS, corpus_tool_names, generate_corpus
from tracetune.agent.model import load_model
from tracetune.agent.parsing import parse_assistant_output
from tracetune.config import BaseModelBuild, Params, parse_params
from tracetune.environments.support_desk import SupportDesk

TINY = BaseModelBuild(
    vocab_size=400,
    hidden_size=32,
    layers=1,
    heads=2,
    max_positions=1024,
    seq_len=1024,
    copy_warmup=0.5,
    pretrain_steps=12,
    batch_size=2,
    lr=3e-3,
    corpus_size=40,
    seed=1,
)
_VALUE = re.compile(r"[\w.+-]+@[\w.-]+|\b[A-Z]{1,3}[-_]?\d{2,}\b|\d+(?:\.\d+)?")


def _template(text: str) -> str:
    """A request with its values (emails, ids, numbers) masked: its wording only."""
    return _VALUE.sub("<v>", text.strip().lower())


@pytest.fixture(scope="module")
def corpus() -> list[dict[str, Any]]:
    return generate_corpus(3000, seed=0)


def test_corpus_shares_no_tool_name_with_support_desk(corpus: list[dict[str, Any]]) -> None:
    env_tools = set(SupportDesk().tool_names())
    assert env_tools  # the environment really lists its tools
    assert corpus_tool_names(corpus).isdisjoint(env_tools)
    env_nouns = {"customer", "order", "orders", "product", "products"}
    assert env_nouns.isdisjoint(ENTITY_NOUNS)
    for name in corpus_tool_names(corpus):
        assert env_nouns.isdisjoint(name.split("_")), name


def test_corpus_shares_no_task_goal_with_support_desk(corpus: list[dict[str, Any]]) -> None:
    env = SupportDesk()
    goals = {t.goal.strip().lower() for t in env.tasks(300, seed=0)}
    texts = [
        str(m.get("content") or "").lower()
        for conv in corpus
        for m in conv["messages"]
        if m["role"] in ("user", "system")
    ]
    blob = "\n".join(texts)
    assert not [g for g in goals if g in blob]
    corpus_templates = {_template(t) for t in texts}
    assert not {_template(g) for g in goals} & corpus_templates
    assert env.system_prompt.lower() not in blob


def test_corpus_teaches_copying_from_tool_results(corpus: list[dict[str, Any]]) -> None:
    """In multi-call requests, later arguments hold values that only a tool result contained."""
    copied = 0
    for conv in corpus:
        seen_in_results = ""
        for m in conv["messages"]:
            if m["role"] == "tool":
                seen_in_results += m["content"]
            elif m["role"] == "user":
                seen_in_results = ""
            for call in m.get("tool_calls") or ():
                for value in json.loads(call["function"]["arguments"]).values():
                    if seen_in_results and json.dumps(value) in seen_in_results:
                        copied += 1
    assert copied > 500
    families = {e for conv in corpus for e in conv["episodes"]}
    assert {"chain", "no_tool", "not_found", "parallel", "numeric_pipe"} <= families


def _params(tmp_path: Path, name_or_path: str | None = None) -> Params:
    models = tmp_path / "models"
    return parse_params(
        {
            "paths": {"models": str(models), "metrics": str(tmp_path / "metrics")},
            "base_model": {
                "name_or_path": name_or_path or str(models / "base"),
                "build": TINY.model_dump(),
            },
        }
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, dict[str, Any]]:
    """One tiny build through the stage, shared by the tests below (a build costs seconds)."""
    import tracetune.agent.base_model as bm

    params = _params(Path(tmp_path_factory.mktemp("stage")))
    old, bm.PROBES_PER_KIND = bm.PROBES_PER_KIND, 1
    try:
        return params, stage.run(params, progress=False)
    finally:
        bm.PROBES_PER_KIND = old


def test_tiny_build_learns_and_is_cached_by_config_hash(
    built: tuple[Params, dict[str, Any]],
) -> None:
    params, first = built
    out = stage.embedded_path(params)
    assert first["status"] == "built" and first["params"] > 0
    assert is_built(out, TINY) and first["config_hash"] == config_hash(TINY)
    assert not is_built(out, TINY.model_copy(update={"seed": 2}))
    info = json.loads((out / "tracetune_build.json").read_text())
    assert math.isfinite(info["pretrain"]["final_loss"])
    assert info["pretrain"]["final_loss"] < info["pretrain"]["first_loss"]  # it learned
    assert set(info["probes"]) == {
        "user_to_call_copied",
        "user_to_call_digits",
        "user_to_call_exact",
        "result_to_call_copied",
        "result_to_call_digits",
        "result_to_call_exact",
        "result_to_answer_copied",
    }
    second = stage.run(params, progress=False)
    assert second["status"] == "cached" and second["final_loss"] == first["final_loss"]
    metrics = json.loads((params.paths.metrics / "base_model.json").read_text())
    assert metrics["status"] == "cached" and metrics["config_hash"] == first["config_hash"]


def test_tiny_build_reloads_like_a_hub_model_and_generates(
    built: tuple[Params, dict[str, Any]],
) -> None:
    model, tokenizer = load_model(stage.embedded_path(built[0]), device="cpu")
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"  # what AutoTokenizer gives every stage
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|endoftext|>"
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    probe = make_probes(1, seed=5)[0]
    (reply,) = generate_replies(model, tokenizer, [(probe.messages, probe.tools)], 16)
    assert isinstance(reply, str)
    parse_assistant_output(reply)  # whatever it wrote, it parses or reports an error


def test_stage_leaves_hub_ids_and_foreign_models_alone(tmp_path: Path) -> None:
    hub = stage.run(_params(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct"), progress=False)
    assert hub["status"] == "external"
    foreign = tmp_path / "models" / "base"
    foreign.mkdir(parents=True)
    (foreign / "config.json").write_text("{}")
    assert stage.run(_params(tmp_path), progress=False)["status"] == "external"
    assert (foreign / "config.json").read_text() == "{}"


@pytest.mark.slow
def test_default_base_model_copies_unseen_ids_into_tool_calls(tmp_path: Path) -> None:
    """Behavioural: the real default copies the digits of an id from the user's text (and, less
    often, from a tool result) into a call of a tool whose name and argument name it has never
    seen; chance is ~0 for a run of 3 to 6 digits. It redraws the letters (`YM37920` ->
    `WC37920`), so the exact copy stays rare: measured on the 2026-12-07 default build, n=40,
    seed 123: digits 0.875 / 0.300, exact copies 0.025 / 0.025. Halving the pre-training
    (docs/benchmarks.md) gave bases that write ids of their own (`L-3338` for `YM37920`) and
    cost SFT 0.175 of TSR."""
    build = Params().base_model.build
    path = Path("models/base")
    if not is_built(path, build):
        path = tmp_path / "base"
        build_base_model(build, path, progress=False, probes_per_kind=1)
    model, tokenizer = load_model(path, device="cpu")
    rates = run_probes(model, tokenizer, n=40, seed=123)
    assert rates["user_to_call_digits"] >= 0.6, rates
    assert rates["result_to_call_digits"] >= 0.15, rates
