"""Great Expectations gates on the raw batch and the curated set, as GX 1.x suites + checkpoints.

Each trajectory becomes one row of derived columns (`tracetune.data.features`); rows stream into
a SQLite table on disk and GX validates that table through its SQL engine. That keeps memory flat
however large the batch (GX computes counts in SQL instead of holding a DataFrame) and keeps
the whole batch one GX batch, so `mostly` thresholds and Data Docs describe exactly the verdict.

A failing gate builds GX Data Docs (HTML) and a one-screen summary of which expectation failed on
which rows; a passing gate's results become a metrics file (`GateResult.metrics()`). Data Docs
are meant for a person: each expectation's description says what it means for a trajectory and
why it matters, failing rows are named by trajectory id and where they were logged (`source`,
`line`), timestamps read as ISO 8601 and each run has a name (docs/data.md).
GX is imported inside `run_gate` only: it takes seconds to import.
"""

from __future__ import annotations

import functools
import operator
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tracetune.config import CuratedGateParams, RawGateParams

TABLE = "rows"
INSERT_BATCH = 2000


@dataclass(frozen=True)
class Check:
    """One expectation, declared as data: the GX class name, its arguments, what it means for a
    trajectory and why that matters. Data Docs show `description()` in place of GX's generic
    wording ("values must belong to this set: 1, at least 99% of the time")."""

    expectation: str
    kwargs: dict[str, Any]
    meaning: str
    why: str = ""

    @property
    def column(self) -> str | None:
        return self.kwargs.get("column")

    def description(self) -> str:
        """The plain-language note: the meaning, why it matters, and the rule in numbers."""
        why = f" Why it matters: {self.why}" if self.why else ""
        text = f"{_sentence(self.meaning)}{why} Rule: {rule_text(self)}."
        return text.replace("$", "USD ")  # GX reads `$name` in a template as a parameter


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


TIMESTAMPS = "ExpectColumnTimestampsToBeBetween"  # tracetune's own: ISO 8601 text bounds


def rule_text(check: Check) -> str:
    """The expectation in numbers, worded for a person (what GX's renderer would say)."""
    kw, column = check.kwargs, check.column
    low, high = kw.get("min_value"), kw.get("max_value")
    if check.expectation == "ExpectTableRowCountToBeBetween":
        unit = "trajectory" if low == 1 else "trajectories"
        return f"at least {low} {unit}" + (f" and at most {high}" if high is not None else "")
    if check.expectation == "ExpectColumnDistinctValuesToContainSet":
        return f"{column} takes every one of: {', '.join(map(str, kw['value_set']))}"
    if check.expectation == "ExpectColumnProportionOfUniqueValuesToBeBetween":
        return f"at least {low:.1%} of {column} values are distinct"
    if check.expectation == "ExpectColumnValuesToBeUnique":
        return f"no two trajectories share a {column}"
    if check.expectation == "ExpectColumnValuesToNotBeNull":
        body = f"{column} is set"
    elif check.expectation == "ExpectColumnValuesToBeInSet":
        values = kw["value_set"]
        body = f"{column} = {values[0]}" if len(values) == 1 else f"{column} in {values}"
    elif low is not None and low == high:
        body = f"{column} = {low}"
    else:
        body = f"{column} between {low} and {high}"
    mostly = kw.get("mostly")
    if mostly is None:
        return f"{body} in every trajectory"
    return f"{body} in at least {mostly:.1%} of trajectories"


