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


def best_read_bandwidth(sizes=(1 << 28, 1 << 30), repeats: int = 5) -> tuple[float, str]:
    """(bytes/s, how): the best streaming-read rate JAX reaches on this machine.

    The maximum over a few reductions (whole-array sum, row sums, max) of fp32 arrays far
    larger than the caches, best of `repeats` each. A higher reading makes a "fraction of
    bandwidth" derived from it smaller, so taking the best is the conservative choice;
    on a shared host single readings vary by tens of percent.
    """
    methods = {
        "sum": jnp.sum,
        "row sums": lambda a: jnp.sum(a.reshape(-1, 4096), axis=1),
        "max": jnp.max,
    }
    def rate(fn, x):
        f = jax.jit(fn)
        f(x).block_until_ready()
        return x.nbytes / best_time(lambda: f(x).block_until_ready(), repeats=repeats)

    best, how = 0.0, ""
    for nbytes in sizes:
        x = jnp.ones((nbytes // 4,), jnp.float32)
        for name, fn in methods.items():
            bw = rate(fn, x)
            if bw > best:
                best, how = bw, f"{name} over {nbytes >> 20} MiB"
    return best, how


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32) -> float:
    """FLOP/s of a large dense matmul in JAX: the compute roof for MFU."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = best_time(lambda: f(a).block_until_ready(), repeats=5)
    return 2 * n**3 / t


def cpu_model() -> str:
    """The host CPU's model name (benchmarks print it: a ratio from one host is no claim about another)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def emit(record: dict) -> None:
    """The final machine-readable line of a benchmark."""
    print(json.dumps(record))


WEIGHTS = ("bundled", "random")


class ByteTokenizer:
    """UTF-8 bytes as ids (offset past the special ids 0-2): the prompts of the random-weight
    benchmark model, which has no tokenizer of its own."""

    def encode(self, text: str) -> list[int]:
        return [3 + b for b in text.encode("utf-8")]


def load_model(mesh, weights: str = "bundled", **config_overrides):
    """(cfg, graphdef, params, tokenizer) of the benchmark model: the bundled SmolLM2-135M, or
    `weights="random"`: the same architecture with random weights (seed 0) and a byte
    tokenizer, for machines without the 98 MB bundled package (the lent GPU machine takes
    64 MiB of files). Decode and prefill speed do not depend on the weights' values; lengths
    do not either here, since these benchmarks run each row to its own limit."""
    if weights == "bundled":
        from ophsd_jax.models import bundled

        return bundled.load_bundled(mesh, **config_overrides)
    if weights != "random":
        raise ValueError(f"--weights must be one of {WEIGHTS}, got {weights!r}")
    from ophsd_jax.models import state
    from ophsd_jax.models.config import ModelConfig

    cfg = ModelConfig.smollm2_135m(**config_overrides)
    graphdef, params = state.init_params(cfg, mesh, seed=0)
    return cfg, graphdef, params, ByteTokenizer()
