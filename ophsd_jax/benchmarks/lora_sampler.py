"""Generating with base + LoRA adapter: merged once per step vs applied on the fly (CPU).

    python -m ophsd_jax.benchmarks.lora_sampler [--batch 8 --prompt 128 --new 64 --rank 8]

On the bundled SmolLM2-135M with an adapter on all seven projections (random `b`, so
it is not a no-op): (a) the sampler's own generate call on weights merged once
(`lora.merge`, timed separately), (b) one decode step (stacked layers, cache) with the
merged weights vs with the adapter applied on the fly, same program otherwise; best of
`--repeats` after a warm-up. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from ophsd_jax import parallel
from ophsd_jax.models import bundled, lora
from ophsd_jax.models import state as model_state
from ophsd_jax.models.transformer import KVCache
from ophsd_jax.sampling import Sampler


def best(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    mesh = parallel.single_device_mesh()
    cfg, graphdef, params, _ = bundled.load_bundled(mesh)
    lcfg = lora.LoraConfig(rank=a.rank, alpha=2.0 * a.rank)
    adapter = lora.init_adapter(cfg, lcfg, mesh, seed=1, b_std=0.01)
    merge = lora.make_merge(params)
    t_merge = best(lambda: merge(params, adapter, lcfg.scale), a.repeats)
    merged = merge(params, adapter, lcfg.scale)

    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, cfg.vocab_size, a.prompt).tolist() for _ in range(a.batch)]
    sampler = Sampler(cfg, graphdef, mesh, max_batch=a.batch, prompt_buckets=(a.prompt,),
                      new_token_buckets=(a.new,), show_progress=False)
    gen = lambda: sampler.generate(merged, prompts, max_new_tokens=a.new, rng=jax.random.key(0),  # noqa: E731
                                   temperature=0.0).lengths
    t_generate = best(gen, a.repeats)

    B, S = a.batch, a.prompt + a.new
    cache = KVCache.zeros(cfg, B, S)
    tok = jnp.ones((B, 1), jnp.int32)
    pos = jnp.full((B, 1), a.prompt, jnp.int32)
    mask = jnp.ones((B, S), jnp.int32)

    @jax.jit
    def step(p, ad, cache):
        h, cache = model_state.forward(graphdef, p, tok, pos, mask, cache, a.prompt, lora=ad, lora_scale=lcfg.scale)
        return model_state.logits(graphdef, p, h), cache

    t_merged = best(lambda: step(merged, None, cache), 10 * a.repeats)
    t_fly = best(lambda: step(params, adapter, cache), 10 * a.repeats)
    print(json.dumps({"benchmark": "lora_sampler", "batch": B, "prompt": a.prompt, "new": a.new, "rank": a.rank,
                      "merge_s": round(t_merge, 4), "generate_merged_s": round(t_generate, 3),
                      "decode_step_merged_ms": round(1e3 * t_merged, 2),
                      "decode_step_on_the_fly_ms": round(1e3 * t_fly, 2),
                      # decode steps after which merging once pays off (None: on the fly is no slower)
                      "merge_pays_off_after_steps": round(t_merge / (t_fly - t_merged), 1) if t_fly > t_merged else None}))


if __name__ == "__main__":
    main()
