"""The `tracetune` command, run in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tracetune.cli import app

REPO = Path(__file__).parents[2]
runner = CliRunner()


def _commands(typer_app: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import typer.main

    group = typer.main.get_command(typer_app)  # type: ignore[arg-type]
    out: list[tuple[str, ...]] = [prefix]
    for name, cmd in getattr(group, "commands", {}).items():
        out.append((*prefix, name))
        out += [(*prefix, name, sub) for sub in getattr(cmd, "commands", {})]
    return out


@pytest.mark.parametrize("command", _commands(app))
def test_every_command_has_help(command: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_params_check_accepts_the_repo_file_and_rejects_typos(tmp_path: Path) -> None:
    ok = runner.invoke(app, ["params", "check", "--params", str(REPO / "params.yaml")])
    assert ok.exit_code == 0 and "params OK" in ok.output
    bad = tmp_path / "params.yaml"
    bad.write_text("simulate:\n  n_trajectoris: 5\n")
    result = runner.invoke(app, ["params", "check", "--params", str(bad)])
    assert result.exit_code == 2
    assert "simulate.n_trajectoris: unknown key" in result.output


def test_simulate_logs_writes_jsonl_and_prints_summary(in_tmp: Path) -> None:
    shutil.copy(REPO / "params.yaml", in_tmp / "params.yaml")
    result = runner.invoke(app, ["simulate-logs", "--n", "60", "--seed", "2", "--out", "logs"])
    assert result.exit_code == 0, result.output
    assert "TSR per task family" in result.output
    lines = [ln for p in (in_tmp / "logs").glob("*.jsonl") for ln in p.read_text().splitlines()]
    assert len(lines) >= 60
    metrics = json.loads((in_tmp / "metrics" / "simulate.json").read_text())
    assert metrics["trajectories"] == 60 and 0 <= metrics["tsr"] <= 1


def test_env_commands(in_tmp: Path) -> None:
    shutil.copy(REPO / "params.yaml", in_tmp / "params.yaml")
    tools = runner.invoke(app, ["env", "tools"])
    assert tools.exit_code == 0
    assert {t["function"]["name"] for t in json.loads(tools.output)} >= {"get_order", "calculate"}
    oracle = runner.invoke(app, ["env", "oracle", "--n", "40"])
    assert oracle.exit_code == 0 and "oracle TSR: 1.000" in oracle.output


@pytest.mark.parametrize(
    ("environment", "says"),
    [
        ("  class_path: no_such_package.Env\n", "environment.class_path: cannot import"),
        ("  class_path: collections.OrderedDict\n", "environment.class_path: 'collections"),
        ("  kwargs: {colour: red}\n", "environment.kwargs: SupportDesk(**kwargs) failed"),
    ],
)
def test_params_check_builds_the_environment(tmp_path: Path, environment: str, says: str) -> None:
    """It once said "params OK" for all three, and every stage then died with a traceback."""
    bad = tmp_path / "params.yaml"
    bad.write_text("environment:\n" + environment)
    result = runner.invoke(app, ["params", "check", "--params", str(bad)])
    assert result.exit_code == 2, result.output
    assert "params OK" not in result.output
    assert str(bad) in result.output and says in result.output


def test_params_check_rejects_negative_steps_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("sft:\n  max_steps: -5\n")
    result = runner.invoke(app, ["params", "check", "--params", str(bad)])
    assert result.exit_code == 2 and str(bad) in result.output and "sft.max_steps" in result.output


def test_version_flag_prints_the_installed_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"tracetune {version('tracetune')}"
