"""Family-balanced SFT data mix (`sft.family_alpha`, tracetune/training/mixing.py)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tracetune.config import SFTParams
from tracetune.training.mixing import family_of, family_targets, mixed_epoch
from tracetune.training.rekey import compile_patterns, rekeyed_passes
from tracetune.training.sft import data_passes, epoch_data


def _trajs(counts: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {
            "trajectory_id": f"{family}-{i}",
            "family": family,
            "messages": [{"role": "user", "content": f"order O-{1000 + i} ({family})"}],
        }
        for family, n in counts.items()
        for i in range(n)
    ]


def test_targets_follow_count_to_the_alpha_and_sum_to_the_epoch_size() -> None:
    counts = {"common": 900, "rare": 100}
    assert family_targets(counts, 1.0, 1000) == {"common": 900, "rare": 100}
    assert family_targets(counts, 0.0, 1000) == {"common": 500, "rare": 500}
    half = family_targets(counts, 0.5, 1000)  # sqrt: 30 vs 10 -> 750 / 250
    assert half == {"common": 750, "rare": 250}
    odd = family_targets({"a": 1, "b": 1, "c": 1}, 0.0, 10)
    assert sum(odd.values()) == 10 and sorted(odd.values()) == [3, 3, 4]


def test_alpha_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        family_targets({"a": 1}, 1.5, 10)
    with pytest.raises(ValueError):
        SFTParams(family_alpha=-0.1)


def test_an_epoch_repeats_rare_families_subsamples_common_ones_and_keeps_its_size() -> None:
    data = _trajs({"common": 90, "rare": 10})
    epoch = mixed_epoch(data, 0.0, seed=0, epoch=0)
    assert len(epoch) == len(data)
    per_family = Counter(family_of(t) for t in epoch)
    assert per_family == {"common": 50, "rare": 50}
    rare = Counter(t["trajectory_id"] for t in epoch if t["family"] == "rare")
    assert set(rare.values()) == {5}  # every rare example 5 times, none left out
    common = [t["trajectory_id"] for t in epoch if t["family"] == "common"]
    assert len(set(common)) == 50  # sampled without replacement


def test_epochs_draw_different_samples_and_a_rerun_draws_the_same() -> None:
    data = _trajs({"common": 90, "rare": 10})
    first = [t["trajectory_id"] for t in mixed_epoch(data, 0.0, seed=0, epoch=0)]
    again = [t["trajectory_id"] for t in mixed_epoch(data, 0.0, seed=0, epoch=0)]
    second = [t["trajectory_id"] for t in mixed_epoch(data, 0.0, seed=0, epoch=1)]
    assert first == again
    assert set(first) != set(second)
    # Over 4 epochs nearly every common example is seen (each epoch keeps 50 of 90).
    seen = {
        t["trajectory_id"]
        for e in range(4)
        for t in mixed_epoch(data, 0.0, seed=0, epoch=e)
        if t["family"] == "common"
    }
    assert len(seen) > 80


def test_alpha_one_is_the_logged_data_unchanged() -> None:
    data = _trajs({"common": 9, "rare": 1})
    assert mixed_epoch(data, 1.0, seed=0, epoch=3) == data
    params = SFTParams(epochs=3)
    assert data_passes(params) == 1
    assert epoch_data(data, params, 1) == data


def test_family_falls_back_to_the_task_id_prefix() -> None:
    assert family_of({"task_id": "order_status:O-1:0"}) == "order_status"
    assert family_of({"family": "x", "task_id": "y:1"}) == "x"


def test_epoch_data_mixes_then_rekeys_each_epoch_like_rekeyed_passes() -> None:
    data = _trajs({"common": 6, "rare": 2})
    rekey = [r"\bO-\d+\b"]
    params = SFTParams(epochs=2, family_alpha=1.0, rekey_ids=rekey)
    # alpha 1 with re-keying: exactly the re-keyed passes the option wrote before mixing existed
    assert data_passes(params) == 2
    assert epoch_data(data, params, 2) == rekeyed_passes(data, compile_patterns(rekey), 2, 0)
    mixed = SFTParams(epochs=2, family_alpha=0.0, rekey_ids=rekey)
    out = epoch_data(data, mixed, data_passes(mixed))
    assert len(out) == 2 * len(data)
    assert Counter(t["family"] for t in out) == {"common": 8, "rare": 8}
    texts = {t["messages"][0]["content"] for t in out}
    assert not texts & {t["messages"][0]["content"] for t in data}  # every id re-drawn
