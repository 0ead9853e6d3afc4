"""The retraining flow: production logs -> gated data -> SFT/RLVR -> evaluation -> registry.

`retrain` reads like the pipeline's table of contents, one line per stage. Every stage runs
through `dvc repro --single-item` (flows/stages.py), so `dvc.yaml` holds the only copy of each
command, `dvc.lock` stays the lineage record, and unchanged stages are skipped; `dvc repro` alone
runs the same pipeline without Prefect. Stages that `dvc.yaml` does not define yet are skipped
with a logged note, so the flow works while the pipeline grows.

Run it embedded (`tracetune run`: Prefect's temporary local API, no server by hand) or as the
`retrain/nightly` deployment (prefect.yaml: cron, `cpu` pool, logs from S3, training stages
dispatched to the `gpu` pool through the `train-stage/gpu-train` deployment).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.stages import (
    StageFailed,
    StageResult,
    dvc_transfer,
    eval_rows,
    publish_eval_table,
    run_stage,
    run_training_stage,
)
from flows.summary import eval_console_table, what_next
from flows.verdict import REFUSED, REFUSED_TAG, publish_verdict, refusal_message, refuse_promotion
from tracetune.config import Params, load_params, parse_params
from tracetune.tracking import export_prefect_context

PARAMS_FILE = "params.yaml"
RUN_RECORD = "orchestration.json"


# --- the flows ----------------------------------------------------------------------------------


@flow(name="retrain", log_prints=True)
def retrain(
    repo: str = ".",
    ingest_source: str | None = None,
    dispatch_training: bool = False,
    approval: str = "auto",
    params_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ingest new production logs, gate, curate, train, evaluate, register, ask for approval.

    `ingest_source` and `params_overrides` (dotted keys, e.g. `tracking.artifact_location`) are
    written into params.yaml, so that dvc.lock records the values the stages really used;
    `dispatch_training` sends training stages to the `gpu` pool instead of running them in this
    process; `approval` is how a passing challenger meets its reviewer (`APPROVAL_MODES`).
    """
    if approval not in APPROVAL_MODES:
        raise ValueError(f"approval must be one of {', '.join(APPROVAL_MODES)}, not {approval!r}")
    overrides = dict(params_overrides or {})
    if ingest_source:
        overrides["ingest.source"] = ingest_source
    run = Pipeline.start(
        Path(repo), overrides=overrides, dispatch=dispatch_training, approval=approval
    )
    run.pull()  # the DVC cache, when the workspace is not shared
    run.stage("simulate", when=run.local_source)  # the embedded default's "production" logs
    run.stage("ingest")  # new logs since the watermark (always run)
    run.push("ingest")  # version the snapshot on the DVC remote
    run.stage("validate_raw")  # GE gate on the batch; failure: Failed + report
    run.stage("curate")  # golden filter, dedupe
    run.stage("split")  # leakage-free train / held-out by task
    run.stage("validate_curated")  # GE gate on the curated set
    run.train("base_model")  # the embedded tiny base (a no-op for hub models)
    run.stage("evaluate@base")  # prompt-only baseline on held-out tasks
    run.train("sft")  # SFT on golden trajectories
    run.stage("evaluate@sft")
    run.train("rlvr")  # GRPO; the stage applies the rule (SFT TSR < bar)
    run.stage("evaluate@rlvr")
    run.stage("compare")  # the models beside production and the floor (dvc metrics/plots)
    run.eval_table()  # markdown comparison artifact
    run.stage("register")  # MLflow model version, alias `challenger`
    run.promote()  # gate-verdict artifact, gate tag; approval flow -> alias `champion`
    run.push()  # every remaining out to the DVC remote
    return run.finish()  # the record; a refused model: a Completed state named Refused


@flow(name="train-stage", log_prints=True)
def train_stage(stage: str, repo: str = ".") -> dict[str, Any]:
    """One training stage on a GPU worker (the `gpu-train` deployment); never retried."""
    root = Path(repo).resolve()
    params = load_params(root / PARAMS_FILE)
    every = params.orchestrate.progress_every_s
    return run_training_stage(stage, str(root), str(params.paths.reports), every).as_dict()


def run_local(
    repo: Path, ingest_source: str | None = None, overrides: dict[str, Any] | None = None
) -> bool:
    """Run `retrain` in this process (`tracetune run`); True when it completed.

    With no PREFECT_API_URL set, Prefect starts its temporary local API for the run and stops it
    afterwards, so the README's main command needs no server started by hand.
    """
    state = retrain(
        repo=str(repo),
        ingest_source=ingest_source,
        params_overrides=overrides or None,
        return_state=True,
    )
    if state.is_completed():
        if state.name == REFUSED:
            print(f"retrain completed; {state.message}")
        return True
    error = state.result(raise_on_failure=False)
    print(f"retrain ended {state.name}: {error}")
    return False


