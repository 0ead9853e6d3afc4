"""Split: by task, seeded, stable as data grows, no leakage; held-out tasks rebuild in the env."""

from __future__ import annotations

import json
from pathlib import Path

from tracetune.config import IngestParams, PiiParams, SplitParams
from tracetune.environments.support_desk import SupportDesk
from tracetune.trajectories.ingest import IngestPaths, ingest
from tracetune.trajectories.io import iter_lines
from tracetune.trajectories.pii import find_pii
from tracetune.trajectories.split import (
    heldout_score,
    is_heldout,
    load_heldout,
    load_heldout_tasks,
    load_train,
    read_heldout_tasks,
    split_curated,
)


def lines_for(task_ids: list[str], copies: int = 2) -> list[str]:
    return [
        json.dumps(
            {"trajectory_id": f"{t}#{k}", "task_id": t, "family": t.split(":")[0], "messages": []}
        )
        for t in task_ids
        for k in range(copies)
    ]


def test_assignment_is_seeded_and_stable() -> None:
    p = SplitParams(heldout_fraction=0.2, seed=1)
    ids = [f"order_status:O-{i}:What i" for i in range(2000)]
    held = {t for t in ids if is_heldout(t, "order_status", p)}
    assert 0.17 < len(held) / len(ids) < 0.23
    assert held == {t for t in ids if is_heldout(t, "order_status", p)}
    other = {t for t in ids if is_heldout(t, "order_status", p.model_copy(update={"seed": 2}))}
    assert other != held
    assert 0 <= heldout_score("x", 1) < 1


def test_no_task_on_both_sides(tmp_path: Path) -> None:
    ids = [f"customer_tier:C-{i:04d}" for i in range(300)] + ["policy_question:returns:0"]
    params = SplitParams(heldout_fraction=0.2, heldout_families=["policy_question"], seed=3)
    report = split_curated(iter(lines_for(ids, copies=3)), tmp_path, params)
    train = {json.loads(x)["task_id"] for x in iter_lines(tmp_path / "train.jsonl")}
    heldout = {json.loads(x)["task_id"] for x in iter_lines(tmp_path / "heldout.jsonl")}
    assert train and heldout and not train & heldout
    assert "policy_question:returns:0" in heldout  # a held-out family is held out whole
    listed = read_heldout_tasks(tmp_path)
    assert {t["task_id"] for t in listed["tasks"]} == heldout == set(report.heldout_tasks)
    assert listed["rule"]["seed"] == 3 and all(t["trajectories"] == 3 for t in listed["tasks"])
    assert report.train + report.heldout == 3 * len(ids)


def test_more_data_never_moves_a_task(tmp_path: Path) -> None:
    params = SplitParams(seed=4)
    small = [f"order_status:O-{i}:What i" for i in range(200)]
    split_curated(iter(lines_for(small)), tmp_path / "a", params)
    split_curated(
        iter(lines_for(small + [f"order_status:O-{i}:Where " for i in range(300)])),
        tmp_path / "b",
        params,
    )
    held_a = {t["task_id"] for t in read_heldout_tasks(tmp_path / "a")["tasks"]}
    held_b = {t["task_id"] for t in read_heldout_tasks(tmp_path / "b")["tasks"]}
    assert held_a == {t for t in held_b if t in small}


def test_heldout_tasks_rebuild_in_the_environment(tmp_path: Path, sim_lines: list[str]) -> None:
    """From logs to tasks: ingest (PII scrubbed) -> split -> load_heldout_tasks in the env."""
    src = tmp_path / "logs"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(sim_lines) + "\n")
    paths = IngestPaths(
        tmp_path / "b", tmp_path / "q", tmp_path / "i.sqlite", tmp_path / "s.json", tmp_path / "r"
    )
    ingest(IngestParams(source=str(src)), paths)
    curated = tmp_path / "curated"
    split_curated(iter_lines(paths.batches), curated, SplitParams(heldout_fraction=0.3, seed=0))

    for path in (
        curated / "train.jsonl",
        curated / "heldout.jsonl",
        curated / "heldout_tasks.json",
    ):
        assert not find_pii(path.read_text()), f"PII in {path.name}"
    listed = read_heldout_tasks(curated)["tasks"]
    assert any(t["pseudonymised"] for t in listed), "email tasks are held out under pseudonyms"

    env = SupportDesk()
    rebuilt = load_heldout_tasks(env, curated, PiiParams())
    assert rebuilt.unresolved == [] and len(rebuilt.tasks) == len(listed)
    assert {t.family for t in rebuilt.tasks} == {t["family"] for t in listed}
    assert all(env.reset(t) for t in rebuilt.tasks[:3])
    assert sum(1 for _ in load_train(curated)) + sum(1 for _ in load_heldout(curated)) > 0
