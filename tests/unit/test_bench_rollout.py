"""bench/bench_rollout.py compares like with like: both sides' thread settings are stated, and
the plain `model.generate` reference runs at torch's default threads (it ran at the engine's one
thread while the batched side got two, issue 23)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
from rollout_support import tiny_model_dir

torch = pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("bench_rollout")
    finally:
        sys.path.remove(str(BENCH))


def _args(threads: str) -> argparse.Namespace:
    return argparse.Namespace(tasks=2, batch=4, max_new_tokens=6, max_turns=2, seed=0, hf=False,
                              plain=True, threads=threads, repeat=1)  # fmt: skip


@pytest.mark.parametrize("threads", ["default", "auto"])
def test_plain_reference_runs_at_torch_default_threads(
    bench: Any, threads: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = tiny_model_dir(tmp_path_factory)
    default = torch.get_num_threads()
    figures, details = bench.bench_model("tiny", str(model), _args(threads), default)
    settings = details["settings"]
    plain = settings["one at a time, model.generate"]
    assert plain == f"torch default ({default} threads) throughout"
    # Both engine sides always get the same setting, whatever it is.
    assert settings["batched (4)"] == settings["one at a time"]
    if threads == "default":
        assert settings["one at a time"] == plain
    assert details["identical"] is True
    ratio, vs_plain = figures
    assert ratio.reference.startswith("the same engine, batch 1, " + settings["one at a time"])
    assert plain in vs_plain.reference
    assert ratio.ratio == pytest.approx(ratio.value / ratio.reference_value, rel=0.01)
    assert torch.get_num_threads() == default  # nothing leaks out of a mode


def test_threads_argument(bench: Any) -> None:
    assert bench._threads_of("default", 2) == 2
    assert bench._threads_of("auto", 2) is None
    assert bench._threads_of("1", 2) == 1
    assert bench._models(["sft=a/b", "models/base"]) == {"sft": "a/b", "base": "models/base"}
