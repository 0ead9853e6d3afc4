"""The data benchmark's generator: every trajectory distinct, as curation and the scrub see it."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tracetune.trajectories.curation import exact_key, near_key

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_data.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_data", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_data"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def simulated() -> list[str]:
    from tracetune.config import parse_params
    from tracetune.environments.support_desk import SupportDesk
    from tracetune.trajectories.simulator import iter_log_lines

    params = parse_params({"simulate": {"n_trajectories": 200, "seed": 7}})
    return [line for line, _, _ in iter_log_lines(SupportDesk(max_steps=60), params.simulate)]


def test_variants_are_distinct_for_dedupe_and_keep_the_episode(
    bench: ModuleType, simulated: list[str]
) -> None:
    """Variants of one episode differ in ids, emails and task ids (dedupe keeps each), keep
    the episode's outcome, add no digits (the number detectors see what they saw), and a
    corrupt line stays corrupt."""
    records = []
    for line in simulated:
        try:
            records.append((line, json.loads(line)))
        except ValueError:
            for variant in (1, 30):
                with pytest.raises(ValueError):
                    json.loads(bench.vary(line, variant))
    assert len(records) >= 150
    digits = re.compile(r"\d+")
    keys = set()
    for line, record in records:
        assert bench.vary(line, 0) == line
        for variant in (1, 2, 27, 53):
            varied = json.loads(bench.vary(line, variant))
            assert varied["trajectory_id"] == f"{record['trajectory_id']}-{variant}"
            assert varied["success"] == record["success"]
            assert varied["steps"] == record["steps"]
            assert len(varied["messages"]) == len(record["messages"])
            assert varied["timestamp"] > record["timestamp"]
            keys.add((exact_key(varied), near_key(varied)))
            before = digits.findall(json.dumps(record["messages"]))
            after = digits.findall(json.dumps(varied["messages"]))
            assert sorted(before) == sorted(after) or "(customer C-" in json.dumps(varied)
        keys.add((exact_key(record), near_key(record)))
    near = {k[1] for k in keys}
    simulated_near = {near_key(record) for _, record in records}  # the simulator repeats a few
    assert len(near) == 5 * len(simulated_near)  # no variant duplicates another trajectory


def test_lines_with_unique_numbers_are_never_duplicates(
    bench: ModuleType, simulated: list[str]
) -> None:
    """What the bench writes (line i tagged i + 1): no two golden-eligible lines share an exact
    or near key, though the simulator itself solved some tasks twice the same way."""
    lines = [line for line in simulated if line.startswith("{")]
    records = []
    for i in range(3 * len(lines)):
        variant, index = divmod(i, len(lines))
        try:
            records.append(json.loads(bench.render(bench.template(lines[index]), variant, i + 1)))
        except ValueError:
            continue  # a corrupt line stays corrupt
    assert len({near_key(r) for r in records}) == len(records)
    assert len({exact_key(r) for r in records}) == len(records)
    assert len({r["trajectory_id"] for r in records}) == len(records)


def test_letters_count_like_spreadsheet_columns(bench: ModuleType) -> None:
    assert [bench._letters(n) for n in (1, 26, 27, 52, 53, 702, 703)] == [
        "A",
        "Z",
        "AA",
        "AZ",
        "BA",
        "ZZ",
        "AAA",
    ]
