#!/usr/bin/env bash
# Keep a (Spot/preemptible) TPU run going: when the slice is preempted, recreate it,
# set it up again and resume from the newest checkpoint, until the run has finished.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=launch/common.sh
. "$HERE/common.sh"

usage() {
  cat <<USAGE
Usage: launch/tpu_relaunch.sh --name NAME --zone ZONE --accelerator-type TYPE [--workers N] \\
         --config FILE --workdir DIR [options] [-- ARGS...]

Loop: if the TPU is missing, PREEMPTED or TERMINATED, delete and recreate it (Spot) and
run tpu_setup.sh; then run tpu_run.sh. The run resumes from the newest checkpoint in
DIR by itself. Stops when DIR/summary.json exists (written at the end of training) or
after --max-attempts.

  --name, --zone, --accelerator-type, --version, --project   as for tpu_create.sh
  --workers, --config, --workdir, --logdir                    as for tpu_run.sh (--workers is
                                                               derived from TYPE when omitted)
  --max-attempts N   give up after N launches (default: 20)
  --wait SECONDS     pause between attempts (default: 60)
  --dry-run          print one round of gcloud commands instead of running them
  -h, --help         this help
USAGE
}

NAME="" ZONE="" TYPE="" VERSION="" PROJECT="" WORKERS="" CONFIG="" WORKDIR="" LOGDIR=""
MAX_ATTEMPTS=20 WAIT=60 EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --accelerator-type) TYPE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --logdir) LOGDIR=$2; shift 2 ;;
    --max-attempts) MAX_ATTEMPTS=$2; shift 2 ;;
    --wait) WAIT=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
need "$NAME" name; need "$ZONE" zone; need "$TYPE" accelerator-type
need "$CONFIG" config; need "$WORKDIR" workdir
COMMON=(--name "$NAME" --zone "$ZONE")
[ -n "$PROJECT" ] && COMMON+=(--project "$PROJECT")
DRY=()
[ "$DRY_RUN" = 1 ] && DRY=(--dry-run)
CREATE_ARGS=(--accelerator-type "$TYPE")
[ -n "$VERSION" ] && CREATE_ARGS+=(--version "$VERSION")  # else tpu_create.sh's default for TYPE
RUN_ARGS=(--accelerator-type "$TYPE" --config "$CONFIG" --workdir "$WORKDIR")
[ -n "$WORKERS" ] && RUN_ARGS+=(--workers "$WORKERS")  # else derived from TYPE by tpu_run.sh
[ -n "$LOGDIR" ] && RUN_ARGS+=(--logdir "$LOGDIR")
PROJECT_ARGS=()
[ -n "$PROJECT" ] && PROJECT_ARGS=(--project "$PROJECT")

tpu_state() {
  gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --format='value(state)' \
    2>/dev/null || echo MISSING
}

finished() {
  gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=0 "${PROJECT_ARGS[@]}" \
    --command "test -f $(printf '%q' "$WORKDIR")/summary.json" >/dev/null 2>&1
}

if [ "$DRY_RUN" = 1 ]; then  # one round, every command printed
  run gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --format='value(state)'
  run gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --quiet
  "$HERE/tpu_create.sh" "${COMMON[@]}" "${CREATE_ARGS[@]}" --spot "${DRY[@]}"
  "$HERE/tpu_setup.sh" "${COMMON[@]}" "${DRY[@]}"
  "$HERE/tpu_run.sh" "${COMMON[@]}" "${RUN_ARGS[@]}" "${DRY[@]}" -- "${EXTRA[@]+"${EXTRA[@]}"}"
  run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=0 "${PROJECT_ARGS[@]}" \
    --command "test -f $(printf '%q' "$WORKDIR")/summary.json"
  exit 0
fi

for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
  state=$(tpu_state)
  echo "attempt $attempt: TPU $NAME is $state"
  if [ "$state" != READY ]; then
    if [ "$state" != MISSING ]; then
      gcloud compute tpus tpu-vm delete "$NAME" --zone "$ZONE" "${PROJECT_ARGS[@]}" --quiet || true
    fi
    "$HERE/tpu_create.sh" "${COMMON[@]}" "${CREATE_ARGS[@]}" --spot || { sleep "$WAIT"; continue; }
    "$HERE/tpu_setup.sh" "${COMMON[@]}" || { sleep "$WAIT"; continue; }
  fi
  "$HERE/tpu_run.sh" "${COMMON[@]}" "${RUN_ARGS[@]}" -- "${EXTRA[@]+"${EXTRA[@]}"}" || true
  if finished; then
    echo "run finished: $WORKDIR/summary.json exists"
    exit 0
  fi
  echo "run stopped before the end (preempted?); relaunching in ${WAIT}s"
  sleep "$WAIT"
done
die "gave up after $MAX_ATTEMPTS attempts"
