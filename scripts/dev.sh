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

setup() {
  local stamp="$VENV/.tracetune-installed"
  if [[ -f "$stamp" && "$stamp" -nt pyproject.toml && "$stamp" -nt requirements/constraints.txt ]]; then
    return 0
  fi
  echo "==> setting up $VENV (first run takes a few minutes)"
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # torch first, pinned: an open range would pull a multi-GB CUDA build (docs/gpu.md).
  "$PY" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  "$PY" -m pip install -q -c requirements/constraints.txt -e ".[dev]" 2>&1 | grep -v "is ignored" || true
  "$PY" -c "import torch, transformers, trl, peft, prefect, mlflow, great_expectations, dvc, boto3" \
    || { echo "setup failed: packages missing" >&2; exit 1; }
  touch "$stamp"
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