def raw_checks(p: RawGateParams, known_tools: Iterable[str], now: datetime) -> list[Check]:
    """The raw-batch gate. Agent faults (malformed arguments, unknown tools) are legitimate in
    production logs and bounded by `mostly`; logger faults are near-strict."""
    from tracetune.data.features import iso_utc

    earliest = iso_utc(p.min_timestamp)
    latest = iso_utc(now + timedelta(seconds=p.max_future_skew_s))
    between = "ExpectColumnValuesToBeBetween"
    zero = {"min_value": 0, "max_value": 0}
    needed = {
        "trajectory_id": "without it a failing row cannot be traced to its log, nor a duplicate "
        "found.",
        "task_id": "the held-out split is by task: a trajectory without one cannot be placed.",
        "family": "coverage and results are counted per task family.",
        "steps": "steps per task is a promotion-gate metric.",
    }
    return [
        Check(
            "ExpectTableRowCountToBeBetween",
            {"min_value": 1},
            "the batch holds at least one trajectory",
            "an empty batch has nothing to validate or learn from; ingest read nothing usable.",
        ),
        Check(
            "ExpectColumnValuesToBeUnique",
            {"column": "trajectory_id"},
            "each trajectory id appears once in the batch",
            "a trajectory logged twice would count twice in training and evaluation.",
        ),
        *(
            Check("ExpectColumnValuesToNotBeNull", {"column": c}, f"every trajectory has {c}", why)
            for c, why in needed.items()
        ),
        Check(
            between,
            {"column": "missing_fields"} | zero,
            "every required field is present (id, task, family, timestamp, model, messages, "
            "success, steps, usage, cost, latency)",
            "a trajectory without one cannot be curated or scored; ingest quarantines such lines, "
            "so a failure here means the schema and the data drifted apart.",
        ),
        Check(
            "ExpectColumnValuesToBeInSet",
            {"column": "roles_ok", "value_set": [1], "mostly": p.roles_ok_mostly},
            "every message has a known role (system, user, assistant, tool) and the "
            "conversation has at least one assistant turn, in any order a real conversation "
            "takes",
            "a conversation without an assistant turn teaches the model nothing, and unknown "
            "roles mean the logger or the field mapping changed.",
        ),
        Check(
            between,
            {"column": "bad_arguments", "mostly": p.args_json_mostly} | zero,
            "every tool call's arguments parse as a JSON object",
            "the agent sometimes writes broken arguments (what fine-tuning should fix), but many "
            "at once mean a logger or format change.",
        ),
        Check(
            between,
            {"column": "unknown_tools", "mostly": p.known_tools_mostly} | zero,
            f"every tool the agent called exists in the environment "
            f"({len(set(known_tools))} tools)",
            "calls to tools the environment lacks cannot be replayed or learned; many mean the "
            "environment or its tool list changed.",
        ),
        Check(
            between,
            {"column": "unanswered_calls", "mostly": p.answered_calls_mostly} | zero,
            "every tool call is answered by a tool message with its id",
            "an unanswered call means the logger lost tool results: the model would learn from "
            "conversations with holes in them.",
        ),
        Check(
            between,
            {"column": "orphan_tool_messages", "mostly": p.answered_calls_mostly} | zero,
            "every tool message answers an earlier call",
            "a tool result without its call means messages were lost or reordered.",
        ),
        Check(
            between,
            {"column": "tool_errors", "mostly": p.tool_error_free_mostly} | zero,
            "no failed tool call (the tool_errors rule)",
            "some failures are normal; if many fail, a tool is down and the batch records the "
            "outage, not the agent.",
        ),
        Check(
            "ExpectColumnValuesToBeInSet",
            {"column": "steps_consistent", "value_set": [1], "mostly": p.steps_consistent_mostly},
            "the logged steps equal the number of assistant turns",
            "steps per task is a promotion-gate metric; a mismatch means the logger counts "
            "differently.",
        ),
        Check(
            between,
            {"column": "steps", "min_value": 1, "max_value": p.max_steps},
            f"the agent took between 1 and {p.max_steps} steps",
            "0 steps means nothing happened; more than the cap means a loop.",
        ),
        Check(
            between,
            {"column": "total_tokens", "min_value": 1, "max_value": p.max_total_tokens},
            "logged token usage is in range (usage ingest estimated is not judged)",
            "absurd token counts are logger faults and would skew cost and length reports.",
        ),
        Check(
            between,
            {"column": "cost_usd", "min_value": 0, "max_value": p.max_cost_usd},
            "logged cost per trajectory is in range (cost ingest estimated is not judged)",
            "cost per task is a promotion-gate metric; a negative or absurd cost is a logger "
            "fault.",
        ),
        Check(
            between,
            {"column": "latency_s", "min_value": 0, "max_value": p.max_latency_s},
            "latency is in range (seconds)",
            "negative or hour-long latencies are clock or logger faults.",
        ),
        Check(
            TIMESTAMPS,
            {"column": "timestamp", "min_value": earliest, "max_value": latest},
            f"the trajectory was logged between {earliest} and now "
            f"(+{p.max_future_skew_s:.0f} s of clock skew), in UTC",
            "a time before the service existed or in the future means a wrong clock or time "
            "zone in the logger.",
        ),
    ]


