"""bench/bench_sft.py's figures follow issue 23's fairness rules (pure functions, no training)."""

from __future__ import annotations

from typing import Any

import pytest
from bench_support import import_bench


@pytest.fixture()
def bench_sft(monkeypatch: pytest.MonkeyPatch) -> Any:
    return import_bench(monkeypatch, "bench_sft")


def _run(curve: list[tuple[float, float]], seconds: float, covered: int, computed: int) -> dict:
    final = curve[-1][1]
    return {
        "seconds": seconds,
        "covered_per_s": covered / seconds,
        "computed_per_s": computed / seconds,
        "final_train_loss": final,
        "own_final_loss_at_s": next(t for t, loss in curve if loss <= final),
        "heldout_loss": 1.0,
        "curve": curve,
    }


def test_time_to_loss_uses_the_references_first_time_at_its_own_final_loss(bench_sft: Any) -> None:
    # The reference dips to its final loss at 128 s of a 202 s run (issue 23's example).
    reference = _run([(50, 4.0), (128, 3.5), (170, 3.6), (202, 3.5)], 202, 1000, 1000)
    shared = _run([(4, 3.9), (8, 3.5), (12, 3.4)], 12, 1000, 400)
    plain = _run([(10, 3.9), (20, 3.5), (30, 3.4)], 30, 1000, 1000)
    tuned = _run([(2, 3.0), (4, 2.0)], 4, 500, 200)
    reference_lr = _run([(30, 2.5), (60, 2.2), (90, 2.3)], 90, 1000, 1000)
    runs = {
        "reference": [reference],
        "reference_lr": [reference_lr],
        "systems_only": [plain],
        "systems_shared": [shared],
        "tracetune": [tuned],
    }
    settings = {arm: f"{arm} settings" for arm in runs}
    figs = {f.name: f for f in bench_sft.figures(runs, settings, "data")}

    same = next(f for name, f in figs.items() if "same training" in name)
    assert same.ours.startswith("systems_shared") and same.reference.startswith("systems_only")
    assert same.ratio == pytest.approx(2.5)  # covered tokens/s: 1000/12 vs 1000/30

    equal = next(f for name, f in figs.items() if "equal hyperparameters" in name)
    assert equal.reference_value == 128  # not the whole run's 202 s
    assert equal.value == 8
    assert equal.ratio == 16.0
    assert equal.reference.startswith("reference:")

    tuned_fig = next(f for name, f in figs.items() if "with tuned hyperparameters" in name)
    assert tuned_fig.reference.startswith("reference_lr:")  # TRL defaults at the same lr
    assert tuned_fig.reference_value == 60 and tuned_fig.value == 4

    computed = next(f for name, f in figs.items() if "computed/s: shared prefix" in name)
    assert computed.value == pytest.approx(400 / 12, abs=0.01)  # computed, not covered
    assert "covered" in computed.note


def test_time_to_is_none_when_the_loss_is_never_reached(bench_sft: Any) -> None:
    assert bench_sft.time_to([(1.0, 3.0), (2.0, 2.9)], 2.5) is None
    assert bench_sft.time_to([(1.0, 3.0), (2.0, 2.5)], 2.5) == 2.0
