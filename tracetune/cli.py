"""The `tracetune` command: thin wrappers over the stages; heavy imports stay inside commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="tracetune: agent logs -> gated data -> SFT/RLVR -> evaluated, registered model.",
    no_args_is_help=True,
    add_completion=False,
)
env_app = typer.Typer(help="Inspect the tool environment.", no_args_is_help=True)
params_app = typer.Typer(help="Check params.yaml.", no_args_is_help=True)
app.add_typer(env_app, name="env")
app.add_typer(params_app, name="params")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Path to params.yaml.")]


def _load(path: Path):  # type: ignore[no-untyped-def]
    from tracetune.config import ParamsError, load_params

    try:
        return load_params(path)
    except ParamsError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


@params_app.command("check")
def params_check(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate params.yaml against the typed schema and print the resolved values."""
    import yaml

    loaded = _load(params)
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
    """Write simulated production logs (JSONL) from a noisy prompt-only agent and summarise them."""
    from tasks.simulate import run
    from tracetune.reporting import print_simulation_summary

    loaded = _load(params)
    sim = loaded.simulate.model_copy(
        update={k: v for k, v in {"n_trajectories": n, "seed": seed}.items() if v is not None}
    )
    paths = loaded.paths.model_copy(update={"raw_logs": out} if out else {})
    print_simulation_summary(run(loaded.model_copy(update={"simulate": sim, "paths": paths})))


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
    """Run the oracle solver over n tasks and print its task success rate (should be 1.0)."""
    from tracetune.environments.base import load_environment
    from tracetune.environments.support_desk import oracle_solver
    from tracetune.trajectories.episode import run_scripted

    loaded = _load(params)
    env = load_environment(loaded.environment.class_path, **loaded.environment.kwargs)
    tasks = env.tasks(n, seed=seed)
    wins = sum(run_scripted(env, t, oracle_solver(t)).outcome.success for t in tasks)
    typer.echo(f"oracle TSR: {wins / len(tasks):.3f} ({wins}/{len(tasks)})")


@app.command("run")
def run_pipeline(params: ParamsOpt = Path("params.yaml")) -> None:
    """Run the whole pipeline on the configured data (the README's main job)."""
    from tasks.simulate import run
    from tracetune.reporting import print_simulation_summary

    loaded = _load(params)
    print_simulation_summary(run(loaded))


def main() -> None:  # pragma: no cover - console entry
    app()
