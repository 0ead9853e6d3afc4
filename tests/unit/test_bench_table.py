"""bench/table.py: docs/benchmarks.md's table from the benches' records, and its staleness check."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture()
def modules(monkeypatch: pytest.MonkeyPatch) -> tuple:
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("_record", "table"):
        sys.modules.pop(name, None)
    import _record
    import table

    return _record, table


def _write(rec_mod: Any, results: Path, bench: str, figures: list) -> Path:
    record = rec_mod.start_record(bench, ["bench/" + bench + ".py", "--steps", "3"])
    return rec_mod.write_record(
        record, figures, {"budget": "3 steps"}, out=results / f"{bench}.json"
    )


def test_table_renders_every_record_with_its_run_and_check_detects_staleness(
    tmp_path: Path, modules: tuple
) -> None:
    rec, table = modules
    results = tmp_path / "results"
    fig = rec.Figure(
        name="tokens computed/s",
        value=1234.5,
        unit="tok/s",
        ours="threads 2, batch 8 | fp32",
        reference="TRL defaults, lr 2e-5",
        reference_value=1000.0,
        ratio=1.23,
        note="tokens covered/s 2000 vs 1000",
    )
    _write(rec, results, "bench_b", [fig])
    _write(rec, results, "bench_a", [rec.Figure("time", math.nan, "s", "ours", "ref", 4.0)])
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nIntro.\n\n## Later section\n")
    args = ["--results", str(results), "--doc", str(doc)]

    assert table.main([*args, "--check"]) == 1  # no markers yet: stale
    assert table.main(args) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\n" + table.BEGIN)  # markers near the top
    assert text.endswith("Intro.\n\n## Later section\n")
    block = text.split(table.BEGIN)[1].split(table.END)[0]
    rows = [line for line in block.splitlines() if line.startswith("| bench_")]
    assert [r.split(" | ")[0] for r in rows] == ["| bench_a", "| bench_b"]
    assert "not reached" in rows[0]
    b = rows[1]
    assert "1,234 tok/s" in b and "1,000 tok/s" in b and "1.23x" in b
    assert "threads 2, batch 8 \\| fp32" in b  # a pipe in a setting cannot break the row
    assert "`python bench/bench_b.py --steps 3`" in b and "budget: 3 steps" in b
    assert "load " in b and "threads: " in b and "UTC" in b
    assert table.main([*args, "--check"]) == 0

    # A record changes, the table does not: --check fails until regenerated.
    body = json.loads((results / "bench_b.json").read_text())
    body["figures"][0]["value"] = 999.0
    (results / "bench_b.json").write_text(json.dumps(body))
    assert table.main([*args, "--check"]) == 1
    assert table.main(args) == 0
    assert table.main([*args, "--check"]) == 0
    assert "999 tok/s" in doc.read_text()
    assert doc.read_text().count(table.BEGIN) == 1


def test_a_file_that_is_not_a_record_is_refused(tmp_path: Path, modules: tuple) -> None:
    _, table = modules
    (tmp_path / "x.json").write_text('{"name": 1}')
    with pytest.raises(SystemExit, match="not a bench record"):
        table.read_records(tmp_path)


def test_the_committed_table_matches_the_committed_records(modules: tuple) -> None:
    """CI fails when a bench record changed and docs/benchmarks.md was not regenerated."""
    _, table = modules
    assert table.main(["--check"]) == 0
