"""A foreign harness's logs through the data stages and a short SFT, on the defaults of
params.yaml (issue 18, items 3 to 5): conversations that end with the user's goodbye or a
hand-off tool's result, no usage logged, plain-text `Error: ...` tool results, a long policy as
the system prompt and conversations of several thousand tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from foreign_support import foreign_runs, long_policy
from params_support import paths_under

from tracetune.config import parse_params
from tracetune.environments.support_desk import SupportDesk
from tracetune.training.sft import train_sft

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_foreign_logs_go_ingest_gate_curate_split_sft_on_defaults(
    tiny_base: Path, tmp_path: Path
) -> None:
    from tasks import curate, split, validate_raw
    from tasks import ingest as ingest_stage

    foreign, ours = foreign_runs(150, seed=21)
    policy = long_policy(20)  # ~2.7k tokens on the tiny tokenizer
    for record in foreign:
        record["messages"][0]["content"] = policy
    src = tmp_path / "logs"
    src.mkdir()
    (src / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in foreign))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())  # the defaults
    raw["paths"] = paths_under(tmp_path)
    raw["ingest"]["source"] = str(src)
    params = parse_params(raw)

    ingested = ingest_stage.run(params)
    assert ingested["accepted"] == len(foreign) and ingested["usage_estimated"] == len(foreign)
    gate = validate_raw.run(params)
    assert gate["success"], gate
    curated = curate.run(params)
    retried = sum(1 for r in ours if r["error_retries"] > 0)
    assert curated["failing_by_rule"]["error_retries"] >= retried > 0
    assert curated["kept"] > 20
    split.run(params)
    train = params.paths.curated_dir / "train.jsonl"
    sft = params.sft.model_copy(update={"max_steps": 2, "logging_steps": 1})
    result = train_sft(
        sft,
        str(tiny_base),
        train,
        SupportDesk().tool_schemas(),
        tmp_path / "models/sft",
        tmp_path / "models/ck",
    )
    assert result.steps == 2 and result.max_length == params.sft.max_length == 2048
    assert result.cuts["windowed"] > 0 and result.cuts["turns_dropped"] == 0
    assert result.cuts["system_prompts_cut"] == result.cuts["windowed"]
