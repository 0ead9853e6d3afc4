"""The models side by side (stage `compare`) and the data's headline row and length histogram:
the small files `dvc metrics show` / `dvc plots show` read, from real evaluation blocks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from compare_support import arm, payload, three_models

from tasks import compare as compare_stage
from tracetune.config import SplitParams, parse_params
from tracetune.evaluation.compare import ALL_FAMILIES, family_rows, headline, side_by_side
from tracetune.trajectories.split import TOKEN_BIN, TOKEN_BINS, split_curated
from tracetune.trajectories.summary import data_headline, write_token_histogram

HEADLINE_KEYS = {"tsr", "tsr_low", "tsr_high", "n", "steps", "cost_usd"}


def test_every_arm_gets_the_same_six_headline_keys_so_the_table_stays_narrow() -> None:
    arms = side_by_side(three_models())
    assert list(arms) == ["base", "sft", "rlvr", "production", "floor"]
    rows = {name: headline(block) for name, block in arms.items()}
    assert all(set(row) == HEADLINE_KEYS for row in rows.values())
    assert rows["rlvr"]["tsr"] == 0.8 and rows["production"]["tsr"] == 0.6
    assert rows["floor"]["tsr"] == 0.1 and rows["base"]["n"] == 10
    assert rows["sft"]["tsr_low"] < 0.5 < rows["sft"]["tsr_high"]
    assert rows["production"]["steps"] == 4.0


def test_family_rows_put_each_arm_beside_the_others_with_wilson_bounds() -> None:
    rows = family_rows(side_by_side(three_models()))
    families = [r["family"] for r in rows]
    assert families[:5] == [ALL_FAMILIES] * 5  # overall first, then family by family
    assert [r["arm"] for r in rows if r["family"] == "refund"] == [
        "base",
        "sft",
        "rlvr",
        "production",
        "floor",
    ]
    perfect = next(r for r in rows if r["family"] == "order_status" and r["arm"] == "rlvr")
    assert perfect["tsr"] == 1.0 and perfect["tsr_high"] == 1.0 and 0.4 < perfect["tsr_low"] < 0.6
    for row in rows:
        assert row["tsr_low"] <= row["tsr"] <= row["tsr_high"]


def test_a_family_an_arm_never_saw_is_left_out_not_drawn_as_zero() -> None:
    models = three_models()
    models["sft"]["candidate"] = arm({"order_status": (3, 5)})
    models["base"]["candidate"] = arm({"order_status": (1, 5)})
    models["rlvr"]["candidate"] = arm({"order_status": (5, 5)})
    rows = family_rows(side_by_side(models))
    assert {r["arm"] for r in rows if r["family"] == "refund"} == {"production", "floor"}


def test_evaluations_on_different_task_sets_are_refused() -> None:
    models = three_models()
    models["sft"]["n_tasks"] = 7
    with pytest.raises(ValueError, match="different held-out task counts"):
        side_by_side(models)
    with pytest.raises(ValueError, match="names a baseline arm"):
        side_by_side({"production": payload("production", arm({"refund": (1, 2)}))})
    with pytest.raises(ValueError, match="no `candidate` block"):
        side_by_side({"sft": {"n_tasks": 10, "tsr": 0.5}})


def test_stage_writes_one_file_per_arm_and_clears_a_dropped_arm(tmp_path: Path) -> None:
    params = parse_params(
        {"paths": {"metrics": str(tmp_path / "metrics"), "reports": str(tmp_path / "reports")}}
    )
    for model, body in three_models().items():
        (tmp_path / "metrics").mkdir(exist_ok=True)
        (tmp_path / "metrics" / f"eval_{model}.json").write_text(json.dumps(body))
    stale = tmp_path / "metrics" / "arms" / "old_model.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    compare_stage.main(["base", "sft", "rlvr", str(_params_file(tmp_path, params))])
    written = sorted(p.name for p in (tmp_path / "metrics" / "arms").iterdir())
    assert written == ["base.json", "floor.json", "production.json", "rlvr.json", "sft.json"]
    assert json.loads((tmp_path / "metrics/arms/sft.json").read_text())["tsr"] == 0.5
    plot = json.loads((tmp_path / "reports/compare/tsr_by_family.json").read_text())
    assert len(plot) == 5 * 3  # (all) + two families, five arms each
    with pytest.raises(FileNotFoundError, match="evaluate@missing"):
        compare_stage.run(params, ["missing"])


def _params_file(tmp_path: Path, params: Any) -> Path:
    import yaml

    path = tmp_path / "params.yaml"
    data = {"paths": {"metrics": str(params.paths.metrics), "reports": str(params.paths.reports)}}
    path.write_text(yaml.safe_dump(data))
    return path


def _split(tmp_path: Path, lengths: dict[str, list[int]]) -> Any:
    """A real split of records whose text is `n * 4` characters (~n tokens)."""
    lines = []
    for side, sizes in lengths.items():
        for i, size in enumerate(sizes):
            record = {
                "trajectory_id": f"{side}-{i}",
                "task_id": f"order_status:{side}-{i}",
                "family": "order_status",
                "messages": [{"role": "user", "content": "x" * (size * 4)}],
            }
            lines.append(json.dumps(record))
    declared = {  # the environment's own split decides each record's side
        f"order_status:{side}-{i}": "test" if side == "heldout" else "train"
        for side, sizes in lengths.items()
        for i in range(len(sizes))
    }
    return split_curated(lines, tmp_path / "curated", SplitParams(), declared)


def csv_rows(tmp_path: Path, report: Any) -> list[tuple[int, ...]]:
    """What `dvc plots show` reads: the CSV the split stage writes."""
    path = write_token_histogram(tmp_path / "token_lengths.csv", report)
    lines = path.read_text().splitlines()
    assert lines[0] == "approx_tokens,train,heldout"
    return [tuple(int(v) for v in line.split(",")) for line in lines[1:]]


def test_histogram_shows_both_splits_up_to_one_bin_past_the_longest(tmp_path: Path) -> None:
    report = _split(tmp_path, {"train": [10, 70, 300], "heldout": [20, 450]})
    rows = csv_rows(tmp_path, report)
    assert rows[-1] == (8 * TOKEN_BIN, 0, 0)  # 450 tokens is bin 7; one empty bin closes it
    assert len(rows) == 9 < TOKEN_BINS  # the axis ends near the data, not at 3,072 tokens
    assert sum(r[1] for r in rows) == 3 and sum(r[2] for r in rows) == 2


def test_histogram_keeps_the_overflow_bin_and_copes_with_no_data(tmp_path: Path) -> None:
    report = _split(tmp_path / "a", {"train": [5000]})
    rows = csv_rows(tmp_path / "a", report)
    assert len(rows) == TOKEN_BINS + 1 and rows[-1] == (TOKEN_BINS * TOKEN_BIN, 1, 0)
    assert csv_rows(tmp_path / "b", _split(tmp_path / "b", {})) == [(0, 0, 0)]


def test_data_headline_is_five_counts() -> None:
    summary = {
        "ingest": {"read": 10, "accepted": 9, "quarantined": 1, "quarantine_reasons": {"x": 1}},
        "curation": {"input": 9, "kept": 6, "dropped_by_rule": {"failed": 3}},
        "split": {"train": 5, "heldout": 1, "heldout_tasks": 1},
    }
    assert data_headline(summary) == {
        "read": 10,
        "quarantined": 1,
        "curated": 6,
        "train": 5,
        "heldout": 1,
    }
