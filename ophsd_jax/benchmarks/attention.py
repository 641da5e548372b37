"""Causal self-attention: the backend's kernel (or a chosen implementation) against the
blockwise fallback, forward + backward, same inputs, in one run.

    python -m ophsd_jax.benchmarks.attention [--length 4096] [--batch 1] [--heads 32] \
        [--kv-heads 8] [--head-dim 128] [--impls auto,blockwise]

Prints, per implementation, the resolved kernel, fwd+bwd time (best of --repeats), the
largest difference of outputs and gradients from the first implementation, and one JSON
line. Inputs are bf16 on accelerators and fp32 on CPU; rows carry right padding.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from ophsd_jax.benchmarks.common import best_time, cpu_model, emit
from ophsd_jax.models import attention as attn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--impls", default="auto,blockwise")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    backend = jax.devices()[0].platform
    dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
    B, T, H, K, Dh = args.batch, args.length, args.heads, args.kv_heads, args.head_dim
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, H, Dh), dtype)
    k = jax.random.normal(ks[1], (B, T, K, Dh), dtype)
    v = jax.random.normal(ks[2], (B, T, K, Dh), dtype)
    valid = (jnp.arange(T)[None] < (T - jnp.arange(B)[:, None] * (T // 8))).astype(jnp.int32)  # right padding
    cot = jax.random.normal(ks[3], (B, T, H, Dh), dtype) * valid[:, :, None, None].astype(dtype)
    print(f"device: {jax.devices()[0].device_kind} ({backend}); host CPU: {cpu_model()}; "
          f"B={B} T={T} H={H} K={K} Dh={Dh} {jnp.dtype(dtype).name}")

    rows, ref = {}, None
    for impl in args.impls.split(","):
        kernel = attn.resolve(impl, backend, T)
        loss = lambda q, k, v, impl=impl: jnp.sum((attn.attention(q, k, v, valid, impl=impl) * cot)  # noqa: E731
                                                  .astype(jnp.float32))
        f = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
        out = jax.block_until_ready(f(q, k, v))
        sec = best_time(lambda: jax.block_until_ready(f(q, k, v)), repeats=args.repeats)
        vals = [np.asarray(x, np.float32) for x in jax.tree.leaves(out)]
        if ref is None:
            ref, diff = vals, 0.0
        else:
            diff = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30)) for a, b in zip(vals, ref))
        rows[impl] = {"kernel": kernel, "fwd_bwd_ms": round(sec * 1e3, 3), "max_rel_diff": diff}
        print(f"{impl:10s} -> {kernel:10s} fwd+bwd {sec * 1e3:9.2f} ms   max rel diff vs first {diff:.2e}")
    names = list(rows)
    record = {"bench": "attention", "device": jax.devices()[0].device_kind, "cpu": cpu_model(), "length": T, "batch": B, "impls": rows}
    if len(names) > 1:
        record["speedup_first_vs_last"] = round(rows[names[-1]]["fwd_bwd_ms"] / rows[names[0]]["fwd_bwd_ms"], 3)
    emit(record)
    return record


if __name__ == "__main__":
    main()
