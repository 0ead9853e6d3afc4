"""Great Expectations gates on the raw batch and the curated set, as GX 1.x suites + checkpoints.

Each trajectory becomes one row of derived columns (`tracetune.data.features`); rows stream into
a SQLite table on disk and GX validates that table through its SQL engine. That keeps memory flat
however large the batch (GX computes counts in SQL instead of holding a DataFrame) and keeps
the whole batch one GX batch, so `mostly` thresholds and Data Docs describe exactly the verdict.

A failing gate builds GX Data Docs (HTML) and a one-screen summary of which expectation failed on
which rows; a passing gate's results become a metrics file (`GateResult.metrics()`).
GX is imported inside `run_gate` only: it takes seconds to import.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tracetune.config import CuratedGateParams, RawGateParams

TABLE = "rows"
INSERT_BATCH = 2000


@dataclass(frozen=True)
class Check:
    """One expectation, declared as data: the GX class name, its arguments, and what it means."""

    expectation: str
    kwargs: dict[str, Any]
    meaning: str

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column")


def raw_checks(p: RawGateParams, known_tools: Iterable[str], now: datetime) -> list[Check]:
    """The raw-batch gate. Agent faults (malformed arguments, unknown tools) are legitimate in
    production logs and bounded by `mostly`; logger faults are near-strict."""
    latest = now.timestamp() + p.max_future_skew_s
    between = "ExpectColumnValuesToBeBetween"
    zero = {"min_value": 0, "max_value": 0}
    return [
        Check("ExpectTableRowCountToBeBetween", {"min_value": 1}, "the batch is not empty"),
        Check(
            "ExpectColumnValuesToBeUnique", {"column": "trajectory_id"}, "trajectory ids are unique"
        ),
        *(
            Check("ExpectColumnValuesToNotBeNull", {"column": c}, f"every trajectory has {c}")
            for c in ("trajectory_id", "task_id", "family", "steps")
        ),
        Check(between, {"column": "missing_fields"} | zero, "required fields are present"),
        Check(
            "ExpectColumnValuesToBeInSet",
            {"column": "roles_ok", "value_set": [1], "mostly": p.roles_ok_mostly},
            "known roles and at least one assistant turn (any order a real conversation takes)",
        ),
        Check(
            between,
            {"column": "bad_arguments", "mostly": p.args_json_mostly} | zero,
            "tool-call arguments parse as a JSON object",
        ),
        Check(
            between,
            {"column": "unknown_tools", "mostly": p.known_tools_mostly} | zero,
            f"tool names exist in the environment ({len(set(known_tools))} tools)",
        ),
        Check(
            between,
            {"column": "unanswered_calls", "mostly": p.answered_calls_mostly} | zero,
            "every tool call is answered by a tool message with its id",
        ),
        Check(
            between,
            {"column": "orphan_tool_messages", "mostly": p.answered_calls_mostly} | zero,
            "every tool message answers an earlier call",
        ),
        Check(
            between,
            {"column": "tool_errors", "mostly": p.tool_error_free_mostly} | zero,
            "no failed tool call (the tool_errors rule): if many fail, a tool is down",
        ),
        Check(
            "ExpectColumnValuesToBeInSet",
            {"column": "steps_consistent", "value_set": [1], "mostly": p.steps_consistent_mostly},
            "`steps` equals the number of assistant turns",
        ),
        Check(
            between, {"column": "steps", "min_value": 1, "max_value": p.max_steps}, "steps in range"
        ),
        Check(
            between,
            {"column": "total_tokens", "min_value": 1, "max_value": p.max_total_tokens},
            "logged token usage in range (estimated usage is not judged)",
        ),
        Check(
            between,
            {"column": "cost_usd", "min_value": 0, "max_value": p.max_cost_usd},
            "logged cost per trajectory in range (estimated cost is not judged)",
        ),
        Check(
            between,
            {"column": "latency_s", "min_value": 0, "max_value": p.max_latency_s},
            "latency in range",
        ),
        Check(
            between,
            {
                "column": "timestamp_s",
                "min_value": p.min_timestamp.timestamp(),
                "max_value": latest,
            },
            f"timestamps between {p.min_timestamp.date()} and now (+{p.max_future_skew_s:.0f}s)",
        ),
    ]


def curated_checks(
    p: CuratedGateParams, families: Iterable[str], require_success: bool = True
) -> list[Check]:
    """The curated-set gate: big enough, diverse, no leakage, no duplicates, nothing empty."""
    success = Check(
        "ExpectColumnValuesToBeInSet",
        {"column": "success", "value_set": [1]},
        "only successful trajectories (curate.require_success)",
    )
    return [
        Check(
            "ExpectTableRowCountToBeBetween",
            {"min_value": p.min_rows},
            f"at least {p.min_rows} curated trajectories",
        ),
        Check(
            "ExpectColumnDistinctValuesToContainSet",
            {"column": "family", "value_set": sorted(families)},
            "every task family is covered",
        ),
        Check(
            "ExpectColumnDistinctValuesToContainSet",
            {"column": "split", "value_set": ["heldout", "train"]},
            "both train and held-out are non-empty",
        ),
        Check(
            "ExpectColumnValuesToBeInSet",
            {"column": "leaks_heldout_task", "value_set": [0]},
            "no task is in both train and held-out",
        ),
        Check(
            "ExpectColumnProportionOfUniqueValuesToBeBetween",
            {"column": "content_hash", "min_value": 1 - p.max_duplicate_rate},
            f"duplicate rate at most {p.max_duplicate_rate:.1%}",
        ),
        Check(
            "ExpectColumnValuesToBeBetween",
            {"column": "empty_assistant_turns", "min_value": 0, "max_value": 0},
            "no empty assistant turn",
        ),
        Check(
            "ExpectColumnValuesToBeBetween",
            {"column": "pii_found", "min_value": 0, "max_value": 0},
            "no email, phone or card number left",
        ),
        *([success] if require_success else []),
    ]


# ---------------------------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    check: Check
    success: bool
    element_count: int | None = None
    unexpected_count: int | None = None
    observed: Any = None
    examples: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        if self.unexpected_count is not None and self.element_count:
            share = self.unexpected_count / self.element_count
            mostly = self.check.kwargs.get("mostly")
            allowed = f" (allowed {1 - mostly:.1%})" if mostly is not None else ""
            return f"{self.unexpected_count}/{self.element_count} rows = {share:.1%}{allowed}"
        return f"observed {self.observed!r}"


@dataclass
class GateResult:
    gate: str
    success: bool
    rows: int
    results: list[CheckResult]
    seconds: float
    docs: Path | None = None

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.success]

    def metrics(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "success": self.success,
            "rows": self.rows,
            "evaluated": len(self.results),
            "failed": len(self.failed),
            "seconds": round(self.seconds, 2),
            "expectations": {
                _key(r.check): {
                    "success": r.success,
                    **(
                        {"unexpected": r.unexpected_count} if r.unexpected_count is not None else {}
                    ),
                    **({"observed": _jsonable(r.observed)} if r.unexpected_count is None else {}),
                }
                for r in self.results
            },
        }

    def summary(self, limit: int = 5) -> str:
        """One screen: the verdict, then each failed expectation with the rows it failed on."""
        head = "PASSED" if self.success else "FAILED"
        lines = [
            f"GX gate '{self.gate}' {head}: {len(self.failed)} of {len(self.results)} "
            f"expectations failed on {self.rows} rows"
        ]
        for r in self.failed:
            lines.append(f"  x {r.check.meaning}")
            lines.append(f"      {_key(r.check)}: {r.describe()}")
            for example in r.examples[:limit]:
                lines.append("      row " + ", ".join(f"{k}={v}" for k, v in example.items()))
        if self.docs:
            lines.append(f"  Data Docs: {self.docs}")
        return "\n".join(lines)


def _key(check: Check) -> str:
    name = check.expectation.removeprefix("Expect")
    return f"{name}[{check.column}]" if check.column else name


def _jsonable(value: Any) -> Any:
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    if isinstance(value, list | tuple | set):
        return sorted(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# Running a gate.
# ---------------------------------------------------------------------------------------------
def load_rows(db: Path, columns: dict[str, str], rows: Iterable[dict[str, Any]]) -> int:
    """Stream rows into a fresh SQLite table; returns the row count."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    cols = ", ".join(f'"{c}" {t}' for c, t in columns.items())
    conn.execute(f"CREATE TABLE {TABLE} (_row INTEGER PRIMARY KEY, {cols})")
    insert = f"INSERT INTO {TABLE} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    count, buffer = 0, []
    for row in rows:
        buffer.append(tuple(row[c] for c in columns))
        if len(buffer) >= INSERT_BATCH:
            conn.executemany(insert, buffer)
            count += len(buffer)
            buffer.clear()
    conn.executemany(insert, buffer)
    count += len(buffer)
    conn.commit()
    conn.close()
    return count


