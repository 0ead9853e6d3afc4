"""The production-log simulator: schema-valid, deterministic, and faults at the configured rates.

Rates are measured from the written logs themselves (not from the simulator's own bookkeeping),
so a fault that is drawn but never shows up in the data fails the test.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tracetune.config import Params, parse_params
from tracetune.environments.base import Call
from tracetune.environments.support_desk import SupportDesk
from tracetune.trajectories.schema import Trajectory
from tracetune.trajectories.simulator import write_logs

N = 2000
TOL = 0.03  # ~4 binomial standard deviations at p=0.1, n=2000


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, list[str], dict[str, Any]]:
    params = parse_params({"simulate": {"n_trajectories": N, "seed": 21, "files": 3}})
    out = tmp_path_factory.mktemp("logs")
    summary = write_logs(SupportDesk(max_steps=60), params.simulate, out).as_dict()
    lines = [ln for p in sorted(out.glob("*.jsonl")) for ln in p.read_text().splitlines()]
    return params, lines, summary


def _parsed(lines: list[str]) -> tuple[list[dict[str, Any]], int]:
    records, bad = [], 0
    for line in lines:
        try:
            records.append(Trajectory.model_validate_json(line).model_dump(mode="json"))
        except ValueError:
            bad += 1
    return records, bad


def _sessions(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if not r["trajectory_id"].endswith("-dup")]


def test_every_readable_line_fits_the_schema_and_openai_format(
    batch: tuple[Params, list[str], dict[str, Any]],
) -> None:
    _, lines, summary = batch
    records, bad = _parsed(lines)
    assert summary["lines"] == len(lines) == len(records) + bad
    for r in records[:300]:
        roles = [m["role"] for m in r["messages"]]
        assert roles[:2] == ["system", "user"] and roles[-1] == "assistant"
        answered = {m["tool_call_id"] for m in r["messages"] if m["role"] == "tool"}
        asked = {c["id"] for m in r["messages"] for c in m.get("tool_calls") or []}
        assert asked == answered
        assert r["steps"] == roles.count("assistant")


def test_fault_rates_match_params(batch: tuple[Params, list[str], dict[str, Any]]) -> None:
    params, lines, _ = batch
    rates = params.simulate.faults
    records, bad = _parsed(lines)
    sessions = _sessions(records)
    n = len(sessions) + bad
    assert abs(bad / n - rates.corrupt_line) < TOL
    dups = sum(r["trajectory_id"].endswith("-dup") for r in records)
    assert abs(dups / n - rates.duplicate_session * (1 - rates.corrupt_line)) < TOL
    pii = sum(
        bool(re.search(r"@mailbox\.org|\+1-555-", r["messages"][1]["content"])) for r in sessions
    )
    assert abs(pii / len(sessions) - rates.pii_in_user_text) < TOL
    overlong = sum(r["steps"] >= 15 for r in sessions)
    assert abs(overlong / len(sessions) - rates.overlong) < TOL
    retry_any = sum(r["error_retries"] > 0 for r in sessions)
    p_any = 1 - (1 - rates.wrong_tool) * (1 - rates.malformed_arguments) * (1 - rates.error_retry)
    tool_families = 0.9  # policy questions call no tool, so they cannot fault
    assert abs(retry_any / len(sessions) - p_any * tool_families) < 2 * TOL
    redundant = sum(_has_redundant_call(r) for r in sessions)
    assert redundant / len(sessions) > rates.redundant_call * 0.3


def _has_redundant_call(record: dict[str, Any]) -> bool:
    calls = Counter(
        (c["function"]["name"], c["function"]["arguments"])
        for m in record["messages"]
        for c in m.get("tool_calls") or []
    )
    return any(v > 1 for v in calls.values())


def test_reported_tsr_is_the_verified_success_rate(
    batch: tuple[Params, list[str], dict[str, Any]],
) -> None:
    _, lines, summary = batch
    sessions = _sessions(_parsed(lines)[0])
    tsr = sum(r["success"] for r in sessions) / len(sessions)
    assert summary["tsr"] == pytest.approx(tsr, abs=1e-3)
    assert 0.5 < tsr < 0.9  # a noisy agent: room for a fine-tuned model to do better
    assert summary["cost_per_task_usd"] > 0 and summary["steps_per_task"] > 1


def test_wrong_answers_are_verified_failures(
    batch: tuple[Params, list[str], dict[str, Any]],
) -> None:
    _, lines, _ = batch
    env = SupportDesk(max_steps=100)  # over-long sessions replay in full
    by_id = {t.id: t for t in env.tasks(N, seed=21)}
    for r in _sessions(_parsed(lines)[0])[:200]:
        env.reset(by_id[r["task_id"]])
        # Replaying the logged calls, then the final answer, through the verifier gives the
        # logged verdict for read-only tasks (write tasks also depend on the world's state).
        for m in r["messages"]:
            for tc in m.get("tool_calls") or []:
                env.step(Call(tc["function"]["name"], tc["function"]["arguments"]))
        if "state" not in by_id[r["task_id"]].check:
            assert env.verify(r.get("final_answer")).success == r["success"]


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    params = parse_params({"simulate": {"n_trajectories": 200, "seed": 5, "files": 2}})
    a = write_logs(SupportDesk(max_steps=60), params.simulate, tmp_path / "a")
    b = write_logs(SupportDesk(max_steps=60), params.simulate, tmp_path / "b")
    for pa, pb in zip(a.files, b.files, strict=True):
        assert Path(pa).read_bytes() == Path(pb).read_bytes()
    first = json.loads(Path(a.files[0]).read_text().splitlines()[0])
    assert first["model"] == "prod-agent-v1" and first["usage"]["prompt_tokens"] > 0
