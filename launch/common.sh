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

# Cloud TPU facts by accelerator type FAMILY-N (Cloud TPU docs: TPU v2/v3/v4/v5p/v5e/v6e
# system architecture and "TPU software versions"):
# - v2, v3, v4, v5p: N counts TensorCores (2 per chip) and a TPU VM holds 4 chips, so a
#   slice has N/8 VMs (v4-8: 1, v4-32: 4, v5p-64: 8).
# - v5e (v5litepod-N) and v6e: N counts chips; a slice of up to 8 chips is one VM, a larger
#   one is made of 4-chip VMs, so N/4 VMs (v5litepod-16: 4, v6e-256: 64).
tpu_default_version() {  # tpu_default_version TYPE: the documented runtime for TYPE
  case "$1" in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

tpu_workers() {  # tpu_workers TYPE: the number of TPU VMs (hosts) of a slice of TYPE
  local n=${1##*-}
  case "$n" in ''|*[!0-9]*) return 1 ;; esac
  n=$((10#$n))
  case "$1" in
    v2-*|v3-*|v4-*|v5p-*)
      [ "$n" -ge 8 ] && [ $((n % 8)) = 0 ] || return 1
      echo $((n / 8)) ;;
    v5litepod-*|v5e-*|v6e-*)
      if [ "$n" = 1 ] || [ "$n" = 4 ] || [ "$n" = 8 ]; then
        echo 1
      else
        [ "$n" -gt 8 ] && [ $((n % 4)) = 0 ] || return 1
        echo $((n / 4))
      fi ;;
    *) return 1 ;;
  esac
}
