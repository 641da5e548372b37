"""Sampler benchmark: ours vs transformers.generate on the bundled SmolLM2-135M.

    python -m ophsd_jax.benchmarks.sampler [--batch 8 --prompt 128 --new 128 --weights bundled|random]

On a GPU both sides run on it; `--weights random` (same architecture, random weights)
serves machines without the bundled package.

Both sides: same dequantized weights, same batch, greedy, exactly `--new` tokens (no
stop tokens), timed the same way: generating 1 token (= prefill) and `--new` tokens,
best of `--repeats` after a warm-up; decode rate = (new - 1) steps / the difference.
Rows: fp32, and bf16 weights (bf16 storage, fp32 compute) on both sides.

Decode is reported against this machine's memory read bandwidth, measured in the same
run (best of several reductions, before and after each row; the highest reading is the
bound): bytes a decode step must read (all weights at their storage dtype, the tied
embedding once as the LM head, plus the KV cache of the live context, averaged over the
steps) x steps/s / bandwidth. The fp32 row also times the decode step's layers and LM
head alone (no attention, no sampling), which bounds what the fraction can reach with
XLA:CPU's kernels (`bandwidth_fraction_ceiling`). The bf16 row counts bf16 weight bytes
(what a bf16 decode should read); XLA:CPU hoists the fp32 conversion out of the decode
loop, so that loop really reads fp32 copies, and runs at the fp32 row's speed.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from ophsd_jax import parallel
from ophsd_jax.benchmarks.common import WEIGHTS, best_read_bandwidth, best_time, cpu_model, emit, load_model
from ophsd_jax.models import cpu, transformer
from ophsd_jax.models.weights import to_hf_tensors
from ophsd_jax.models.config import as_dtype
from ophsd_jax.sampling import RowSampling, Sampler, filter_logits, row_keys, sample_rows, top_k_cap

ROWS = {"fp32": ("float32", "float32"), "bf16": ("bfloat16", "float32")}  # name: (param dtype, compute dtype)


def make_prompts(tok, batch: int, length: int) -> list[list[int]]:
    text = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May? Explain each step. ")
    ids = tok.encode(text * 20)
    ids = ids * (1 + (batch + length) // len(ids))  # long enough for any --prompt/--batch
    return [ids[i: i + length] for i in range(batch)]  # same length, different content


def bench_ours(cfg, graphdef, params, prompts, new, repeats):
    """(prefill seconds, total seconds, generated tokens, compile count)."""
    sampler = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=len(prompts), show_progress=False,
                      prompt_buckets=(len(prompts[0]),), new_token_buckets=(new,))
    key = jax.random.key(0)
    run = lambda n: sampler.generate(params, prompts, max_new_tokens=n, rng=key, temperature=0.0)  # noqa: E731
    tokens = run(new).tokens  # compiles; one program serves both lengths (same buckets)
    run(1)
    return best_time(lambda: run(1), repeats), best_time(lambda: run(new), repeats), tokens, sampler.trace_count


def bench_hf(cfg, params, param_dtype, prompts, new, repeats):
    """(prefill seconds, total seconds, generated tokens) for transformers.generate, on
    our weights (`params`) in transformers' names; on the GPU when ours runs on one."""
    import torch
    import transformers

    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k not in ("torch_dtype", "dtype")}
    tensors = to_hf_tensors(cfg, params)  # at the params' dtype: widened for torch, cast back below
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()}, strict=False)
    model.tie_weights()
    device = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    model.to(device=device, dtype=getattr(torch, param_dtype))
    # No stop token, like ours: exactly n tokens, and no EOS suppression either (which
    # `min_new_tokens` would add, changing the greedy continuation where EOS is on top).
    model.generation_config.eos_token_id = None
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def generate(n):  # greedy, exactly n new tokens
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    out = generate(new)  # warm-up
    assert out.shape[1] == ids.shape[1] + new, out.shape
    generate(1)
    tokens = out[:, ids.shape[1]:].tolist()
    return best_time(lambda: generate(1), repeats), best_time(lambda: generate(new), repeats), tokens


def bench_matmuls_alone(cfg, graphdef, params, batch, repeats) -> float:
    """Seconds for one decode step with attention and sampling taken out: the layers
    (norms, RoPE, projections, MLP) and the LM head on one token per row, on the same
    per-layer weight copies the sampler decodes with. This is what XLA:CPU's kernels
    make of the weight reads alone: a ceiling for the whole decode step."""
    layers = jax.jit(lambda params: cpu.layer_weights(nnx.merge(graphdef, params), split_outputs=2))(params)

    @jax.jit
    def step(params, layers, x):
        model = nnx.merge(graphdef, params)
        cos, sin = transformer.rope_tables(cfg, jnp.zeros((batch, 1), jnp.int32))
        for p in layers:
            x, _ = transformer._layer(cfg, x, p, cos, sin, lambda q, k, v: (q, None), cpu.OPS)
        return cpu.decode_logits(model, transformer.rms_norm(x, model.final_norm[...], cfg.rms_norm_eps)[:, 0])

    x = jnp.ones((batch, 1, cfg.hidden_size), as_dtype(cfg.dtype))
    step(params, layers, x).block_until_ready()
    return best_time(lambda: step(params, layers, x).block_until_ready(), max(repeats, 20))


