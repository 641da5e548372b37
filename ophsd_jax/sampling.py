"""KV-cache sampler: jitted prefill + a `lax.while_loop` decode on the live parameters.

Shapes are static per (batch bucket, prompt bucket, new-token bucket), so repeated
calls compile once per bucket. Prompts are left-padded so every row writes the same
cache slot each decode step. Parameters are an argument, never captured: the sampler
always generates with the weights it is handed (the current training weights).

Two ways to run the layers (`layer_loop`): "scan" over the stacked weights (one layer
body compiled for all layers; for accelerators), or "unrolled" over per-layer copies
of the weights made once per call, with a per-layer KV cache (`models/cpu.py`; XLA:CPU, where the scan
copies each layer's weights out of the stack every step; see the Sampler section of
docs/benchmarks.md). The default picks "unrolled" on CPU meshes.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ophsd_jax import parallel
from ophsd_jax.models import state as model_state
from ophsd_jax.models.config import ModelConfig
from ophsd_jax.models.transformer import KVCache

log = logging.getLogger(__name__)

DEFAULT_PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_NEW_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class SampleOutput(NamedTuple):
    tokens: list[list[int]]  # generated ids per prompt, up to and including the stop token
    lengths: np.ndarray  # [n] number of generated tokens
    logprobs: list[np.ndarray]  # per generated token: log p(token | prefix) under the model (T=1, unfiltered)


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def filter_logits(logits, temperature, top_k, top_p, *, use_top_k: bool, use_top_p: bool, top_k_cap: int = 0):
    """Temperature, then top-k, then nucleus (top-p) filtering; filtered entries -> -inf.

    top-k keeps the logits >= the k-th largest (ties at it included). top-p then keeps
    the smallest set of most likely tokens whose mass (renormalised after top-k) reaches
    top_p: a token stays if the mass of the tokens strictly more likely is < top_p, so
    the top token always stays. Both thresholds are found by bisection over the float
    order (`_smallest_key`) instead of sorting the vocabulary: XLA:CPU's sort of
    [rows, 49k] logits cost more than the model's whole decode step. With a static
    `top_k_cap` >= top_k, the search runs over the `top_k_cap` largest logits only
    (`lax.top_k`): they hold every token strictly above the k-th value.
    """
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    if not (use_top_k or use_top_p):
        return logits
    pool, pool_idx = jax.lax.top_k(logits, top_k_cap) if use_top_k and top_k_cap else (logits, None)
    keys = _order_key(pool)
    lo, hi = jnp.min(keys, axis=-1, keepdims=True), jnp.max(keys, axis=-1, keepdims=True)
    if use_top_k:
        k = jnp.clip(top_k, 1, pool.shape[-1])
        # the k-th largest: the smallest t with fewer than k logits above it
        lo = _smallest_key(lambda t: jnp.sum(keys > t, axis=-1, keepdims=True) < k, lo, hi)
        logits = jnp.where(_order_key(logits) < lo, -jnp.inf, logits)
    if use_top_p:
        probs = jax.nn.softmax(logits, axis=-1)  # over every survivor of top-k
        probs = probs if pool_idx is None else jnp.take_along_axis(probs, pool_idx, axis=-1)
        # the least likely kept token: the smallest t whose strictly-more-likely mass is < top_p
        threshold = _smallest_key(lambda t: jnp.sum(jnp.where(keys > t, probs, 0.0), axis=-1, keepdims=True) < top_p,
                                  lo, hi)
        logits = jnp.where(_order_key(logits) < threshold, -jnp.inf, logits)
    return logits


def top_k_cap(top_k: int, vocab: int, most: int = 1024) -> int:
    """Static candidate count for `filter_logits` (0 = search the whole vocabulary): a
    power of two >= top_k, so few values compile; `lax.top_k` beyond ~1k costs more on
    XLA:CPU than bisecting over the whole vocabulary."""
    cap = 1 << max(top_k - 1, 0).bit_length()
    return min(cap, vocab) if 0 < top_k and cap <= most else 0


def _order_key(x):
    """float32 -> int32 with the same order (-inf lowest), so thresholds can be bisected
    exactly over the 2^32 float bit patterns."""
    i = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _smallest_key(pred, lo, hi):
    """Per row, the smallest int32 t in [lo, hi] with pred(t), for pred monotone in t
    (false ... false true ... true) and true at hi: 32 halvings cover the int32 range."""
    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        ok = pred(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def greedy_token(logits) -> jax.Array:
    """`jnp.argmax(logits, axis=-1)` (first maximum; a NaN counts as the maximum) as a max
    and then a min-index reduction: two plain reductions beat XLA:CPU's (value, index)
    argmax reduction, ~0.5 ms of a ~25 ms decode step (SmolLM2, batch 8)."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == m) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape[-1]), axis=-1)


