#!/usr/bin/env bash
# Start-up of every tracetune container that runs flows: make sure the shared workspace holds a
# clone of the repository whose DVC remote is the S3 bucket, then run the command (a worker).
# Both workers mount the same workspace, so dvc.lock stays one lineage record (docs/deploy.md).
set -euo pipefail

WORKSPACE=${TRACETUNE_WORKSPACE:-/workspace/tracetune}

init_workspace() {
  if [[ ! -d "$WORKSPACE/.git" ]]; then
    if [[ -z "${TRACETUNE_GIT_URL:-}" ]]; then
      echo "TRACETUNE_GIT_URL is not set and $WORKSPACE holds no clone" >&2
      exit 2
    fi
    git clone --branch "${TRACETUNE_GIT_REF:-main}" "$TRACETUNE_GIT_URL" "$WORKSPACE"
  fi
  cd "$WORKSPACE"
  dvc config --local core.analytics false
  if [[ -n "${TRACETUNE_DVC_REMOTE:-}" ]]; then
    dvc remote add --local --force --default storage "$TRACETUNE_DVC_REMOTE"
    if [[ -n "${AWS_ENDPOINT_URL:-}" ]]; then
      dvc remote modify --local storage endpointurl "$AWS_ENDPOINT_URL"
    fi
  fi
}

if [[ "${TRACETUNE_INIT_WORKSPACE:-1}" == "1" ]]; then
  mkdir -p "$(dirname "$WORKSPACE")"
  # Two workers may start together: one clones, the other waits for the lock.
  exec 9>"$(dirname "$WORKSPACE")/.tracetune-init.lock"
  flock 9
  init_workspace
  flock -u 9
  exec 9>&-
  cd "$WORKSPACE"
fi

exec "$@"