def _sorting_filter(logits, temperature, top_k, top_p):
    """Baseline: top-k and top-p by sorting the vocabulary (the sampler's filter before
    it bisected its thresholds); same results as `filter_logits`."""
    logits = logits / temperature
    order = jnp.sort(logits, axis=-1)[..., ::-1]
    logits = jnp.where(logits < order[..., top_k - 1: top_k], -jnp.inf, logits)
    order = jnp.where(jnp.arange(logits.shape[-1]) < top_k, order, -jnp.inf)
    probs = jax.nn.softmax(order, axis=-1)
    n_keep = jnp.maximum(jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True), 1)
    return jnp.where(logits < jnp.take_along_axis(order, n_keep - 1, axis=-1), -jnp.inf, logits)


def bench_filter(vocab: int, batch: int, repeats: int) -> dict:
    """Seconds for one decode step's top-k 20 / top-p 0.95 filter and draw at temperature
    0.6 (the harness settings of configs/smollm2_arithmetic.py) on [batch, vocab] logits:
    `ours` / `sorting`: `filter_logits` vs the sorting filter, then one draw over the
    vocabulary; `pooled` / `whole`: the sampler's own `sample_rows`, drawing among the
    `top_k_cap` candidates vs over the whole vocabulary (how it drew before)."""
    logits = jax.random.normal(jax.random.key(0), (batch, vocab)) * 3
    key = jax.random.key(1)
    cap = top_k_cap(20, vocab)  # as the sampler passes it
    ours = jax.jit(lambda x: jax.random.categorical(key, filter_logits(x, 0.6, 20, 0.95, use_top_k=True,
                                                                        use_top_p=True, top_k_cap=cap)))
    base = jax.jit(lambda x: jax.random.categorical(key, _sorting_filter(x, 0.6, 20, 0.95)))
    rows = RowSampling(row_keys(key, batch), np.full(batch, 0.6, np.float32), np.full(batch, 20, np.int32),
                       np.full(batch, 0.95, np.float32), np.ones(batch, np.int32))
    draw = lambda c: jax.jit(lambda x: sample_rows(x, rows, 0, greedy=False, use_top_k=True,  # noqa: E731
                                                   use_top_p=True, top_k_cap=c))
    fns = {"ours": ours, "sorting": base, "pooled": draw(cap), "whole": draw(0)}
    times = {}
    for name, f in fns.items():
        f(logits).block_until_ready()
        times[name] = best_time(lambda: f(logits).block_until_ready(), max(repeats, 20))
    assert bool(jnp.all(ours(logits) == base(logits))), "filters disagree"
    return times


