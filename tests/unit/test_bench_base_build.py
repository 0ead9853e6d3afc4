"""bench/bench_base_build.py's compile arm: its figures count compile time, its arms train alike."""

from __future__ import annotations

from typing import Any

import pytest
from bench_support import import_bench


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    return import_bench(monkeypatch, "bench_base_build")


def _details(compile_s: float) -> dict[str, Any]:
    return {
        "tokens": {"drills": 2_000_000, "corpus": 4_000_000},
        "seconds_per_token": {
            "eager/drills": 80e-6,
            "compiled/drills": 60e-6,
            "eager/corpus": 80e-6,
            "compiled/corpus": 78e-6,
        },
        "projected_pretrain_s": {"eager": 480.0, "compiled": 432.0},
        "compile_s": compile_s,
        "graphs_compiled": 2,
        "graphs_compiled_while_timed": 0,
        "losses": {"eager": [9.0, 8.0], "compiled": [9.0, 8.0]},
        "max_relative_loss_gap": 1e-7,
        "loads": [1.0, 2.0],
    }


def test_the_build_projection_pays_the_compile_time(bench: Any) -> None:
    # 48 s saved on the steps, 100 s spent compiling: compiled is slower overall.
    figures = bench.compile_figures(_details(100.0), "default build", warm_cache=False)
    whole = figures[-1]
    assert whole.value == 532.0 and whole.reference_value == 480.0
    assert whole.ratio > 1
    assert "cold inductor cache" in whole.note and "compile 100 s" in whole.note
    per_phase = {f.name: f for f in figures[:-1]}
    drills = per_phase["pre-training s per 1k tokens, drills, compiled"]
    assert (drills.value, drills.reference_value, drills.ratio) == (0.06, 0.08, 0.75)
    assert "eager" in drills.reference and "torch.compile" in drills.ours


@pytest.mark.slow
def test_compiled_step_trains_like_eager_on_a_tiny_build(bench: Any) -> None:
    # Same seeded weights, same batches: the compiled step's losses are eager's to fp32 rounding.
    from tracetune.config import BaseModelBuild

    build = BaseModelBuild(
        vocab_size=320, hidden_size=32, layers=1, heads=2, seq_len=256, corpus_size=80,
        pretrain_steps=4, batch_size=2,
    )  # fmt: skip
    details = bench.compare_compile(build, sample_steps=3, repeat=2, warmup=2)
    assert len(details["losses"]["eager"]) == 2 * 2 * 2 + 2 * 2 * 3
    assert details["max_relative_loss_gap"] < 1e-4
    assert details["losses"]["eager"][-1] < details["losses"]["eager"][0]  # it trained
    assert set(details["seconds_per_token"]) == {
        f"{arm}/{phase}" for arm in ("eager", "compiled") for phase in ("drills", "corpus")
    }
