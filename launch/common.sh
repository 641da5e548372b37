#!/usr/bin/env bash
# Shared helpers for the launch scripts: `run` executes a command, or prints it
# (shell-quoted, one per line) under --dry-run.
# shellcheck disable=SC2034  # variables are used by the scripts that source this file

DRY_RUN=0

run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' "$@" | sed 's/ $//'
    printf '\n'
  else
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}

need() {  # need VAR_VALUE FLAG_NAME
  [ -n "$1" ] || die "missing required flag --$2 (see --help)"
}