# --- what the table of contents calls -----------------------------------------------------------


def share_pii_key(params: Params, root: Path) -> None:
    """Refuse to start a production run without a secret pseudonym key (`PiiKeyMissing`).

    A key from a Prefect Secret block is handed to the stage processes through `key_env`, as
    `dvc repro` runs them without this flow's Prefect client.
    """
    from tracetune.trajectories.pii import key_for

    pii = params.ingest.pii
    key = key_for(params, root)
    if key.origin.startswith("Prefect Secret"):
        os.environ[pii.key_env] = key.value.decode()


@dataclass
class Pipeline:
    """One run's context (repo, params, the stages dvc.yaml defines) and what each stage did."""

    root: Path
    params: Params
    dvc: DvcView
    dispatch: bool
    approval: str = "auto"
    started: float = field(default_factory=time.perf_counter)
    gate: str | None = None  # the flow run's gate tag, once the register stage has run
    results: list[StageResult] = field(default_factory=list)

    @classmethod
    def start(
        cls, repo: Path, overrides: dict[str, Any], dispatch: bool, approval: str = "auto"
    ) -> Pipeline:
        root = repo.resolve()
        started = time.perf_counter()
        if overrides:
            override_params(root / PARAMS_FILE, overrides)
        params = load_params(root / PARAMS_FILE)
        share_pii_key(params, root)
        export_prefect_context()  # stage processes nest their MLflow runs under this flow run
        dvc = read_dvc_repo(root)
        log = get_run_logger()
        log.info("repo %s: dvc.yaml defines %s", root, ", ".join(sorted(dvc.stages)) or "nothing")
        unknown = sorted(dvc.stages - set(TABLE_OF_CONTENTS))
        if unknown:
            log.warning("dvc.yaml stages the flow does not run: %s", ", ".join(unknown))
        return cls(root, params, dvc, dispatch, approval, started=started)

    @property
    def local_source(self) -> bool:
        """The simulated logs feed ingest only when the source is a local path."""
        return "://" not in self.params.ingest.source

    @property
    def orchestrate(self) -> Any:
        return self.params.orchestrate

    def _skip(self, name: str, status: str, note: str) -> StageResult:
        get_run_logger().info("skipping %s: %s", name, note)
        result = StageResult(name, status, note=note)
        self.results.append(result)
        return result

    def _not_runnable(self, name: str) -> StageResult | None:
        """A skip record when dvc.yaml lacks the stage, or an input does not exist by now."""
        if name not in self.dvc.stages:
            return self._skip(name, "missing", "not in dvc.yaml yet")
        absent = [d for d in self.dvc.deps.get(name, ()) if not (self.root / d).exists()]
        if absent:
            note = f"needs {', '.join(absent)}: its stage is not in dvc.yaml yet or was skipped"
            return self._skip(name, "blocked", note)
        return None

    def stage(self, name: str, when: bool = True) -> StageResult:
        """Run a non-training stage (transient failures retried) if dvc.yaml defines it."""
        skipped = self._not_runnable(name)
        if skipped:
            return skipped
        if not when:
            return self._skip(name, "skipped", "not needed for this source")
        opts = self.orchestrate
        task = run_stage.with_options(
            retries=opts.transient_retries, retry_delay_seconds=opts.retry_delay_s
        )
        result = task(
            name,
            str(self.root),
            str(self.params.paths.reports),
            force=name in opts.force_stages,
            progress_every_s=opts.progress_every_s,
        )
        note = nothing_validated(self.root / self.params.paths.metrics, name)
        if note:  # a gate that checked nothing must not read as a pass
            get_run_logger().warning("%s: nothing to validate: %s", name, note)
            result = replace(result, status="nothing-to-validate", note=note)
        self.results.append(result)
        return result

    def train(self, name: str) -> StageResult:
        """Run a training stage here or on the gpu pool; never retried."""
        skipped = self._not_runnable(name)
        if skipped:
            return skipped
        if name not in self.orchestrate.training_stages:
            return self.stage(name)
        if self.dispatch:
            result = dispatch_to_gpu(self.orchestrate.gpu_deployment, name, self.root)
        else:
            reports, every = str(self.params.paths.reports), self.orchestrate.progress_every_s
            result = run_training_stage(name, str(self.root), reports, every)
        self.results.append(result)
        return result

    def _transfer(self, verb: str, targets: list[str], enabled: bool) -> None:
        label = f"dvc {verb}"
        if not enabled:
            return
        if self.dvc.remote is None:
            self._skip(label, "skipped", "no default DVC remote configured")
            return
        missing = [t for t in targets if t not in self.dvc.stages]
        if missing:
            self._skip(label, "skipped", f"{', '.join(missing)} not in dvc.yaml yet")
            return
        opts = self.orchestrate
        task = dvc_transfer.with_options(
            retries=opts.transient_retries, retry_delay_seconds=opts.retry_delay_s
        )
        seconds = task(verb, str(self.root), targets)
        self.results.append(StageResult(label, "ran", seconds, note=" ".join(targets)))

    def pull(self) -> None:
        self._transfer("pull", [], self.orchestrate.dvc_pull)

    def push(self, *targets: str) -> None:
        self._transfer("push", list(targets), self.orchestrate.dvc_push)

    def eval_table(self) -> str:
        metrics = self.root / self.params.paths.metrics
        table: str = publish_eval_table(str(metrics))
        if table:  # the artifact keeps every column; the console a rounded few
            print(f"Evaluation on held-out tasks:\n{eval_console_table(eval_rows(metrics))}")
        return table

    def promote(self) -> StageResult:
        """Publish the gate's verdict (flows/verdict.py) and hand a registered challenger to the
        approval flow (flows/approval.py), which moves `champion` on a reviewer's yes; a version
        that failed the gate is not offered: its `promote` task ends Refused."""
        registered = read_registration(self.root / self.params.paths.metrics)
        ran = any(r.name == "register" and r.status == "ran" for r in self.results)
        if not ran or registered is None:
            return self._skip("promote", "skipped", "nothing newly registered in this run")
        version = str(registered.get("version"))
        mode = self.approval
        if mode == "auto":
            mode = "inline" if self.params.registry.auto_approve else "none"
        self.gate = publish_verdict(registered, self.eval_report(registered))
        if registered.get("verdict") != "passed":
            return self._refused(version, refusal_message(registered))
        if registered.get("auto_approved"):
            return self._skip("promote", "skipped", f"v{version} auto-approved (registry)")
        if mode == "none":
            model = registered.get("model") or self.params.tracking.registered_model
            note = (
                f"v{version} is challenger: `tracetune approve {model} {version} --by NAME` "
                "to promote it"
            )
            return self._skip("promote", "skipped", note)
        started = time.perf_counter()
        if mode == "deployment":
            note = request_approval(self.orchestrate.approval_deployment, version, self.root)
            status = "dispatched"
        else:
            from flows.approval import approval

            # params hold repo-relative paths (the MLflow store): resolve them where DVC does
            with contextlib.chdir(self.root):
                decision = approval(version=version, params_file=str(self.root / PARAMS_FILE))
            note, status = f"v{version}: {decision.get('action', decision)}", "ran"
        result = StageResult("promote", status, round(time.perf_counter() - started, 3), note)
        self.results.append(result)
        return result

    def eval_report(self, registered: dict[str, Any]) -> str:
        """Where the registered candidate's evaluation report is (for the verdict artifact)."""
        from tracetune.registry.register import candidate_paths

        candidate = str(registered.get("candidate") or self.params.registry.candidate)
        return str(candidate_paths(self.params, candidate).report_dir / "report.md")

    def _refused(self, version: str, message: str) -> StageResult:
        """The promote task ends Cancelled, named Refused, with the failed checks as message."""
        refuse_promotion(version, message, return_state=True)
        result = StageResult("promote", "refused", note=message)
        self.results.append(result)
        return result

    def finish(self) -> Any:
        """The run record: each stage's own time vs the flow's, in metrics/orchestration.json.

        Returned as is, it makes the flow run Completed; when the gate refused the model, inside
        a Completed state named Refused, so the run list says what happened (docs/registry.md).
        """
        from prefect.states import Completed

        record = run_record(self.results, time.perf_counter() - self.started)
        path = self.root / self.params.paths.metrics / RUN_RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(summary_table(record))
        print(what_next(self.root, self.params, record["stages"]))
        if self.gate != REFUSED_TAG:
            return record
        refused = next(r.note for r in self.results if r.status == "refused")
        return Completed(name=REFUSED, message=refused, data=record)


