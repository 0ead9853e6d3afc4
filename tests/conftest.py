"""Shared fixtures: real parts only (a real environment, real params files in tmp dirs)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracetune.config import Params, parse_params
from tracetune.environments.support_desk import SupportDesk

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture
def small_params(tmp_path: Path) -> Params:
    """Default params scaled down, with every path inside tmp_path."""
    root = tmp_path
    return parse_params(
        {
            "paths": {
                "raw_logs": str(root / "data/raw_logs"),
                "ingested": str(root / "data/ingested/trajectories.jsonl"),
                "quarantine": str(root / "data/ingested/quarantine.jsonl"),
                "ingest_state": str(root / "data/state/watermark.json"),
                "curated_dir": str(root / "data/curated"),
                "reports": str(root / "reports"),
                "metrics": str(root / "metrics"),
                "models": str(root / "models"),
            },
            "simulate": {"n_trajectories": 300, "seed": 3, "files": 2},
        }
    )
