"""A shared prefill for repeated prompts (avg@k) vs a prefill per row, on the bundled SmolLM2-135M.

    python -m ophsd_jax.benchmarks.shared_prefill [--prompts 48 --k 4 --length 400 --new 64 --slots 32]

The workload (stated, deterministic) is an evaluation's student call: `--prompts` distinct
prompts of about `--length` tokens, each `--k` times in a row (as `evaluate` asks for avg@k),
sampled at temperature 0.6 with top-p 0.8 and top-k 20 (the replication's evaluation), each
row at most `--new` tokens, stopped at the end-of-turn token. Both ways run the slot path
(`sampler.batching=continuous`) on the same sampler settings and weights, `share_prefill`
off (a prefill per row) and on (one per distinct prompt in each refill); compiled by a
warm-up run, then timed best of `--repeats`. Reported: seconds and generated tokens per
second of each, their ratio, and whether every row's tokens are equal (each row draws with
its own key, so they must be).
"""

from __future__ import annotations

import argparse

import jax

from ophsd_jax import parallel
from ophsd_jax.benchmarks.common import WEIGHTS, best_time, cpu_model, emit, load_model
from ophsd_jax.sampling import Sampler


def workload(tok, n: int, k: int, length: int) -> list[list[int]]:
    text = ("Classify the reaction CC(=O)Cl.NCc1ccccc1>>CC(=O)NCc1ccccc1 into one of ten classes: "
            "heteroatom alkylation and arylation, acylation and related processes, C-C bond formation, "
            "heterocycle formation, protections, deprotections, reductions, oxidations, functional group "
            "interconversion, functional group addition. ")
    ids = tok.encode(text * (length // 40 + 2))
    prompts = [ids[7 * i: 7 * i + length - 16 + (13 * i) % 32] for i in range(n)]  # distinct content
    return [p for p in prompts for _ in range(k)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--length", type=int, default=400, help="prompt tokens, about (+-16)")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--weights", choices=WEIGHTS, default="bundled",
                    help="the bundled SmolLM2-135M, or the same architecture with random weights")
    args = ap.parse_args(argv)
    mesh = parallel.single_device_mesh()
    cfg, graphdef, params, tok = load_model(mesh, args.weights)
    prompts = workload(tok, args.prompts, args.k, args.length)
    buckets = tuple(sorted({1 << (len(p) - 1).bit_length() for p in prompts}))  # powers of two
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} (host CPU: {cpu_model()}); "
          f"{args.prompts} prompts x {args.k} samples, {min(map(len, prompts))}-{max(map(len, prompts))} tokens "
          f"(buckets {buckets}), at most {args.new} new tokens, {args.slots} slots; best of {args.repeats}")
    out, seconds = {}, {}
    for share in (False, True):
        sampler = Sampler(cfg, graphdef, mesh, max_batch=args.slots, show_progress=False, batching="continuous",
                          prompt_buckets=buckets, new_token_buckets=(args.new,), share_prefill=share,
                          pad_id=getattr(tok, "pad_token_id", 0))
        run = lambda: sampler.generate(params, prompts, max_new_tokens=args.new,  # noqa: E731
                                       rng=jax.random.key(0), temperature=0.6, top_p=0.8, top_k=20,
                                       stop_tokens=getattr(tok, "stop_token_ids", ()))
        out[share] = run()  # compiles
        seconds[share] = best_time(run, args.repeats)
        n_tok = int(sum(out[share].lengths))
        print(f"share_prefill={share!s:5s}: {n_tok} tokens in {seconds[share]:.2f} s = "
              f"{n_tok / seconds[share]:.1f} tok/s ({sampler.trace_count} compiles)")
    equal = out[False].tokens == out[True].tokens
    ratio = seconds[True] / seconds[False]
    print(f"shared / per-row prefill seconds: {ratio:.2f}x; sampled outputs equal: {equal}")
    emit({"bench": "shared_prefill", "per_row_s": seconds[False], "shared_s": seconds[True], "ratio": ratio,
          "outputs_equal": equal, "prompts": args.prompts, "k": args.k, "length": args.length, "new": args.new,
          "slots": args.slots, "weights": args.weights, "device": jax.devices()[0].device_kind,
          "cpu": cpu_model()})


if __name__ == "__main__":
    main()