def sample_token(logits, key, temperature, top_k, top_p, *, greedy: bool, use_top_k: bool, use_top_p: bool,
                 top_k_cap: int = 0):
    if greedy:
        return greedy_token(logits)
    filtered = filter_logits(logits, temperature, top_k, top_p, use_top_k=use_top_k, use_top_p=use_top_p,
                             top_k_cap=top_k_cap)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


class Sampler:
    """Generates from token-id prompts; see `generate`."""

    def __init__(self, cfg: ModelConfig, graphdef, mesh: Mesh, *, max_batch: int = 64,
                 prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                 new_token_buckets: Sequence[int] = DEFAULT_NEW_TOKEN_BUCKETS, cache_dtype: str | None = None,
                 pad_id: int = 0, show_progress: bool = True, layer_loop: str = "auto"):
        self.cfg, self.graphdef, self.mesh = cfg, graphdef, mesh
        if layer_loop == "auto":
            layer_loop = "unrolled" if mesh.devices.flat[0].platform == "cpu" else "scan"
        if layer_loop not in ("scan", "unrolled"):
            raise ValueError(f"layer_loop must be 'auto', 'scan' or 'unrolled', got {layer_loop!r}")
        self.layer_loop = layer_loop
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.new_token_buckets = tuple(sorted(new_token_buckets))
        self.cache_dtype = cache_dtype or cfg.dtype
        self.pad_id = pad_id
        self.show_progress = show_progress
        # Batch rows are sharded over these mesh axes; batch buckets are multiples of it.
        self.batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.max_batch = max(self.batch_shards, max_batch - max_batch % self.batch_shards)
        # Multi-process: this process's share of every call's batch rows (see parallel.batch_share).
        self.share = parallel.batch_share(mesh)
        self.trace_count = 0  # incremented each time `_generate_chunk` is traced (= compiled)
        # Outputs keep the batch-row sharding, so each process can read its rows from its own shards.
        rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        self._jitted = jax.jit(self._generate_chunk, out_shardings=(rows, rows, rows),
                               static_argnames=("n_new_bucket", "greedy", "use_top_k", "use_top_p", "top_k_cap"))

    # ---- public ---------------------------------------------------------------------

    def generate(self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, rng: jax.Array,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 stop_tokens: Sequence[int] = ()) -> SampleOutput:
        """Sample a continuation of every prompt.

        Multi-process (`self.share` count > 1): a collective call. Each process passes only
        its own prompts (any number, also none) and gets back only their outputs; every
        process must make the same calls in the same order, or the others wait forever.
        """
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        count = self.share[1]
        n_new = bucket(max_new_tokens, self.new_token_buckets, "max_new_tokens")
        rows = self.max_batch // count  # this process's rows per chunk
        longest = max((len(p) for p in prompts), default=1)
        if count > 1:  # shapes must agree on every process: one small allgather
            most, longest, n_new = parallel.agree_max([len(prompts), longest, n_new])
        else:
            most = len(prompts)
        if most == 0:  # no process has a prompt: nothing to run (all agree on that)
            return SampleOutput([], np.zeros((0,), np.int32), [])
        tokens, lengths, logprobs = [None] * len(prompts), np.zeros(len(prompts), np.int32), [None] * len(prompts)
        stop = np.full((max(8, len(stop_tokens)),), -1, np.int32)  # fixed size: no recompile per stop set (up to 8)
        stop[: len(stop_tokens)] = list(stop_tokens)
        n_chunks = -(-most // rows)
        progress = _progress(most * count, self.show_progress and n_chunks > 1)
        t0 = time.perf_counter()
        for c in range(n_chunks):
            idx = range(c * rows, min((c + 1) * rows, len(prompts)))  # may be empty on some processes
            out_tok, out_lp, out_len = self._run_chunk(
                params, [prompts[i] for i in idx], min(rows, most - c * rows), longest if count > 1 else None,
                n_new, max_new_tokens, jax.random.fold_in(rng, c), temperature, top_k, top_p, stop)
            for row, i in enumerate(idx):
                n = int(out_len[row])
                tokens[i], logprobs[i], lengths[i] = out_tok[row, :n].tolist(), out_lp[row, :n], n
            progress.update(min(rows, most - c * rows) * count)
        progress.close()
        dt = time.perf_counter() - t0
        log.debug("generated %d tokens for %d prompts in %.2fs", lengths.sum(), len(prompts), dt)
        return SampleOutput(tokens, lengths, logprobs)

    # ---- internals --------------------------------------------------------------------

    def _run_chunk(self, params, prompts, n_rows, longest, n_new, max_new_tokens, rng, temperature, top_k, top_p,
                   stop):
        """One jitted call on `prompts` (this process's rows; `n_rows` is the most rows any
        process has in this chunk, `longest` the agreed longest prompt or None = these prompts')."""
        n = len(prompts)
        count = self.share[1]
        B = self.batch_shards // count  # this process's rows in the batch bucket
        while B < n_rows:  # batch bucket: powers of two times the batch-shard count
            B *= 2
        B = min(B, self.max_batch // count)
        P = bucket(longest or max(len(p) for p in prompts), self.prompt_buckets, "prompt length")
        toks = np.full((B, P), self.pad_id, np.int32)
        mask = np.zeros((B, P), np.int32)
        for r, p in enumerate(prompts):  # left-pad: all rows share the write slot
            toks[r, P - len(p):] = p
            mask[r, P - len(p):] = 1
        mask[n:, -1] = 1  # dummy rows see one (pad) token so their softmax is well defined
        sh = parallel.named_sharding(self.mesh, ("batch", "seq"), (B * count, P))
        greedy = float(temperature) == 0.0
        # Each process supplies its own rows (with one share: host values every process holds).
        out = self._jitted(params, parallel.from_process_rows(toks, sh, self.share),
                           parallel.from_process_rows(mask, sh, self.share), rng,
                           np.float32(temperature), np.int32(top_k), np.float32(top_p), stop,
                           np.int32(max_new_tokens), n_new_bucket=n_new, greedy=greedy,
                           use_top_k=(not greedy) and top_k > 0, use_top_p=(not greedy) and top_p < 1.0,
                           top_k_cap=0 if greedy else top_k_cap(top_k, self.cfg.vocab_size))
        out_tok, out_lp, out_len = (parallel.process_rows(x, self.share) for x in out)
        return out_tok[:n], out_lp[:n], out_len[:n]

    def _generate_chunk(self, params, prompt, prompt_mask, rng, temperature, top_k, top_p, stop, max_new,
                        *, n_new_bucket: int, greedy: bool, use_top_k: bool, use_top_p: bool, top_k_cap: int):
        self.trace_count += 1
        B, P = prompt.shape
        sample = lambda logits, key: sample_token(logits, key, temperature, top_k, top_p, greedy=greedy,  # noqa: E731
                                                  use_top_k=use_top_k, use_top_p=use_top_p, top_k_cap=top_k_cap)
        with parallel.activation_mesh(self.mesh):
            model = nnx.merge(self.graphdef, params)
            forward, logits_fn, cache = self._layer_loop(model, B, P + n_new_bucket)
            kv_mask = jnp.concatenate([prompt_mask, jnp.zeros((B, n_new_bucket), jnp.int32)], axis=1)
            positions = model_state.positions_from_mask(prompt_mask)
            hidden, cache = forward(prompt, positions, kv_mask, cache, 0)
            logits = logits_fn(hidden[:, -1])
            first = sample(logits, jax.random.fold_in(rng, 0))
            out_tok = jnp.zeros((B, n_new_bucket), jnp.int32).at[:, 0].set(first)
            out_lp = jnp.zeros((B, n_new_bucket), jnp.float32).at[:, 0].set(_token_logprob(logits, first))
            done = jnp.isin(first, stop)
            next_pos = positions[:, -1] + 1

            def cond(carry):
                step, _, _, _, _, done, _ = carry
                return (step < max_new) & ~jnp.all(done)

            def body(carry):
                step, cache, kv_mask, out_tok, out_lp, done, pos = carry
                slot = P + step - 1  # the previous token goes into this cache slot
                kv_mask = jax.lax.dynamic_update_slice(kv_mask, jnp.ones((B, 1), jnp.int32), (0, slot))
                prev = jax.lax.dynamic_slice(out_tok, (0, step - 1), (B, 1))
                hidden, cache = forward(prev, pos[:, None], kv_mask, cache, slot)
                logits = logits_fn(hidden[:, 0])
                tok = sample(logits, jax.random.fold_in(rng, step))
                tok = jnp.where(done, self.pad_id, tok)
                lp = jnp.where(done, 0.0, _token_logprob(logits, tok))
                out_tok = jax.lax.dynamic_update_slice(out_tok, tok[:, None], (0, step))
                out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, step))
                done = done | jnp.isin(tok, stop)
                return step + 1, cache, kv_mask, out_tok, out_lp, done, pos + 1

            carry = (jnp.int32(1), cache, kv_mask, out_tok, out_lp, done, next_pos)
            step, _, _, out_tok, out_lp, _, _ = jax.lax.while_loop(cond, body, carry)
        # length: up to and including the first stop token, else all generated steps
        is_stop = jnp.isin(out_tok, stop) & (jnp.arange(n_new_bucket) < step)
        first_stop = jnp.argmax(is_stop, axis=1)
        lengths = jnp.where(jnp.any(is_stop, axis=1), first_stop + 1, jnp.minimum(step, max_new))
        return out_tok, out_lp, lengths

    def _layer_loop(self, model, batch: int, slots: int):
        """(forward(tokens, positions, mask, cache, index) -> (hidden, cache), logits(hidden), empty cache)."""
        if self.layer_loop == "scan":
            cache = KVCache.zeros(self.cfg, batch, slots, self.cache_dtype)
            return model, model.logits, KVCache(*(parallel.constrain(x, a) for x, a in zip(cache, KVCache.AXES)))
        # Per-layer weight copies are made here, once per call, outside the decode loop.
        from ophsd_jax.models import cpu

        layers = cpu.layer_weights(model, split_outputs=2)  # two threads per output projection
        cache = KVCache.zeros(self.cfg, batch, slots, self.cache_dtype, per_layer=True)
        cache = KVCache(*([parallel.constrain(x, a[1:]) for x in xs] for xs, a in zip(cache, KVCache.AXES)))
        forward = lambda *a: cpu.forward_layers(model, layers, *a)  # noqa: E731
        return forward, lambda h: cpu.decode_logits(model, h), cache


