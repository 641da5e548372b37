#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU VM / pod slice and install it there.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/common.sh
. "$HERE/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu_setup.sh --name NAME --zone ZONE [options]

Copy the repository to ~/ophsd_jax on all workers and run scripts/setup.sh there,
plus the TPU build of JAX.

  --name NAME        TPU name
  --zone ZONE        TPU zone
  --project PROJECT  GCP project (default: gcloud's configured project)
  --src DIR          checkout to copy (default: this repository)
  --dry-run          print the gcloud commands instead of running them
  -h, --help         this help
USAGE
}

NAME="" ZONE="" PROJECT="" SRC=$(cd "$HERE/.." && pwd)
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --src) SRC=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
need "$NAME" name; need "$ZONE" zone
PROJECT_ARGS=()
[ -n "$PROJECT" ] && PROJECT_ARGS=(--project "$PROJECT")

ARCHIVE=/tmp/ophsd_jax_src.tar.gz
run tar -czf "$ARCHIVE" -C "$SRC" --exclude=.venv --exclude=.git --exclude=runs .
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:/tmp/ophsd_jax_src.tar.gz" --zone "$ZONE" --worker=all \
  "${PROJECT_ARGS[@]}"
run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all "${PROJECT_ARGS[@]}" --command \
  "mkdir -p ~/ophsd_jax && tar -xzf /tmp/ophsd_jax_src.tar.gz -C ~/ophsd_jax && cd ~/ophsd_jax && bash scripts/setup.sh && .venv/bin/pip install -q 'jax[tpu]'"
