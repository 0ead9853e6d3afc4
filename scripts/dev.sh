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
  echo "==> setting up $VENV (first run takes a few minutes)"
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # torch first, pinned: an open range would pull a multi-GB CUDA build (docs/gpu.md).
  "$PY" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  "$PY" -m pip install -q -c requirements/constraints.txt -e ".[dev,bfcl]" 2>&1 | grep -v "is ignored" || true
  # BFCL multi-turn (docs/environments.md): without its dependencies, whose pins clash with ours.
  "$PY" -m pip install -q --no-deps -c requirements/constraints.txt bfcl-eval 2>&1 | grep -v "is ignored" || true
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
