"""Model outputs survive kills: atomic saves (`kill -9` of a real saving process), MLflow runs
that end KILLED / FAILED instead of RUNNING forever (a real SQLite store), and a stage that
never leaves the last run's metrics looking current."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).parents[2]

# A child that saves the tiny model with `tracetune.training.sft.save_model`. With PAUSE set, the
# tokenizer's save first touches READY and sleeps: the weights are written, the save is not done,
# and the parent's `kill -9` lands there every time. Without it, it saves in a loop (random kills).
SAVER = """
import sys, time
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from tracetune.training.sft import save_model

base, out, ready, mode = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(base)
tokenizer = AutoTokenizer.from_pretrained(base)
if mode == "pause":
    real = type(tokenizer).save_pretrained
    def paused(self, *args, **kwargs):
        ready.touch()
        time.sleep(120)
        return real(self, *args, **kwargs)
    type(tokenizer).save_pretrained = paused
    save_model(model, tokenizer, out, lora=False)
else:
    ready.touch()
    while True:
        save_model(model, tokenizer, out, lora=False)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _start(code: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode}: {proc.stderr.read()!r}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child never got ready")
        time.sleep(0.05)


def _kill9(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _loadable(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_dir)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_kill_9_during_the_final_save_leaves_the_old_model_whole(
    tiny_base: Path, tmp_path: Path
) -> None:
    """It once deleted the old model first: a kill left only config.json (and no tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tracetune.training.sft import save_model

    out = tmp_path / "models" / "sft"
    save_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        AutoTokenizer.from_pretrained(tiny_base),
        out,
        lora=False,
    )
    (out / "merged" / "OLD").write_text("the previous run's model\n")
    before = _snapshot(out)

    ready = tmp_path / "ready"
    proc = _start(SAVER, str(tiny_base), str(out), str(ready), "pause")
    _wait_for(ready, proc)
    _kill9(proc)

    assert _snapshot(out) == before, "the old output must be untouched by a killed save"
    _loadable(out / "merged")
    # The next save clears what the killed one left beside it, and replaces the old output.
    save_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        AutoTokenizer.from_pretrained(tiny_base),
        out,
        lora=False,
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["sft"]
    assert not (out / "merged" / "OLD").exists()
    _loadable(out / "merged")


@pytest.mark.slow
def test_kill_9_at_random_moments_of_repeated_saves_never_leaves_half_a_model(
    tiny_base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "models" / "sft"
    rng = random.Random(0)
    for i in range(4):
        ready = tmp_path / f"ready-{i}"
        proc = _start(SAVER, str(tiny_base), str(out), str(ready), "loop")
        _wait_for(ready, proc)
        time.sleep(rng.uniform(0.2, 1.5))
        _kill9(proc)
        if (out / "merged").exists():
            _loadable(out / "merged")
        else:  # killed before the first save completed: nothing was published
            assert not out.exists()


# --- MLflow runs of killed stages ---------------------------------------------------------------
STAGE = """
import sys, time
from pathlib import Path
from tracetune.config import TrackingParams
from tracetune.tracking import stage_run

uri, ready, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
params = TrackingParams(tracking_uri=uri, artifact_location=sys.argv[4], experiment="kills")
with stage_run(params, "sft") as run:
    ready.write_text(run.info.run_id)
    if mode == "fail":
        raise RuntimeError("a failing stage")
    time.sleep(120)
"""


def _run_stage_child(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[bytes], str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ready = tmp_path / f"run-{mode}-{len(list(tmp_path.glob('run-*')))}"
    proc = _start(STAGE, uri, str(ready), mode, str(tmp_path / "artifacts"))
    _wait_for(ready, proc)
    return proc, ready.read_text()


def _status(tmp_path: Path, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return str(client.get_run(run_id).info.status)


def _tracking(tmp_path: Path) -> Any:
    from tracetune.config import TrackingParams

    return TrackingParams(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_location=str(tmp_path / "artifacts"),
        experiment="kills",
    )


def test_a_kill_9_run_is_reaped_at_the_next_start_of_its_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kill -9` cannot be caught: the run stays RUNNING until the stage next starts, which
    marks it KILLED (it once stayed RUNNING forever)."""
    import mlflow

    from tracetune.tracking import stage_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    proc, killed = _run_stage_child(tmp_path, "sleep")
    _kill9(proc)
    assert _status(tmp_path, killed) == "RUNNING"
    with stage_run(_tracking(tmp_path), "sft") as run:
        mine = run.info.run_id
        assert _status(tmp_path, killed) == "KILLED"
    assert _status(tmp_path, mine) == "FINISHED"
    assert "reaped" in mlflow.get_run(killed).data.tags["tracetune.reaped"]


@pytest.mark.slow
def test_signalled_failed_and_live_stage_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracetune.tracking import stage_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # SIGTERM (what DVC, Prefect and `kill` send): the run ends KILLED on the signal.
    proc, termed = _run_stage_child(tmp_path, "sleep")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert _status(tmp_path, termed) == "KILLED"
    # An exception: FAILED.
    proc, failed = _run_stage_child(tmp_path, "fail")
    proc.wait(timeout=60)
    assert proc.returncode != 0 and _status(tmp_path, failed) == "FAILED"
    # A stage still alive in another process is never reaped.
    alive, running = _run_stage_child(tmp_path, "sleep")
    try:
        with stage_run(_tracking(tmp_path), "sft"):
            pass
        assert _status(tmp_path, running) == "RUNNING"
    finally:
        alive.send_signal(signal.SIGTERM)
        alive.wait(timeout=60)
    assert _status(tmp_path, running) == "KILLED"


def test_orphan_check_reads_host_pid_and_start_time() -> None:
    import socket

    from tracetune.tracking import _owner_tags, is_orphaned

    me = _owner_tags()
    assert not is_orphaned(me)
    assert is_orphaned(me | {"tracetune.pid_start": "1"})  # the pid now names another process
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert is_orphaned(me | {"tracetune.pid": gone.stdout.strip()})
    assert not is_orphaned(me | {"tracetune.host": socket.gethostname() + "-other"})
    assert not is_orphaned({"tracetune.stage": "sft"})  # a run from before the owner tags


def test_a_failed_sft_stage_leaves_no_metrics_that_look_current(
    tiny_base: Path, golden_train: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run outside DVC: the last run's metrics/sft.json (and its MLflow run id) must not
    outlive a run that failed; the model folder stays the last complete one."""
    import shutil

    from mlflow.tracking import MlflowClient
    from params_support import paths_under, tracking_under

    from tasks import sft as stage
    from tracetune.config import parse_params

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params(
        {
            "paths": paths_under(tmp_path),
            "tracking": tracking_under(tmp_path, experiment="stale"),
            "base_model": {"name_or_path": str(tiny_base)},
            "sft": {"max_length": 32},  # no example fits: the stage fails before training
        }
    )
    params.paths.curated_dir.mkdir(parents=True)
    shutil.copy(golden_train, params.paths.curated_dir / "train.jsonl")
    metrics = params.paths.metrics / "sft.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"steps": 30, "mlflow_run_id": "an-older-run"}))
    with pytest.raises(ValueError, match=r"fits sft\.max_length=32"):
        stage.run(params)
    assert not metrics.exists()
    client = MlflowClient(tracking_uri=params.tracking.tracking_uri)
    experiment = client.get_experiment_by_name("stale")
    assert experiment is not None
    runs: list[Any] = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
