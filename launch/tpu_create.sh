#!/usr/bin/env bash
# Create a TPU VM or pod slice.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/common.sh
. "$HERE/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu_create.sh --name NAME --zone ZONE --accelerator-type TYPE [options]

Create a TPU VM (single host) or pod slice (many hosts) for ophsd_jax.

  --name NAME               TPU name
  --zone ZONE               e.g. us-central2-b (v4), us-east5-a (v5p)
  --accelerator-type TYPE   e.g. v4-32, v5p-64, v5litepod-16, v6e-8
  --version RUNTIME         TPU software version (default by TYPE: tpu-ubuntu2204-base for
                            v2/v3/v4, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e,
                            v2-alpha-tpuv6e for v6e; required for any other TYPE)
  --project PROJECT         GCP project (default: gcloud's configured project)
  --spot                    request Spot capacity (can be preempted at any time)
  --preemptible             request preemptible capacity (legacy; prefer --spot)
  --dry-run                 print the gcloud command instead of running it
  -h, --help                this help
USAGE
}

NAME="" ZONE="" TYPE="" VERSION="" PROJECT="" CAPACITY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --accelerator-type) TYPE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --spot) CAPACITY=(--spot); shift ;;
    --preemptible) CAPACITY=(--preemptible); shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
need "$NAME" name; need "$ZONE" zone; need "$TYPE" accelerator-type
if [ -z "$VERSION" ]; then
  VERSION=$(tpu_default_version "$TYPE") || die "no default --version for accelerator type $TYPE; pass --version"
fi
PROJECT_ARGS=()
[ -n "$PROJECT" ] && PROJECT_ARGS=(--project "$PROJECT")

run gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" \
  --version "$VERSION" "${PROJECT_ARGS[@]}" "${CAPACITY[@]}"
