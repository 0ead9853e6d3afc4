#!/usr/bin/env bash
# One entry point for people and CI: every command sets up the project from nothing first.
#   scripts/dev.sh run        the whole pipeline on the embedded default
#   scripts/dev.sh test       the default test suite (what CI runs)
#   scripts/dev.sh test-slow  the slow tests only
#   scripts/dev.sh lint       ruff + mypy
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRACETUNE_VENV:-.venv}
PY="$VENV/bin/python"

install_with_uv() {
  # uv: ~1 min against pip's ~3 on 2 cores (the demo's budget). It reads neither pip.conf nor
  # PIP_*, so scripts/uv_args.py hands it pip's sources (here: the CPU torch wheel's folder).
  local -a sources uv
  mapfile -t sources < <("$PY" scripts/uv_args.py)
  # --compile-bytecode: Prefect's temporary server misses its start-up limit without .pyc files.
  uv=("$VENV/bin/uv" pip install --quiet --python "$PY" --compile-bytecode
    --index-strategy unsafe-best-match "${sources[@]}" -c requirements/constraints.txt)
  # torch pinned in the same resolution: an open range would pull a multi-GB CUDA build.
  "${uv[@]}" "torch==2.13.0" -e ".[dev,bfcl]"
  # BFCL multi-turn (docs/environments.md): without its dependencies, whose pins clash with ours.
  "${uv[@]}" --no-deps bfcl-eval
}

install_with_pip() {
  # The fallback (TRACETUNE_INSTALLER=pip, or no uv from the package index).
  "$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # torch first, pinned: an open range would pull a multi-GB CUDA build (docs/gpu.md).
  "$PY" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  "$PY" -m pip install -q -c requirements/constraints.txt -e ".[dev,bfcl]" 2>&1 | grep -v "is ignored" || true
  # BFCL multi-turn (docs/environments.md): without its dependencies, whose pins clash with ours.
  "$PY" -m pip install -q --no-deps -c requirements/constraints.txt bfcl-eval 2>&1 | grep -v "is ignored" || true
}

setup() {
  # The stamp records what was installed (dependency files' hashes) and from where (the editable
  # install's checkout): content, not mtimes, because a fresh clone has new mtimes everywhere.
  local stamp="$VENV/.tracetune-installed" want deps
  deps=$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)
  want="$deps $(pwd)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return 0
  fi
  if [[ -f "$stamp" && "$(cut -d' ' -f1 "$stamp")" == "$deps" ]]; then
    echo "==> pointing $VENV at this checkout ($(pwd))"
    "$PY" -m pip install -q --no-deps -e . 2>&1 | grep -v "is ignored" || true
    echo "$want" >"$stamp"
    return 0
  fi
  echo "==> setting up $VENV (first run takes a minute or two)"
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  if [[ "${TRACETUNE_INSTALLER:-uv}" == uv ]]; then
    "$PY" -m pip install -q -c requirements/constraints.txt uv 2>&1 | grep -v "is ignored" || true
  fi
  if [[ "${TRACETUNE_INSTALLER:-uv}" == uv && -x "$VENV/bin/uv" ]]; then
    install_with_uv
  else
    install_with_pip
  fi
  "$PY" -c "import torch, transformers, trl, peft, prefect, mlflow, great_expectations, dvc, boto3" \
    || { echo "setup failed: packages missing" >&2; exit 1; }
  echo "$want" >"$stamp"
}

# Quiet, offline, reproducible defaults for every command below.
# Prefect's temporary server misses its start-up limit without .pyc files (STACK.md).
unset PYTHONDONTWRITEBYTECODE
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=90
export DO_NOT_TRACK=1 MLFLOW_ENABLE_TELEMETRY=false

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  run) setup; "$VENV/bin/tracetune" run "$@" ;;
  test) setup; "$PY" -m pytest -q "$@" ;;
  test-slow) setup; "$PY" -m pytest -q -m slow "$@" ;;
  lint)
    setup
    "$VENV/bin/ruff" check tracetune tasks flows tests bench
    "$VENV/bin/ruff" format --check tracetune tasks flows tests bench
    "$VENV/bin/mypy"
    ;;
  *) sed -n '2,7p' "$0"; exit 2 ;;
esac
