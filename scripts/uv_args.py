"""Translate pip's configuration into uv's command-line flags (stdlib only; run by dev.sh).

Why: `scripts/dev.sh` installs with uv (about 1 min against pip's 3 min on 2 cores, which the
demo's 20-minute budget needs), but uv does not read pip.conf or PIP_* variables. A machine that
points pip at a local wheel folder, a mirror or a constraints file (this project's reference
machine keeps the CPU torch wheel in a find-links folder: without it uv picks the multi-GB CUDA
build) must give uv the same sources, or the two installers would build different environments.

    python scripts/uv_args.py   # reads `python -m pip config list`, prints one flag per line
"""

from __future__ import annotations

import shlex
import subprocess
import sys

# pip option -> uv flag; every value of a multi-valued option becomes its own flag.
_FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


# What overrides what for `pip install`: the environment (PIP_*) over the files' [install]
# section over their [global] one. Other sections (e.g. [download]) do not apply to installs.
_PRECEDENCE = {"global": 0, "install": 1, ":env:": 2}


def parse_config_list(lines: list[str]) -> dict[str, list[str]]:
    """`pip config list` lines (`global.find-links='/opt/wheels'`) -> option -> values.

    For one option the section with the higher precedence wins, whatever order pip lists them
    in (pip versions differ); pip separates several values of one option by whitespace.
    """
    found: list[tuple[int, str, list[str]]] = []
    for line in lines:
        key, sep, raw = line.strip().partition("=")
        section, dot, option = key.rpartition(".")
        if not sep or not dot or section not in _PRECEDENCE:
            continue
        found.append((_PRECEDENCE[section], option, " ".join(shlex.split(raw)).split()))
    found.sort(key=lambda item: item[0])  # stable: pip's order within a section
    return {option: values for _, option, values in found}


def uv_args(options: dict[str, list[str]]) -> list[str]:
    """The uv flags for pip's sources; `cert` means the system's trust store (`--native-tls`)."""
    args = [
        f"{_FLAGS[option]}={value}"
        for option, values in options.items()
        if option in _FLAGS
        for value in values
    ]
    if options.get("cert"):
        args.append("--native-tls")
    return args


def main() -> int:
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=False,
    )
    print("\n".join(uv_args(parse_config_list(listed.stdout.splitlines()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