def _token_logprob(logits, tok):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="seq", leave=False, disable=not enabled)


# ---- chat level ------------------------------------------------------------------------


class ChatOutput(NamedTuple):
    texts: list[str | None]  # decoded, stop tokens removed; None where skipped
    prompt_tokens: list[list[int]]
    tokens: list[list[int]]  # generated ids (incl. the stop token when one was produced); [] where skipped
    logprobs: list[np.ndarray]
    skipped: list[bool]  # the prompt is longer than the sampler's largest prompt bucket: nothing generated


def generate_chat_tokens(sampler: Sampler, tokenizer, params, conversations: Sequence[list[dict]], *,
                         max_new_tokens: int, rng: jax.Array, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, template_kwargs: dict | None = None) -> ChatOutput:
    """Apply the chat template, generate, decode. The single entry point for rollouts and harnesses.

    A prompt longer than the sampler's largest prompt bucket is skipped (`skipped`, text
    None) instead of ending the run; the callers count the skips. The sampler is still
    called exactly once, also when nothing fits: with several processes the call is
    collective, so each process makes it whatever its own prompts are."""
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, **(template_kwargs or {}))
               for m in conversations]
    limit = sampler.prompt_buckets[-1]
    fits = [i for i, p in enumerate(prompts) if len(p) <= limit]
    if len(fits) < len(prompts):
        log.warning("skipping %d of %d prompts longer than the largest sampler.prompt_buckets entry (%d tokens; "
                    "longest %d)", len(prompts) - len(fits), len(prompts), limit, max(len(p) for p in prompts))
    stop = tokenizer.stop_token_ids
    out = sampler.generate(params, [prompts[i] for i in fits], max_new_tokens=max_new_tokens, rng=rng,
                           temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop)
    stop_set = set(stop)
    texts, tokens = [None] * len(prompts), [[] for _ in prompts]
    logprobs = [np.zeros((0,), np.float32) for _ in prompts]
    for j, i in enumerate(fits):
        tokens[i], logprobs[i] = out.tokens[j], out.logprobs[j]
        texts[i] = tokenizer.decode([t for t in tokens[i] if t not in stop_set])
    skipped = [t is None for t in texts]
    return ChatOutput(texts, prompts, tokens, logprobs, skipped)


def make_generate_chat(sampler: Sampler, tokenizer, params, rng: jax.Array, *, default_max_new_tokens: int = 512,
                       template_kwargs: dict | None = None, record: list | None = None) -> Callable[..., ChatOutput]:
    """A `generate_chat(conversations, **sampling) -> ChatOutput` callable bound to `params`
    (the harness protocol, harnesses/base.py: `.texts`, and `.prompt_tokens`, the ids each
    reply was sampled after, which the teacher context is then scored in).
    A text is None where the prompt did not fit the sampler (see `generate_chat_tokens`).

    Each call draws a fresh key (fold_in of a call counter). If `record` is a list, each
    call appends its ChatOutput (for logging token counts).
    """
    calls = [0]

    def generate_chat(conversations, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      max_new_tokens: int | None = None) -> ChatOutput:
        key = jax.random.fold_in(rng, calls[0])
        calls[0] += 1
        out = generate_chat_tokens(sampler, tokenizer, params, conversations,
                                   max_new_tokens=max_new_tokens or default_max_new_tokens, rng=key,
                                   temperature=temperature, top_k=top_k, top_p=top_p, template_kwargs=template_kwargs)
        if record is not None:
            record.append(out)
        return out

    return generate_chat