def _common_prefix(a, b) -> int:
    """How many leading tokens two greedy continuations share (fp32 sums in a different
    order can flip a near-tie, after which the continuations differ)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decode_bytes(cfg, batch, prompt, new, param_dtype, cache_dtype) -> float:
    """Bytes one decode step must read, averaged over the steps: every weight once at its
    storage dtype (num_params counts the tied embedding once: the LM head), plus keys and
    values of the live context (step i attends over prompt + i slots)."""
    weights = cfg.num_params() * as_dtype(param_dtype).itemsize
    per_slot = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * as_dtype(cache_dtype).itemsize
    avg_live = np.mean([prompt + i for i in range(1, new)])
    return weights + per_slot * avg_live


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--weights", choices=WEIGHTS, default="bundled",
                    help="the bundled SmolLM2-135M, or the same architecture with random weights")
    args = ap.parse_args(argv)
    B, P, N, R = args.batch, args.prompt, args.new, args.repeats

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} (host CPU: {cpu_model()}); batch {B}, prompt {P}, new {N}, best of {R}")
    readings = []

    def read_bandwidth(when):
        bw, how = best_read_bandwidth()
        readings.append(bw)
        print(f"memory read bandwidth {when}: {bw / 1e9:.1f} GB/s ({how})")

    read_bandwidth("at start")
    mesh = parallel.single_device_mesh()
    rows = {}
    for name, (param_dtype, dtype) in ROWS.items():
        cfg, graphdef, params, tok = load_model(mesh, args.weights, param_dtype=param_dtype, dtype=dtype)
        prompts = make_prompts(tok, B, P)
        t_pre, t_all, ours_tokens, compiles = bench_ours(cfg, graphdef, params, prompts, N, R)
        row = dict(steps_s=(N - 1) / (t_all - t_pre), ours_prefill_tok_s=B * P / t_pre, compiles=compiles,
                   bytes_per_step=decode_bytes(cfg, B, P, N, param_dtype, dtype),
                   weight_bytes=cfg.num_params() * as_dtype(param_dtype).itemsize)
        row["ours_decode_tok_s"] = B * row["steps_s"]
        if name == "fp32":  # (bf16: the decode loop reads fp32 copies that XLA hoists out of it)
            row["matmuls_alone_s"] = bench_matmuls_alone(cfg, graphdef, params, B, R)
        if not args.skip_hf:
            h_pre, h_all, hf_tokens = bench_hf(cfg, params, param_dtype, prompts, N, R)
            row.update(hf_decode_tok_s=B * (N - 1) / (h_all - h_pre), hf_prefill_tok_s=B * P / h_pre)
            row["decode_speedup"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
            row["common_prefix"] = [_common_prefix(a, b) for a, b in zip(ours_tokens, hf_tokens)]
        rows[name] = row
        read_bandwidth(f"after {name}")

    bw = max(readings)
    print(f"bound used: {bw / 1e9:.1f} GB/s (the highest reading)")
    for name, row in rows.items():
        row["bandwidth_fraction"] = row["bytes_per_step"] * row["steps_s"] / bw
        print(f"{name:5s} ours: decode {row['ours_decode_tok_s']:7.1f} tok/s ({row['steps_s']:.1f} steps/s, "
              f"{row['bytes_per_step'] / 1e6:.0f} MB/step, {row['bandwidth_fraction']:.2f} of bandwidth), "
              f"prefill {row['ours_prefill_tok_s']:7.1f} tok/s, {row['compiles']} compile(s)")
        if "hf_decode_tok_s" in row:
            print(f"{name:5s} HF:   decode {row['hf_decode_tok_s']:7.1f} tok/s, prefill {row['hf_prefill_tok_s']:7.1f} "
                  f"tok/s; ours/HF decode {row['decode_speedup']:.2f}x; "
                  f"greedy tokens equal to HF's for the first {min(row['common_prefix'])} (min) / "
                  f"{np.mean(row['common_prefix']):.0f} (mean) of {N}")
        if "matmuls_alone_s" in row:
            # If attention and sampling cost nothing, the step would take matmuls_alone_s
            # and read the same bytes: the most bandwidth_fraction XLA:CPU's kernels allow.
            row["fraction_ceiling"] = row["bytes_per_step"] / row["matmuls_alone_s"] / bw
            print(f"{name:5s} decode step {1e3 / row['steps_s']:.1f} ms; its layers + LM head alone (no attention, "
                  f"no sampling) {row['matmuls_alone_s'] * 1e3:.1f} ms, reading the weights at "
                  f"{row['weight_bytes'] / row['matmuls_alone_s'] / 1e9:.1f} GB/s: even with free attention the "
                  f"decode would be at {row['fraction_ceiling']:.2f} of bandwidth")

    ft = bench_filter(cfg.vocab_size, B, R)
    t_ours, t_sort = ft["ours"], ft["sorting"]
    print(f"top-k 20 + top-p 0.95 filter and draw per decode step, [{B}, {cfg.vocab_size}] logits: "
          f"{t_ours * 1e3:.2f} ms (ours) vs {t_sort * 1e3:.2f} ms (sorting): {t_sort / t_ours:.1f}x")
    print(f"the sampler's draw (sample_rows): among the top_k_cap candidates {ft['pooled'] * 1e3:.2f} ms vs over "
          f"the whole vocabulary {ft['whole'] * 1e3:.2f} ms: {ft['whole'] / ft['pooled']:.1f}x")

    fp32, bf16 = rows["fp32"], rows["bf16"]
    emit({"bench": "sampler", "ours_decode_tok_s": fp32["ours_decode_tok_s"],
          "hf_decode_tok_s": fp32.get("hf_decode_tok_s"),
          "decode_speedup": fp32.get("decode_speedup"), "ours_prefill_tok_s": fp32["ours_prefill_tok_s"],
          "hf_prefill_tok_s": fp32.get("hf_prefill_tok_s"), "bandwidth_fraction": fp32["bandwidth_fraction"],
          "bandwidth_fraction_ceiling": fp32["fraction_ceiling"],
          "bf16_ours_decode_tok_s": bf16["ours_decode_tok_s"], "bf16_hf_decode_tok_s": bf16.get("hf_decode_tok_s"),
          "bf16_decode_speedup": bf16.get("decode_speedup"), "bf16_ours_prefill_tok_s": bf16["ours_prefill_tok_s"],
          "bf16_hf_prefill_tok_s": bf16.get("hf_prefill_tok_s"), "bf16_bandwidth_fraction": bf16["bandwidth_fraction"],
          "bandwidth_gbs": bw / 1e9, "filter_ms": t_ours * 1e3, "sorting_filter_ms": t_sort * 1e3,
          "pooled_draw_ms": ft["pooled"] * 1e3, "whole_draw_ms": ft["whole"] * 1e3,
          "batch": B, "prompt": P, "new": N, "weights": args.weights, "device": jax.devices()[0].device_kind,
          "cpu": cpu_model()})


if __name__ == "__main__":
    main()
