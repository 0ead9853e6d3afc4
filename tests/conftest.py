"""Shared fixtures: real parts only (a real environment, real params files in tmp dirs)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracetune.config import parse_params
from tracetune.environments.support_desk import SupportDesk

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests ingest from temporary folders, which is production for the PII key rule (docs/data.md):
# a test-only secret; tests of the refusal and of the demo key remove it.
os.environ.setdefault("TRACETUNE_PII_KEY", "tests-only-pii-pseudonym-key")


@pytest.fixture(autouse=True)
def _process_state_restored() -> Iterator[None]:
    """Each test leaves the process as it found it: the environment variables, and MLflow's
    global tracking URI (`mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI, which
    tracetune reads as an override; the flow exports TRACETUNE_PREFECT_* for its stages).
    Without this, a test's outcome depended on which tests ran before it in the process."""
    import sys

    saved = dict(os.environ)
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    uri = getattr(utils, "_tracking_uri", None)
    yield
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None and getattr(utils, "_tracking_uri", None) != uri:
        utils._tracking_uri = uri  # without set_tracking_uri: it would export the variable
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def env() -> SupportDesk:
    return SupportDesk()


@pytest.fixture
def in_tmp(tmp_path: Path) -> Iterator[Path]:
    """Run the test from an empty working directory (stages use relative paths)."""
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny base model (our tokenizer, chat template, a few pre-training steps).

    Built once per test session through the same builder as the embedded default, so every
    test that trains or rolls out uses the real loading path (`from_pretrained`).
    """
    from tracetune.agent.base_model import build_base_model
    from tracetune.config import BaseModelBuild

    out = tmp_path_factory.mktemp("tiny_base") / "model"
    build = BaseModelBuild(pretrain_steps=4, corpus_size=80, batch_size=2, seq_len=512)
    build_base_model(build, out, progress=False, probes_per_kind=0)
    return out


@pytest.fixture(scope="session")
def golden_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small train.jsonl of clean successful simulated trajectories (recipe's golden rule)."""
    from tracetune.trajectories.simulator import iter_log_lines

    # Drawn before the skip_user_turn fault existed: the same trajectories as the tests expect.
    simulate = {"n_trajectories": 160, "seed": 13, "faults": {"skip_user_turn": 0.0}}
    params = parse_params({"simulate": simulate})
    out = tmp_path_factory.mktemp("golden") / "train.jsonl"
    with out.open("w") as fh:
        for line, record, _ in iter_log_lines(SupportDesk(max_steps=60), params.simulate):
            ok = record and record["success"] and record["error_retries"] == 0
            if ok and record["steps"] < 6:
                fh.write(line + "\n")
    return out


@pytest.fixture(scope="session")
def sim_lines() -> list[str]:
    """400 simulated production log lines, faults included (corrupt lines, duplicates, PII)."""
    from tracetune.trajectories.simulator import iter_log_lines

    params = parse_params({"simulate": {"n_trajectories": 400, "seed": 5}})
    return [line for line, _, _ in iter_log_lines(SupportDesk(max_steps=60), params.simulate)]