# How a passing challenger meets its reviewer. auto: `inline` when registry.auto_approve is on,
# else `none`; inline: the approval flow as a subflow (blocks until a decision or its timeout);
# deployment: a run of the approval deployment that waits in the UI while this run ends;
# none: leave the challenger and print how to approve it.
APPROVAL_MODES = ("auto", "inline", "deployment", "none")

# The stage names `retrain` runs, in order: what `dvc.yaml` is expected to define.
TABLE_OF_CONTENTS = (
    "simulate",
    "ingest",
    "validate_raw",
    "curate",
    "split",
    "validate_curated",
    "base_model",
    "evaluate@base",
    "sft",
    "evaluate@sft",
    "rlvr",
    "evaluate@rlvr",
    "compare",
    "register",
)


# --- small helpers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DvcView:
    """What the flow needs to know of the DVC project before running anything."""

    stages: frozenset[str]  # foreach expanded: `evaluate@sft`
    remote: str | None  # the default remote, if any
    deps: dict[str, tuple[str, ...]]  # stage -> its local inputs, relative to the repo


def read_dvc_repo(root: Path) -> DvcView:
    """Stages, the default remote, and each stage's local inputs.

    The inputs let the flow skip, with a note, a stage whose input comes from a stage that is
    not written yet (register before evaluate@sft exists): the TOC runs in order, so an input
    that does not exist when its consumer's turn comes will not appear later in the run.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
        remote = repo.config.get("core", {}).get("remote")
        deps = {
            stage.name: tuple(
                os.path.relpath(d.fs_path, root) for d in stage.deps if d.fs.protocol == "local"
            )
            for stage in stages
        }
    return DvcView(frozenset(s.name for s in stages), remote, deps)


def override_params(path: Path, overrides: dict[str, Any]) -> None:
    """Write dotted-key overrides into params.yaml, comments kept.

    Overrides go into the file, not the environment, because `dvc repro` reads params.yaml and
    dvc.lock records its values: the lineage then says where the data really came from.
    """
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(str(path)) as data:
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            node = data
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        # Validate before the file is written: a bad override fails with its key path and
        # leaves params.yaml as it was.
        parse_params(dict(data), source=f"{path} with overrides {sorted(overrides)}")


def dispatch_to_gpu(deployment: str, name: str, root: Path) -> StageResult:
    """Run a training stage as a flow run of the gpu-pool deployment and wait for it."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    started = time.perf_counter()
    flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync context
        name=deployment, parameters={"stage": name, "repo": str(root)}, timeout=None
    )
    seconds = round(time.perf_counter() - started, 3)
    state = flow_run.state
    if state is None or not state.is_completed():
        raise StageFailed(
            f"training stage {name!r} on {deployment} ended {state.name if state else 'unknown'}",
            stage=name,
        )
    return StageResult(name, "dispatched", seconds, note=f"{deployment} run {flow_run.id}")


