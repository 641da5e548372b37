"""Shared helpers for the benchmark scripts: timing and machine baselines measured in-run."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp


def best_time(fn, repeats: int = 3) -> float:
    """Minimum wall time of `fn()` over `repeats` runs (fn must block until done)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_read_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s for a streaming reduction over a large fp32 array in JAX."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    t = best_time(lambda: f(x).block_until_ready(), repeats=5)
    return nbytes / t


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32) -> float:
    """FLOP/s of a large dense matmul in JAX: the compute roof for MFU."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = best_time(lambda: f(a).block_until_ready(), repeats=5)
    return 2 * n**3 / t


def emit(record: dict) -> None:
    """The final machine-readable line of a benchmark."""
    print(json.dumps(record))
