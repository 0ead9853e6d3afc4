"""scripts/uv_args.py: uv must install from the sources pip is configured with.

The fixture is pip's own output: a pip.conf written to a temporary file and listed by
`python -m pip config list`, so a change of pip's listing format fails here, not in set-up.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("uv_args", ROOT / "scripts" / "uv_args.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pip_config_list(tmp_path: Path, text: str, **env: str) -> list[str]:
    conf = tmp_path / "pip.conf"
    conf.write_text(text)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # Only this file: the machine's own pip.conf (site, user) is moved out of the way.
    environ.update(PIP_CONFIG_FILE=str(conf), HOME=str(tmp_path))
    environ.update(env)
    environ.update(XDG_CONFIG_DIRS=str(tmp_path / "site"), XDG_CONFIG_HOME=str(tmp_path / "user"))
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True, text=True, check=True, env=environ,
    )  # fmt: skip
    return listed.stdout.splitlines()


def test_pip_sources_become_uv_flags(tmp_path: Path) -> None:
    uv_args = _module()
    lines = _pip_config_list(
        tmp_path,
        "[global]\nfind-links = /opt/wheels\n"
        "extra-index-url = file:///a/simple file:///b/simple\n"
        "constraint = /etc/c.txt\ncert = /etc/ssl/ca.crt\ntimeout = 60\n",
    )
    flags = uv_args.uv_args(uv_args.parse_config_list(lines))
    # /etc/pip.conf is always read on Linux: this machine's sets `cert` too.
    assert sorted(flags) == [
        "--constraint=/etc/c.txt",
        "--extra-index-url=file:///a/simple",
        "--extra-index-url=file:///b/simple",
        "--find-links=/opt/wheels",
        "--native-tls",
    ]
    assert flags.index("--extra-index-url=file:///a/simple") < flags.index(
        "--extra-index-url=file:///b/simple"
    )  # pip's order of several values is kept


def test_the_environment_overrides_the_file_as_in_pip(tmp_path: Path) -> None:
    uv_args = _module()
    lines = _pip_config_list(
        tmp_path,
        "[global]\nindex-url = https://mirror.example/simple\n",
        PIP_INDEX_URL="https://other.example/simple",
    )
    flags = uv_args.uv_args(uv_args.parse_config_list(lines))
    assert [f for f in flags if f.startswith("--index-url")] == [
        "--index-url=https://other.example/simple"
    ]


def test_no_configuration_means_no_flags(tmp_path: Path) -> None:
    uv_args = _module()
    lines = _pip_config_list(tmp_path, "", PIP_CONFIG_FILE=os.devnull)  # pip: no file at all
    assert uv_args.uv_args(uv_args.parse_config_list(lines)) == []


def test_precedence_does_not_depend_on_the_order_pip_lists_in() -> None:
    """pip versions list `:env:` lines before or after the files' sections."""
    uv_args = _module()
    env = ":env:.index-url='https://env.example/simple'"
    glob = "global.index-url='https://file.example/simple'"
    install = "install.index-url='https://install.example/simple'"
    for lines in ([env, glob], [glob, env]):
        assert uv_args.parse_config_list(lines)["index-url"] == ["https://env.example/simple"]
    for lines in ([install, glob], [glob, install]):
        assert uv_args.parse_config_list(lines)["index-url"] == ["https://install.example/simple"]
    assert uv_args.parse_config_list(["download.index-url='https://d.example'"]) == {}