def read_registration(metrics_dir: Path) -> dict[str, Any] | None:
    """What the register stage wrote this run (`register.json`), if it ran."""
    path = metrics_dir / "register.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else None


def request_approval(deployment: str, version: str, root: Path) -> str:
    """Start the approval deployment for `version` without waiting: a reviewer may take a day."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    flow_run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync context
        name=deployment,
        parameters={"version": version, "params_file": str(root / PARAMS_FILE)},
        timeout=0,
        as_subflow=False,
    )
    return f"v{version} awaits a reviewer in {deployment} run {flow_run.id}"


def nothing_validated(metrics_dir: Path, stage: str) -> str | None:
    """The note of a gate stage whose metrics say it had nothing to check, else None."""
    path = metrics_dir / f"{stage}.json"
    if not stage.startswith("validate_") or not path.exists():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if metrics.get("status") != "nothing_to_validate":
        return None
    return str(metrics.get("note") or "nothing to validate")


def run_record(results: list[StageResult], wall_s: float) -> dict[str, Any]:
    """Stage time vs flow wall time: the rest is what orchestration costs."""
    stage_s = sum(r.seconds for r in results)
    return {
        "wall_s": round(wall_s, 3),
        "stage_s": round(stage_s, 3),
        "overhead_s": round(wall_s - stage_s, 3),
        "overhead_share": round((wall_s - stage_s) / wall_s, 4) if wall_s > 0 else 0.0,
        "stages": [r.as_dict() for r in results],
    }


def summary_table(record: dict[str, Any]) -> str:
    """A plain-text summary for the console: one line per stage, then the totals."""
    lines = [f"{'stage':<20} {'status':<11} {'seconds':>8}  note"]
    for s in record["stages"]:
        lines.append(f"{s['name']:<20} {s['status']:<11} {s['seconds']:>8.2f}  {s['note']}")
    lines.append(
        f"flow {record['wall_s']:.1f} s, stages {record['stage_s']:.1f} s, orchestration "
        f"{record['overhead_s']:.1f} s ({100 * record['overhead_share']:.1f}%)"
    )
    return "\n".join(lines)