def run_gate(
    gate: str,
    checks: list[Check],
    columns: dict[str, str],
    rows: Iterable[dict[str, Any]],
    docs_dir: Path,
    index_columns: tuple[str, ...] = ("trajectory_id", "line"),
    examples: int = 5,
) -> GateResult:
    """Validate `rows` with `checks` as a GX suite + checkpoint in an ephemeral context.

    On failure, GX Data Docs are written under `docs_dir` (its `index.html` is `result.docs`).
    """
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"gx-{gate}-") as tmp:
        db = Path(tmp) / "rows.sqlite"
        n = load_rows(db, columns, rows)
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        outcome = _validate(gate, checks, db, docs_dir, index_columns, examples)
        results, success, docs = outcome
    return GateResult(gate, success, n, results, time.perf_counter() - started, docs)


def _validate(
    gate: str,
    checks: list[Check],
    db: Path,
    docs_dir: Path,
    index_columns: tuple[str, ...],
    examples: int,
) -> tuple[list[CheckResult], bool, Path | None]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_sqlite(
        name=f"{gate}_rows", connection_string=f"sqlite:///{db}"
    )
    asset = source.add_table_asset(name=TABLE, table_name=TABLE)
    batch = asset.add_batch_definition_whole_table(name=f"{gate}_batch")
    suite = context.suites.add(gx.ExpectationSuite(name=f"{gate}_gate"))
    for i, check in enumerate(checks):
        expectation = getattr(gx.expectations, check.expectation)(**check.kwargs, meta={"check": i})
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{gate}_validation", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"{gate}_checkpoint",
            validation_definitions=[definition],
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": list(index_columns),
                "partial_unexpected_count": examples,
            },
        )
    )
    run = checkpoint.run()
    results = []
    for validation in run.run_results.values():
        for res in validation.results:
            info = res.result or {}
            results.append(
                CheckResult(
                    checks[int((res.expectation_config.meta or {})["check"])],  # type: ignore[union-attr]
                    bool(res.success),
                    info.get("element_count"),
                    info.get("unexpected_count"),
                    info.get("observed_value"),
                    [dict(x) for x in info.get("partial_unexpected_index_list") or []][:examples],
                )
            )
    docs = None
    if not run.success:
        shutil.rmtree(docs_dir, ignore_errors=True)  # the site shows this run only
        docs = _build_docs(context, docs_dir)
    results.sort(key=lambda r: checks.index(r.check))
    return results, bool(run.success), docs


def _build_docs(context: Any, docs_dir: Path) -> Path:
    docs_dir.mkdir(parents=True, exist_ok=True)
    context.add_data_docs_site(
        site_name="tracetune",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    context.build_data_docs(site_names=["tracetune"])
    return docs_dir / "index.html"


class GateFailed(RuntimeError):
    """A gate failed: the pipeline stops; `result.summary()` says what failed on which rows."""

    def __init__(self, result: GateResult) -> None:
        self.result = result
        super().__init__(result.summary())


def utc_now() -> datetime:
    return datetime.now(UTC)