def curated_checks(
    p: CuratedGateParams, families: Iterable[str], require_success: bool = True
) -> list[Check]:
    """The curated-set gate: big enough, diverse, no leakage, no duplicates, nothing empty."""
    success = Check(
        "ExpectColumnValuesToBeInSet",
        {"column": "success", "value_set": [1]},
        "only successful trajectories are kept (curate.require_success)",
        "the model imitates what it is trained on: a failed episode teaches failure.",
    )
    return [
        Check(
            "ExpectTableRowCountToBeBetween",
            {"min_value": p.min_rows},
            f"at least {p.min_rows} curated trajectories",
            "fewer examples than this do not fine-tune a model reliably.",
        ),
        Check(
            "ExpectColumnDistinctValuesToContainSet",
            {"column": "family", "value_set": sorted(families)},
            "every task family is covered",
            "a family with no examples is one the model is never taught.",
        ),
        Check(
            "ExpectColumnDistinctValuesToContainSet",
            {"column": "split", "value_set": ["heldout", "train"]},
            "both train and held-out are non-empty",
            "without held-out tasks the model cannot be evaluated; without train, not trained.",
        ),
        Check(
            "ExpectColumnValuesToBeInSet",
            {"column": "leaks_heldout_task", "value_set": [0]},
            "no train trajectory is of a task that is held out",
            "a held-out task seen in training inflates the evaluation: the gain would be memory.",
        ),
        Check(
            "ExpectColumnProportionOfUniqueValuesToBeBetween",
            {"column": "content_hash", "min_value": 1 - p.max_duplicate_rate},
            f"the duplicate rate is at most {p.max_duplicate_rate:.1%}",
            "duplicates weigh some episodes more than others and leak between splits.",
        ),
        Check(
            "ExpectColumnValuesToBeBetween",
            {"column": "empty_assistant_turns", "min_value": 0, "max_value": 0},
            "no assistant turn is empty (neither text nor a tool call)",
            "an empty turn teaches the model to say nothing and trips chat templates.",
        ),
        Check(
            "ExpectColumnValuesToBeBetween",
            {"column": "pii_found", "min_value": 0, "max_value": 0},
            "no email, phone or card number is left",
            "personal data in training data can be memorised and repeated by the model.",
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
    run_name: str = ""

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
            lines.append(f"  Data Docs: {self.docs} (run {self.run_name})")
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
    # One C call per row instead of a generator over the columns (the gates' main process
    # loads every trajectory's row); a single column still gives a 1-tuple.
    names = list(columns)
    values: Callable[[dict[str, Any]], tuple[Any, ...]] = (
        operator.itemgetter(*names) if len(names) > 1 else _one_column(names[0])
    )
    for row in rows:
        buffer.append(values(row))
        if len(buffer) >= INSERT_BATCH:
            conn.executemany(insert, buffer)
            count += len(buffer)
            buffer.clear()
    conn.executemany(insert, buffer)
    count += len(buffer)
    conn.commit()
    conn.close()
    return count


def _one_column(column: str) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    return lambda row: (row[column],)


def run_gate(
    gate: str,
    checks: list[Check],
    columns: dict[str, str],
    rows: Iterable[dict[str, Any]],
    docs_dir: Path,
    index_columns: tuple[str, ...] = ("trajectory_id", "source", "line"),
    examples: int = 5,
    run_name: str | None = None,
) -> GateResult:
    """Validate `rows` with `checks` as a GX suite + checkpoint in an ephemeral context.

    On failure, GX Data Docs are written under `docs_dir` (its `index.html` is `result.docs`),
    under the run name `run_name` (default `validate_<gate>-<UTC time>`). Failing rows are named
    by `index_columns` there and in `result.summary()`.
    """
    started = time.perf_counter()
    name = run_name or f"validate_{gate}-{utc_now():%Y%m%dT%H%M%SZ}"
    with tempfile.TemporaryDirectory(prefix=f"gx-{gate}-") as tmp:
        db = Path(tmp) / "rows.sqlite"
        n = load_rows(db, columns, rows)
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        outcome = _validate(gate, checks, db, docs_dir, index_columns, examples, name)
        results, success, docs = outcome
    return GateResult(gate, success, n, results, time.perf_counter() - started, docs, name)


@functools.cache
def _timestamps_expectation() -> type:
    """`ExpectColumnValuesToBeBetween` with ISO 8601 text bounds (`features.iso_utc`).

    GX turns datetime bounds into SQLAlchemy's SQLite text (`2026-11-22 09:30:00.000000`), which
    does not sort against `2026-11-22T09:30:00Z`; string bounds compare as text, in time order
    because every value has the same width and zone. Defined once per process: GX registers
    each expectation class by name.
    """
    import great_expectations as gx

    class ExpectColumnTimestampsToBeBetween(gx.expectations.ExpectColumnValuesToBeBetween):
        """Values of an ISO 8601 UTC text column lie between two ISO 8601 UTC strings."""

        min_value: str | None = None  # type: ignore[assignment]
        max_value: str | None = None  # type: ignore[assignment]

    return ExpectColumnTimestampsToBeBetween


def _expectation(check: Check, index: int) -> Any:
    import great_expectations as gx

    cls = _timestamps_expectation() if check.expectation == TIMESTAMPS else None
    cls = cls or getattr(gx.expectations, check.expectation)
    return cls(**check.kwargs, meta={"check": index}, description=check.description())


def _validate(
    gate: str,
    checks: list[Check],
    db: Path,
    docs_dir: Path,
    index_columns: tuple[str, ...],
    examples: int,
    run_name: str,
) -> tuple[list[CheckResult], bool, Path | None]:
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
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
        suite.add_expectation(_expectation(check, i))
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
    run = checkpoint.run(run_id=RunIdentifier(run_name=run_name, run_time=utc_now()))
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
        _name_failing_rows(context, run.run_results)
        shutil.rmtree(docs_dir, ignore_errors=True)  # the site shows this run only
        docs = _build_docs(context, docs_dir)
    results.sort(key=lambda r: checks.index(r.check))
    return results, bool(run.success), docs


def _name_failing_rows(context: Any, run_results: dict[Any, Any]) -> None:
    """Give Data Docs the sampled failing rows (trajectory id, source, line) to show.

    GX renders the rows of a failed expectation from `unexpected_index_list`, which only the
    COMPLETE result format fills, with every failing row of the batch: a memory and page size
    that grow with the batch. The SUMMARY format already holds a sample of them
    (`partial_unexpected_index_list`, `gates.failed_rows_shown` per expectation); it becomes the
    list Data Docs render, under GX's own heading "Sampled Unexpected Values".
    """
    for key, validation in run_results.items():
        for res in validation.results:
            info = res.result or {}
            if info.get("partial_unexpected_index_list"):
                info["unexpected_index_list"] = list(info["partial_unexpected_index_list"])
        context.validation_results_store.set(key, validation)


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
