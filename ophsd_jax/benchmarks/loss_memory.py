"""Compiled temporary memory of the tiled divergence vs. the naive full-logits one.

Run: ``python -m ophsd_jax.benchmarks.loss_memory [--tile 256] [--dtypes float32,bfloat16]``

Both functions compute ``(loss, d loss / d student_hidden, d loss / d lm_head)``
for a Qwen3-8B sized head (D = 4096, V = 151,936) and 8,192 response tokens.
Nothing is executed or allocated: the functions are lowered from
``jax.ShapeDtypeStruct`` inputs and compiled, and XLA's memory analysis reports
the scratch ("temp") bytes each program needs besides its inputs and outputs.
The last line of output is one JSON record (for the first dtype listed).

On the CPU backend bf16 matmuls are computed in fp32, and XLA converts the
whole bf16 head to an fp32 copy (and keeps the head gradient in fp32) for
both implementations; the fp32 row is the clean comparison there.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from ophsd_jax.distill.losses import divergence, naive_divergence


def _compiled_memory(fn, *shapes):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*shapes).compile()
    mem = compiled.memory_analysis()
    return mem, time.perf_counter() - start


def _gib(n):
    return f"{n / 2**30:8.2f} GiB"


def _measure(args, dtype):
    b, t, d, v = args.batch, args.tokens // args.batch, args.hidden, args.vocab
    hidden = jax.ShapeDtypeStruct((b, t, d), dtype)
    head = jax.ShapeDtypeStruct((d, v), dtype)
    mask = jax.ShapeDtypeStruct((b, t), jnp.float32)

    def loss_and_grad(loss_fn, **kw):
        def f(hs, ht, w, m):
            return jax.value_and_grad(
                lambda a, c: loss_fn(a, ht, c, m, kind=args.kind, **kw)[0], argnums=(0, 1)
            )(hs, w)

        return f

    tiled = loss_and_grad(divergence, tile=args.tile, vocab_tile=args.vocab_tile)
    return (
        _compiled_memory(tiled, hidden, hidden, head, mask),
        _compiled_memory(loss_and_grad(naive_divergence), hidden, hidden, head, mask),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192, help="response tokens in the batch")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--vocab-tile", type=int, default=4096)
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="hidden/head dtypes to measure; the first one goes in the JSON line")
    parser.add_argument("--kind", default="reverse_kl", choices=["reverse_kl", "forward_kl", "jsd"])
    args = parser.parse_args(argv)
    if args.tokens % args.batch:
        parser.error("--tokens must be a multiple of --batch")

    b, t, d, v = args.batch, args.tokens // args.batch, args.hidden, args.vocab
    print(f"loss+grad (d/d hidden, d/d head) compiled memory: {args.kind}, "
          f"{b}x{t}={b * t} response tokens, D={d}, V={v}, fp32 softmax, tile={args.tile}, "
          f"vocab_tile={args.vocab_tile}, backend={jax.default_backend()}")
    print(f"one full [tokens, V] fp32 logits array = {_gib(b * t * v * 4).strip()}")
    print(f"{'dtype':9s} {'impl':6s} {'temp':>12s} {'arguments':>12s} {'outputs':>12s} "
          f"{'compile':>8s} {'ratio':>7s}")
    rows = []
    for name in args.dtypes.split(","):
        (ours, t_ours), (naive, t_naive) = _measure(args, jnp.dtype(name))
        ratio = ours.temp_size_in_bytes / naive.temp_size_in_bytes
        rows.append((name, ours, naive, ratio))
        for impl, mem, secs, r in (("tiled", ours, t_ours, f"{ratio:7.4f}"),
                                   ("naive", naive, t_naive, "")):
            print(f"{name:9s} {impl:6s} {_gib(mem.temp_size_in_bytes):>12s} "
                  f"{_gib(mem.argument_size_in_bytes):>12s} {_gib(mem.output_size_in_bytes):>12s} "
                  f"{secs:7.1f}s {r:>7s}")
    name, ours, naive, ratio = rows[0]
    print(json.dumps({
        "bench": "loss_memory",
        "ours_bytes": int(ours.temp_size_in_bytes),
        "naive_bytes": int(naive.temp_size_in_bytes),
        "ratio": round(ratio, 4),
        "dtype": name, "tokens": b * t, "vocab": v, "hidden": d, "tile": args.tile,
        "vocab_tile": args.vocab_tile, "kind": args.kind, "backend": jax.default_backend(),
        "other": {r[0]: round(r[3], 4) for r in rows[1:]},
    }))


if __name__ == "__main__":
    main()
