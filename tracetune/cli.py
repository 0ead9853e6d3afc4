"""The `tracetune` command: thin wrappers over the stages; heavy imports stay inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tracetune.registry.commands import attach as attach_registry_commands

app = typer.Typer(
    help="tracetune: agent logs -> gated data -> SFT/RLVR -> evaluated, registered model.",
    no_args_is_help=True,
    add_completion=False,
)
env_app = typer.Typer(help="Inspect the tool environment.", no_args_is_help=True)
params_app = typer.Typer(help="Check params.yaml.", no_args_is_help=True)
app.add_typer(env_app, name="env")
app.add_typer(params_app, name="params")
# approve, reject, rollback, predict, registry status (docs/registry.md)
attach_registry_commands(app)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Path to params.yaml.")]


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"tracetune {version('tracetune')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print version."),
    ] = False,
) -> None:
    """tracetune: agent logs -> gated data -> SFT/RLVR -> evaluated, registered model."""


def _load(path: Path):  # type: ignore[no-untyped-def]
    from tracetune.config import ParamsError, load_params

    try:
        return load_params(path)
    except ParamsError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


@params_app.command("check")
def params_check(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate params.yaml against the typed schema, build the environment it names, and
    print the resolved values."""
    import yaml

    from tracetune.config import ParamsError, check_environment

    loaded = _load(params)
    try:
        check_environment(loaded.environment, str(params))
    except ParamsError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False))
    typer.secho("params OK", fg="green")


@app.command("simulate-logs")
def simulate_logs(
    params: ParamsOpt = Path("params.yaml"),
    n: Annotated[
        int | None, typer.Option(help="Trajectories (overrides simulate.n_trajectories).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (overrides simulate.seed).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (overrides paths.raw_logs).")
    ] = None,
) -> None:
    """Write simulated production logs (JSONL): the environment's oracle played as a noisy
    production agent (wrong tools, wrong arguments, error retries, early and wrong answers)."""
    from tasks.simulate import run
    from tracetune.environments.base import NoOracleError
    from tracetune.reporting import print_simulation_summary

    loaded = _load(params)
    sim = loaded.simulate.model_copy(
        update={k: v for k, v in {"n_trajectories": n, "seed": seed}.items() if v is not None}
    )
    paths = loaded.paths.model_copy(update={"raw_logs": out} if out else {})
    try:
        summary = run(loaded.model_copy(update={"simulate": sim, "paths": paths}))
    except NoOracleError as exc:
        typer.secho(f"error: cannot simulate logs: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    print_simulation_summary(summary)


@env_app.command("tools")
def env_tools(params: ParamsOpt = Path("params.yaml")) -> None:
    """Print the environment's tools as OpenAI function schemas."""
    import json

    from tracetune.environments.base import load_environment

    loaded = _load(params)
    env = load_environment(loaded.environment.class_path, **loaded.environment.kwargs)
    typer.echo(json.dumps(env.tool_schemas(), indent=2))


@env_app.command("oracle")
def env_oracle(
    params: ParamsOpt = Path("params.yaml"),
    n: Annotated[int, typer.Option(help="Tasks to solve.")] = 200,
    seed: Annotated[int, typer.Option(help="Task seed.")] = 0,
) -> None:
    """Run the environment's oracle over n tasks (all of a shorter fixed list) through the real
    tools and print its task success rate, which should be 1.000; exit 1 below that, or when
    the environment has no oracle."""
    from tracetune.environments.base import NoOracleError, draw_tasks, load_environment
    from tracetune.trajectories.episode import run_scripted

    loaded = _load(params)
    env = load_environment(
        loaded.environment.class_path,
        max_steps=loaded.environment.max_steps,
        **loaded.environment.kwargs,
    )
    tasks = draw_tasks(env, n, seed)
    if not tasks:
        typer.secho(f"error: environment {env.name!r} gives no tasks", fg="red", err=True)
        raise typer.Exit(1)
    failed: list[str] = []
    try:
        for task in tasks:
            episode = run_scripted(env, task, env.require_oracle(task))
            if not episode.outcome.success:
                failed.append(f"{task.id}: {episode.outcome.details}")
    except NoOracleError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    wins = len(tasks) - len(failed)
    note = f"; the fixed list has {len(tasks)} tasks" if len(tasks) < n else ""
    typer.echo(f"oracle TSR: {wins / len(tasks):.3f} ({wins}/{len(tasks)}{note})")
    for line in failed[:10]:
        typer.echo(f"  failed {line}")
    if failed:
        raise typer.Exit(1)


data_app = typer.Typer(
    help="The data stages one by one (what dvc.yaml runs): docs/data.md.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
DATA_STAGES = ("ingest", "validate_raw", "curate", "split", "validate_curated")


def _data_stage(stage: str, params: Path) -> None:
    import importlib

    importlib.import_module(f"tasks.{stage}").main([str(params)])


def _data_command(stage: str, doc: str) -> None:
    def command(params: ParamsOpt = Path("params.yaml")) -> None:
        _data_stage(stage, params)

    command.__doc__ = doc
    data_app.command(stage.replace("_", "-"))(command)


for _stage, _doc in zip(
    DATA_STAGES,
    (
        "Ingest what arrived since the last batch: quarantine, PII scrub, watermark.",
        "Great Expectations gate on the newest ingested batch.",
        "Golden filter and exact/near-duplicate removal over every batch.",
        "Train / held-out split by task id, heldout_tasks.json, data summary.",
        "Great Expectations gate on the curated set.",
    ),
    strict=True,
):
    _data_command(_stage, _doc)


@app.command("run")
def run_pipeline(
    params: ParamsOpt = Path("params.yaml"),
    ingest_source: Annotated[
        str | None, typer.Option(help="Log source (overrides ingest.source in params.yaml).")
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="A partial params file (e.g. params-smollm2.yaml) written over params.yaml first."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="key.path=value written into params.yaml (after --profile)."),
    ] = None,
) -> None:
    """Run the whole pipeline as the Prefect flow (the README's main job).

    Without PREFECT_API_URL, Prefect starts its temporary local API: no server to run by hand.
    `dvc repro` runs the same stages without Prefect. `--profile` and `--set` write their values
    into params.yaml (comments kept) before the first stage, so dvc.lock records what ran
    (`git checkout params.yaml` returns to the default).
    """
    import os

    from tracetune.config import ParamsError, load_profile, parse_assignments

    try:
        overrides = load_profile(profile) if profile else {}
        overrides |= parse_assignments(set_ or [])
    except ParamsError as exc:
        typer.secho(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    # Set before Prefect is imported: it reads its settings once (STACK.md, Prefect 3.8.8 traps).
    for key, value in {
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }.items():
        os.environ.setdefault(key, value)
    _load(params)
    if params.name != "params.yaml":
        typer.secho("error: the stages (dvc repro) read the params.yaml beside dvc.yaml", err=True)
        raise typer.Exit(2)
    from flows.retrain import run_local

    if not run_local(params.resolve().parent, ingest_source=ingest_source, overrides=overrides):
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry
    app()
