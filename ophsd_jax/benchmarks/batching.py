"""Continuous vs static batching on the bundled SmolLM2-135M, one long-tailed workload.

    python -m ophsd_jax.benchmarks.batching [--prompts 32 --slots 8 --short 32 --long 256]

The workload (stated, deterministic): `--prompts` prompts of 24-120 tokens; every
`--every`-th row may generate `--long` tokens, the others `--short` (so the longest row
is long/short x the median), greedy, no stop tokens (each row runs exactly its own limit).
Static batching runs the prompts `--slots` at a time, each chunk until its longest row
ends; continuous batching keeps `--slots` decode slots busy, refilling a slot as soon as
its row ends. Both: the same sampler, buckets and weights; compiled by a warm-up run,
then timed best of `--repeats`. Reported: generated tokens per second of each and their
ratio, and whether every row's tokens are equal (greedy: they must be).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from ophsd_jax import parallel
from ophsd_jax.benchmarks.common import WEIGHTS, best_time, cpu_model, emit, load_model
from ophsd_jax.sampling import Sampler


def workload(tok, n: int, every: int, short: int, long: int) -> tuple[list[list[int]], list[int]]:
    text = ("A train leaves the station at 9:40 and travels 180 km at 72 km/h. A second train leaves "
            "40 minutes later on the same line at 90 km/h. When does the second train catch up? ")
    ids = tok.encode(text * 30)
    prompts = [ids[i: i + 24 + (37 * i) % 97] for i in range(n)]  # 24-120 tokens, distinct content
    limits = [long if i % every == every - 1 else short for i in range(n)]
    return prompts, limits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--every", type=int, default=8, help="every n-th row is long")
    ap.add_argument("--short", type=int, default=32)
    ap.add_argument("--long", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--weights", choices=WEIGHTS, default="bundled",
                    help="the bundled SmolLM2-135M, or the same architecture with random weights")
    args = ap.parse_args(argv)
    mesh = parallel.single_device_mesh()
    cfg, graphdef, params, tok = load_model(mesh, args.weights)
    prompts, limits = workload(tok, args.prompts, args.every, args.short, args.long)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} (host CPU: {cpu_model()}); "
          f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.slots} slots, new tokens: longest {max(limits)}, median {int(np.median(limits))}, "
          f"total {sum(limits)}; best of {args.repeats}")
    out, seconds = {}, {}
    for mode in ("static", "continuous"):
        sampler = Sampler(cfg, graphdef, mesh, max_batch=args.slots, show_progress=False, batching=mode,
                          prompt_buckets=(64, 128), new_token_buckets=(max(limits),))
        run = lambda: sampler.generate(params, prompts, max_new_tokens=limits,  # noqa: E731
                                       rng=jax.random.key(0), temperature=0.0)
        out[mode] = run()  # compiles
        seconds[mode] = best_time(run, args.repeats)
        print(f"{mode:10s}: {sum(out[mode].lengths)} tokens in {seconds[mode]:.2f} s = "
              f"{sum(out[mode].lengths) / seconds[mode]:.1f} tok/s ({sampler.trace_count} compiles)")
    tokens = sum(limits)
    assert all(int(x) == n for x, n in zip(out["continuous"].lengths, limits))
    equal = out["static"].tokens == out["continuous"].tokens
    ratio = seconds["static"] / seconds["continuous"]
    print(f"continuous / static tokens per second: {ratio:.2f}x; greedy outputs equal: {equal}")
    emit({"bench": "batching", "static_tok_s": tokens / seconds["static"],
          "continuous_tok_s": tokens / seconds["continuous"], "ratio": ratio, "outputs_equal": equal,
          "prompts": len(prompts), "slots": args.slots, "longest": max(limits),
          "median": int(np.median(limits)), "weights": args.weights,
          "device": jax.devices()[0].device_kind, "cpu": cpu_model()})


if __name__ == "__main__":
    main()
