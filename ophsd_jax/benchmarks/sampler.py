"""Sampler benchmark: ours vs transformers.generate on the bundled SmolLM2-135M (CPU).

    python -m ophsd_jax.benchmarks.sampler [--batch 8 --prompt 128 --new 128]

Both sides: same dequantized weights, same batch, greedy, exactly `--new` tokens (no
stop tokens). Decode is memory-bound, so the run also measures this machine's read
bandwidth and reports how close our decode gets to it:
bytes read per step (all weights + the KV cache of the live context) x steps/s / bandwidth.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from ophsd_jax import parallel
from ophsd_jax.benchmarks.common import best_time, emit, memory_read_bandwidth
from ophsd_jax.models import bundled
from ophsd_jax.sampling import Sampler


def make_prompts(tok, batch: int, length: int) -> list[list[int]]:
    text = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May? Explain each step. ") * 20
    ids = tok.encode(text)
    return [ids[i: i + length] for i in range(batch)]  # same length, different content


def bench_ours(cfg, graphdef, params, prompts, new):
    sampler = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=len(prompts), show_progress=False,
                      prompt_buckets=(len(prompts[0]),), new_token_buckets=(new,))
    key = jax.random.key(0)
    run = lambda n: sampler.generate(params, prompts, max_new_tokens=n, rng=key, temperature=0.0)  # noqa: E731
    run(new), run(1)  # compile (one program serves both: same buckets)
    t_prefill = best_time(lambda: run(1))
    t_total = best_time(lambda: run(new))
    return t_prefill, t_total, sampler.trace_count


def bench_hf(cfg, tensors, prompts, new):
    import torch
    import transformers

    hf_cfg, weights, _ = tensors
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    model.tie_weights()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def generate(n):  # greedy, exactly n new tokens; timed the same way as ours
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0)

    generate(2)  # warm-up
    return best_time(lambda: generate(1), repeats=2), best_time(lambda: generate(new), repeats=2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args(argv)
    B, P, N = args.batch, args.prompt, args.new

    bw = memory_read_bandwidth()
    print(f"memory read bandwidth: {bw / 1e9:.1f} GB/s  (jax {jax.__version__}, {jax.devices()[0].platform})")
    mesh = parallel.single_device_mesh()
    rows, result = [], {}
    for dtype in ("float32", "bfloat16"):
        cfg, graphdef, params, tok = bundled.load_bundled(mesh, param_dtype=dtype, dtype=dtype)
        prompts = make_prompts(tok, B, P)
        t_pre, t_tot, traces = bench_ours(cfg, graphdef, params, prompts, N)
        decode_steps_s = (N - 1) / (t_tot - t_pre)
        itemsize = np.dtype(dtype if dtype == "float32" else np.float16).itemsize
        weight_bytes = cfg.num_params() * itemsize
        avg_ctx = P + N / 2
        kv_bytes = 2 * cfg.num_layers * B * avg_ctx * cfg.num_kv_heads * cfg.head_dim * itemsize
        frac = (weight_bytes + kv_bytes) * decode_steps_s / bw
        row = dict(dtype=dtype, ours_decode_tok_s=B * decode_steps_s, ours_prefill_tok_s=B * P / t_pre,
                   bandwidth_fraction=frac, compiles=traces)
        if not args.skip_hf:
            h_pre, h_tot = bench_hf(cfg, bundled.read_gguf(bundled.bundled_gguf_path()), prompts, N) \
                if dtype == "float32" else (None, None)
            if h_pre is not None:
                row.update(hf_decode_tok_s=B * (N - 1) / (h_tot - h_pre), hf_prefill_tok_s=B * P / h_pre)
                row["decode_speedup"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
        rows.append(row)
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if dtype == "float32":
            result = row
    bf16 = rows[1]
    emit({"bench": "sampler", "ours_decode_tok_s": result["ours_decode_tok_s"],
          "hf_decode_tok_s": result.get("hf_decode_tok_s"), "decode_speedup": result.get("decode_speedup"),
          "ours_prefill_tok_s": result["ours_prefill_tok_s"], "hf_prefill_tok_s": result.get("hf_prefill_tok_s"),
          "bandwidth_fraction": result["bandwidth_fraction"], "bf16_decode_tok_s": bf16["ours_decode_tok_s"],
          "bf16_bandwidth_fraction": bf16["bandwidth_fraction"], "batch": B, "prompt": P, "new": N})


if __name__ == "__main__":
    main()
