"""Registry logic that needs no store: champion history, promotability, lineage, locks."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest
import yaml

from tracetune.registry.history import (
    APPROVE,
    ChampionState,
    Event,
    dump_state,
    load_state,
    push,
    reconcile,
    record,
    rollback_target,
)
from tracetune.registry.lineage import build_lineage, flatten, outs_for, read_dvc_outs
from tracetune.registry.locking import (
    RegistryLockTimeout,
    file_lock,
    local_store_path,
    lock_file_for,
)


def _approve(state: ChampionState, version: str) -> ChampionState:
    return push(state, Event(APPROVE, version, state.top, "ana", "t"))


def test_rollback_walks_back_through_champions_not_between_two() -> None:
    state = ChampionState()
    for v in ("1", "2", "3"):
        state = _approve(state, v)
    target, skipped, state = rollback_target(state, "3", lambda v: None)
    assert (target, skipped, state.stack) == ("2", [], ("1", "2"))
    target, skipped, state = rollback_target(state, "2", lambda v: None)
    assert (target, state.stack) == ("1", ("1",))
    target, _, _ = rollback_target(state, "1", lambda v: None)
    assert target is None


def test_rollback_skips_versions_that_are_no_longer_usable() -> None:
    state = ChampionState(("1", "2", "3"))
    target, skipped, popped = rollback_target(
        state, "3", lambda v: "rejected" if v == "2" else None
    )
    assert (target, skipped, popped.stack) == ("1", ["2"], ("1",))


def test_reconcile_adopts_an_alias_ahead_of_the_record() -> None:
    state = _approve(ChampionState(), "1")
    assert reconcile(state, "1", "t") is state
    assert reconcile(state, None, "t") is state
    healed = reconcile(state, "4", "t")
    assert healed.stack == ("1", "4") and healed.history[-1].action == "reconcile"


def test_state_round_trips_and_is_trimmed() -> None:
    state = ChampionState()
    for i in range(400):
        state = record(_approve(state, str(i)), Event("reject", str(i), None, "bo", "t", "why"))
    text = dump_state(state)
    back = load_state(text)
    assert len(back.history) == 300 and len(back.stack) == 200
    assert back.history[-1] == state.history[-1]
    assert len(text) < 100_000  # MLflow's limit for a registered-model tag value
    assert load_state(None) == ChampionState()


def _version(status: str, tags: dict[str, str], version: str = "7"):  # type: ignore[no-untyped-def]
    """A real MLflow ModelVersion entity, as the client returns it."""
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    tag_list = [ModelVersionTag(k, v) for k, v in tags.items()]
    return ModelVersion("m", version, 0, status=status, tags=tag_list)


def test_only_ready_gate_passed_versions_are_promotable() -> None:
    from tracetune.registry.approval import promotable_problem, rollback_problem

    passed = {"tracetune.gate.verdict": "passed"}
    assert promotable_problem(_version("READY", passed)) is None
    assert "PENDING_REGISTRATION" in (
        promotable_problem(_version("PENDING_REGISTRATION", passed)) or ""
    )
    assert "no gate verdict" in (promotable_problem(_version("READY", {})) or "")
    failed = {
        "tracetune.gate.verdict": "failed",
        "tracetune.gate.reasons": json.dumps(["FAIL TSR lower 95% bound 0.3 < 0.5", "PASS x"]),
    }
    problem = promotable_problem(_version("READY", failed)) or ""
    assert "did not pass the promotion gate" in problem and "TSR lower" in problem
    assert "PASS x" not in problem
    rejected = passed | {"tracetune.approval.status": "rejected"}
    assert "rejected" in (rollback_problem(_version("READY", rejected)) or "")
    assert rollback_problem(None) == "deleted"


def test_champion_drift_is_rechecked_with_the_stored_gate() -> None:
    from tracetune.registry.approval import champion_drift_problem

    def tagged(tsr: float, champion: str = "none") -> dict[str, str]:
        return {
            "tracetune.eval": json.dumps({"tsr": tsr, "n": 200}),
            "tracetune.gate.champion": champion,
            "tracetune.gate.params": json.dumps({"champion_non_inferiority_margin": 0.1}),
        }

    candidate = _version("READY", tagged(0.70))
    better = _version("READY", tagged(0.95), "9")
    problem = champion_drift_problem(candidate, better) or ""
    assert "champion changed" in problem and "v9" in problem
    similar = _version("READY", tagged(0.71), "9")
    assert champion_drift_problem(candidate, similar) is None
    assert champion_drift_problem(candidate, None) is None


def test_lineage_reads_curated_files_and_model_dir_from_dvc_lock(tmp_path: Path) -> None:
    lock = {
        "schema": "2.0",
        "stages": {
            "split": {"cmd": "x", "outs": [
                {"path": "data/curated/train.jsonl", "md5": "a" * 32, "size": 3},
                {"path": "data/curated/heldout.jsonl", "md5": "b" * 32, "size": 2},
                {"path": "data/other.jsonl", "md5": "e" * 32},
            ]},
            "sft": {"cmd": "y", "outs": [{"path": "models/sft", "md5": "c" * 32 + ".dir"}]},
            "evaluate": {"sft": {"cmd": "z", "outs": [{"path": "reports/eval/sft", "md5": "d"}]}},
        },
    }  # fmt: skip
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    outs = read_dvc_outs(tmp_path / "dvc.lock")
    assert {o.stage for o in outs} == {"split", "sft", "evaluate@sft"}
    data = outs_for(outs, Path("data/curated"), tmp_path)
    assert [o.path for o in data] == ["data/curated/heldout.jsonl", "data/curated/train.jsonl"]
    # the model saved in a sub-folder of the tracked dir, given as an absolute path
    model = outs_for(outs, tmp_path / "models/sft/merged", tmp_path)
    assert [o.md5 for o in model] == ["c" * 32 + ".dir"]
    lineage = build_lineage(
        dvc_lock=tmp_path / "dvc.lock",
        data_dir=Path("data/curated"),
        model_dir=Path("models/sft"),
        git_commit="abc",
    )
    tags = lineage.tags()
    assert tags["tracetune.dvc.models/sft"] == "c" * 32 + ".dir"
    assert tags["tracetune.dvc.data/curated/train.jsonl"] == "a" * 32
    assert tags["tracetune.git_commit"] == "abc"
    missing = build_lineage(dvc_lock=tmp_path / "nope.lock", data_dir=Path("d"),
                            model_dir=Path("m"), git_commit=None)  # fmt: skip
    assert missing.data == [] and missing.tags() == {"tracetune.git_commit": "unknown"}


def test_flatten_params() -> None:
    flat = flatten("", {"sft": {"lr": 0.1, "mods": ["q", "k"]}, "name": "x", "none": None})
    assert flat == {"sft.lr": "0.1", "sft.mods": '["q", "k"]', "name": "x", "none": "null"}


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("sqlite:///mlflow.db", True),
        ("sqlite:////abs/path/mlflow.db", True),
        ("file:///tmp/mlruns", True),
        ("./mlruns", True),
        ("http://127.0.0.1:5000", False),
        ("https://mlflow.example.com", False),
        ("postgresql://u:p@db/mlflow", False),
        ("databricks", True),  # a bare word is a relative path to MLflow too
    ],
)
def test_local_store_detection(uri: str, local: bool) -> None:
    assert (local_store_path(uri) is not None) is local


def test_lock_files_live_outside_the_workspace_one_folder_per_store(tmp_path: Path) -> None:
    import tempfile

    store = local_store_path(f"sqlite:///{tmp_path}/mlflow.db")
    assert store == tmp_path / "mlflow.db"
    lock = lock_file_for(store, "my agent/v")
    assert lock.name == "my_agent_v.lock" and not lock.is_relative_to(tmp_path)
    assert lock.is_relative_to(Path(tempfile.gettempdir()) / "tracetune-locks")
    other = lock_file_for(tmp_path / "elsewhere" / "mlflow.db", "my agent/v")
    assert other != lock  # two workspaces never share a lock by accident


def _hold(path: str, seconds: float, ready: mp.synchronize.Event) -> None:  # type: ignore[name-defined]
    with file_lock(Path(path), timeout_s=5):
        ready.set()
        time.sleep(seconds)


def test_file_lock_excludes_another_process_and_times_out(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(tmp_path / "x.lock"), 1.5, ready))
    proc.start()
    try:
        assert ready.wait(10)
        with pytest.raises(RegistryLockTimeout), file_lock(tmp_path / "x.lock", timeout_s=0.3):
            pass
        started = time.monotonic()
        with file_lock(tmp_path / "x.lock", timeout_s=10):
            assert time.monotonic() - started > 0.3  # waited for the holder to finish
    finally:
        proc.join(10)
