"""CLI commands of the registry: approve, reject, rollback, predict, registry status.

They live here, beside the code they drive, and `tracetune/cli.py` attaches them to its app
with `attach(app)`: importing this module costs only typer; MLflow, torch and transformers are
imported inside the commands, so `tracetune --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from tracetune.config import Params
    from tracetune.registry.client import Registry

registry_app = typer.Typer(help="Inspect the model registry.", no_args_is_help=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Path to params.yaml.")]
ByOpt = Annotated[str, typer.Option("--by", help="Who decides (stored on the version).")]
NoteOpt = Annotated[str, typer.Option("--note", help="Why (stored on the version).")]
ModelArg = Annotated[str, typer.Argument(help="Registered model name.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _params(path: Path) -> Params:
    from tracetune.config import ParamsError, load_params

    try:
        return load_params(path)
    except ParamsError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


def _registry(params_path: Path, model: str | None) -> Registry:
    from tracetune.registry.client import open_registry

    params = _params(params_path)
    return open_registry(params.tracking, model, params.registry.lock_timeout_s)


def _fail(exc: Exception) -> typer.Exit:
    typer.secho(f"error: {exc}", fg="red", err=True)
    return typer.Exit(1)


def _default_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def approve_cmd(
    model: ModelArg,
    version: Annotated[str, typer.Argument(help="Version number to make champion.")],
    by: ByOpt,
    note: NoteOpt = "",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Approve a gate-passed version: it becomes `champion` (the old one stays for rollback)."""
    from tracetune.registry.approval import approve
    from tracetune.registry.client import RegistryError

    try:
        decision = approve(_registry(params, model), version, by, note)
    except RegistryError as exc:
        raise _fail(exc) from None
    typer.secho(decision.message, fg="green")


def reject_cmd(
    model: ModelArg,
    version: Annotated[str, typer.Argument(help="Version number to reject.")],
    by: ByOpt,
    note: NoteOpt = "",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Reject a version: recorded on it; it loses `challenger`; the champion does not move."""
    from tracetune.registry.approval import reject
    from tracetune.registry.client import RegistryError

    try:
        decision = reject(_registry(params, model), version, by, note)
    except RegistryError as exc:
        raise _fail(exc) from None
    typer.secho(decision.message, fg="yellow")


def rollback_cmd(
    model: ModelArg,
    by: Annotated[str | None, typer.Option("--by", help="Operator (default: $USER).")] = None,
    note: NoteOpt = "",
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Move `champion` back to the previous approved version."""
    from tracetune.registry.approval import rollback
    from tracetune.registry.client import RegistryError

    try:
        decision = rollback(_registry(params, model), by or _default_user(), note)
    except RegistryError as exc:
        raise _fail(exc) from None
    typer.secho(decision.message, fg="yellow")


def predict_cmd(
    model: Annotated[
        str | None, typer.Option("--model", help="Registered model (default: params).")
    ] = None,
    alias: Annotated[str, typer.Option(help="Alias to load.")] = "champion",
    task_id: Annotated[str | None, typer.Option("--task-id", help="Task to run.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the task draw when no --task-id.")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per assistant turn.")] = 128,
    as_json: JsonOpt = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Serving check: load models:/<model>@champion and run one agent episode."""
    from tracetune.registry.client import RegistryError
    from tracetune.registry.serving import predict

    loaded = _params(params)
    try:
        report = predict(
            loaded, model, alias, task_id=task_id, seed=seed, max_new_tokens=max_new_tokens
        )
    except RegistryError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    typer.echo(f"{report.model_uri} (v{report.version}) on task {report.task_id} [{report.family}]")
    typer.echo(f"goal: {report.goal}")
    for message in report.messages[2:]:
        typer.echo(f"  {_message_line(message)}")
    outcome = "success" if report.success else f"failure ({report.failure})"
    typer.secho(
        f"{outcome}: {report.steps} steps, ended by {report.ended_by}, {report.seconds:.2f} s",
        fg="green" if report.success else "yellow",
    )


def _message_line(message: dict[str, Any], width: int = 160) -> str:
    """One transcript line: role, then the content or the tool calls."""
    if message.get("tool_calls"):
        calls = ", ".join(
            f"{c['function']['name']}({c['function']['arguments']})" for c in message["tool_calls"]
        )
        text = f"calls {calls}"
    else:
        text = str(message.get("content") or "")
    text = " ".join(text.split())
    return f"{message['role']:>9}: {text[:width]}{'...' if len(text) > width else ''}"


def status_cmd(
    model: Annotated[str | None, typer.Argument(help="Registered model (default: params).")] = None,
    limit: Annotated[int, typer.Option(help="Versions shown (newest first).")] = 20,
    as_json: JsonOpt = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Aliases, versions with gate verdicts and decisions, and the champion history."""
    from mlflow.exceptions import MlflowException

    from tracetune.registry.approval import registry_status
    from tracetune.registry.client import RegistryError

    try:
        status = registry_status(_registry(params, model), limit)
    except (MlflowException, RegistryError) as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    print_status(status)


def print_status(status: dict[str, Any]) -> None:
    """The status as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    aliases = ", ".join(f"@{k} -> v{v}" for k, v in sorted(status["aliases"].items())) or "none"
    console.print(f"[bold]{status['model']}[/]  aliases: {aliases}")
    table = Table(title="versions (newest first)")
    for column in ("v", "status", "aliases", "candidate", "TSR [95% CI]", "gate", "decision"):
        table.add_column(column)
    for row in status["versions"]:
        low, high = row["tsr_ci"]
        tsr = f"{row['tsr']:.3f} [{low:.3f}, {high:.3f}]" if row["tsr"] is not None else "-"
        gate = row["gate"] + (f" ({row['failed']})" if row["failed"] else "")
        decision = f"{row['approval']} by {row['by']}" if row["approval"] else ""
        if row["rolled_back"]:
            decision += " (rolled back)"
        table.add_row(row["version"], row["status"], ",".join(row["aliases"]),
                      row["candidate"] or "", tsr, gate, decision)  # fmt: skip
    console.print(table)
    history = Table(title="champion history (oldest first)")
    for column in ("at", "action", "version", "previous", "by", "note"):
        history.add_column(column)
    for event in status["history"]:
        history.add_row(event["at"], event["action"], f"v{event['version']}",
                        f"v{event['previous']}" if event["previous"] else "-", event["by"],
                        event.get("note", ""))  # fmt: skip
    console.print(history)
    for problem in status["problems"]:
        console.print(f"[red]problem:[/] {problem}")


def attach(app: typer.Typer) -> None:
    """Add the registry commands to the `tracetune` app."""
    app.command("approve")(approve_cmd)
    app.command("reject")(reject_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("predict")(predict_cmd)
    registry_app.command("status")(status_cmd)
    app.add_typer(registry_app, name="registry")
