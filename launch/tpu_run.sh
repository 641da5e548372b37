#!/usr/bin/env bash
# Run training on all workers of a TPU slice at once; one log file per worker.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/common.sh
. "$HERE/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu_run.sh --name NAME --zone ZONE (--workers N | --accelerator-type TYPE) --config FILE
         --workdir DIR [options] [-- ARGS...]

Start ophsd_jax.train on every worker (one process per host; jax.distributed finds the
other hosts by itself on TPU VMs). DIR must be shared by all workers (GCS via gcsfuse,
or NFS/Filestore): checkpoints are written there by all processes. Each worker's output
goes to LOGDIR/worker-<i>.log on this machine. Re-running the same command resumes.

  --name NAME        TPU name
  --zone ZONE        TPU zone
  --workers N        number of hosts (TPU VMs) in the slice (v4-32: 4, v5p-64: 8, v6e-16: 4)
  --accelerator-type TYPE
                     the slice's type: gives --workers for v2/v3/v4/v5p/v5e/v6e, or checks it
  --config FILE      config file, relative to the repository (e.g. configs/qwen3_8b_math.py)
  --workdir DIR      shared work dir
  --logdir DIR       local log directory (default: logs/NAME)
  --project PROJECT  GCP project
  --dry-run          print the gcloud commands instead of running them
  -h, --help         this help
  -- ARGS            extra flags for ophsd_jax.train (e.g. --config.model.path=...)
USAGE
}

NAME="" ZONE="" WORKERS="" TYPE="" CONFIG="" WORKDIR="" LOGDIR="" PROJECT="" EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --accelerator-type) TYPE=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --logdir) LOGDIR=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
need "$NAME" name; need "$ZONE" zone
if [ -n "$TYPE" ]; then
  HOSTS=$(tpu_workers "$TYPE") || { [ -n "$WORKERS" ] || die "cannot derive the number of hosts of $TYPE; pass --workers"; }
  if [ -z "$WORKERS" ]; then
    WORKERS=$HOSTS
  elif [ -n "$HOSTS" ] && [ "$WORKERS" != "$HOSTS" ]; then
    die "--workers $WORKERS does not match $TYPE, which has $HOSTS host(s) (drop --accelerator-type to override)"
  fi
fi
need "$WORKERS" "workers (or --accelerator-type)"; need "$CONFIG" config; need "$WORKDIR" workdir
case "$WORKERS" in ''|*[!0-9]*|0) die "--workers must be a positive integer, got '$WORKERS'" ;; esac
LOGDIR=${LOGDIR:-logs/$NAME}
PROJECT_ARGS=()
[ -n "$PROJECT" ] && PROJECT_ARGS=(--project "$PROJECT")

TRAIN="cd ~/ophsd_jax && .venv/bin/python -m ophsd_jax.train --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR")"
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  TRAIN="$TRAIN $(printf '%q' "$arg")"
done

[ "$DRY_RUN" = 1 ] || mkdir -p "$LOGDIR"
pids=()
for ((i = 0; i < WORKERS; i++)); do
  if [ "$DRY_RUN" = 1 ]; then
    run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" "--worker=$i" "${PROJECT_ARGS[@]}" --command "$TRAIN"
  else
    gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" "--worker=$i" "${PROJECT_ARGS[@]}" --command "$TRAIN" \
      >"$LOGDIR/worker-$i.log" 2>&1 &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]+"${pids[@]}"}"; do
  wait "$pid" || status=$?
done
exit "$status"
