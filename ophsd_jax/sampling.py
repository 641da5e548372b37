"""KV-cache sampler: jitted prefill + a `lax.while_loop` decode on the live parameters.

Shapes are static per (batch bucket, prompt bucket, new-token bucket), so repeated
calls compile once per bucket. Prompts are left-padded so every row writes the same
cache slot each decode step. The decode runs in segments of `decode_segment` steps, one
jitted call each on the donated decode state (the first call also prefills), with the
same results as one loop; between segments the host runs `Sampler.poll`, so a stop
request (SIGTERM) abandons even a long generation within one segment. Parameters are
an argument, never captured: the sampler always generates with the weights it is handed
(the current training weights).

Two ways to run the layers (`layer_loop`): "scan" over the stacked weights (one layer
body compiled for all layers; for accelerators), or "unrolled" over per-layer copies
of the weights made once per jitted call, with a per-layer KV cache (`models/cpu.py`; XLA:CPU, where the scan
copies each layer's weights out of the stack every step; see the Sampler section of
docs/benchmarks.md). The default picks "unrolled" on CPU meshes.
"""

from __future__ import annotations

import bisect
import collections
import functools
import logging
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ophsd_jax import parallel
from ophsd_jax.models import state as model_state
from ophsd_jax.models.config import ModelConfig, as_dtype
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

    `temperature`, `top_k` and `top_p` are scalars or per-row columns [B, 1]; a row with
    top_k <= 0 or top_p >= 1 is not filtered that way (`use_top_k` / `use_top_p` say
    whether any row is).

    top-k keeps the logits >= the k-th largest (ties at it included). top-p then keeps
    the smallest set of most likely tokens whose mass (renormalised after top-k) reaches
    top_p: a token stays if the mass of the tokens strictly more likely is < top_p, so
    the top token always stays. With a static `top_k_cap` >= every row's top_k, both
    thresholds are read off the `top_k_cap` largest logits (`lax.top_k`, sorted): they
    hold every token strictly above the k-th value. Otherwise they are found by bisection
    over the float order (`_smallest_key`) instead of sorting the vocabulary: XLA:CPU's
    sort of [rows, 49k] logits cost more than the model's whole decode step.
    """
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    if not (use_top_k or use_top_p):
        return logits
    if use_top_k and top_k_cap:
        return _filter_sorted_pool(logits, top_k, top_p, top_k_cap, use_top_p=use_top_p)
    keys = _order_key(logits)
    lo, hi = jnp.min(keys, axis=-1, keepdims=True), jnp.max(keys, axis=-1, keepdims=True)
    if use_top_k:
        k = jnp.where(top_k > 0, jnp.clip(top_k, 1, keys.shape[-1]), keys.shape[-1])  # top_k <= 0: keep all
        # the k-th largest: the smallest t with fewer than k logits above it
        lo = _smallest_key(lambda t: jnp.sum(keys > t, axis=-1, keepdims=True) < k, lo, hi)
        logits = jnp.where(keys < lo, -jnp.inf, logits)
    if use_top_p:
        probs = jax.nn.softmax(logits, axis=-1)  # over every survivor of top-k
        # the least likely kept token: the smallest t whose strictly-more-likely mass is < top_p
        threshold = _smallest_key(lambda t: jnp.sum(jnp.where(keys > t, probs, 0.0), axis=-1, keepdims=True) < top_p,
                                  lo, hi)
        logits = jnp.where((keys < threshold) & (top_p < 1.0), -jnp.inf, logits)
    return logits


def _filter_sorted_pool(logits, top_k, top_p, cap: int, *, use_top_p: bool):
    """`filter_logits` when every filtered row has 0 < top_k <= `cap`: `lax.top_k` returns
    the `cap` largest logits sorted, so both thresholds are read off that pool (a gather
    and a cumulative sum) rather than bisected: 32 dependent halvings are cheap on the
    CPU but cost ~1 ms of kernel launches per decode step on a GPU."""
    pool, pool_idx = jax.lax.top_k(logits, cap)  # descending
    keys = _order_key(pool)
    k = jnp.where(top_k > 0, jnp.clip(top_k, 1, cap), cap)
    kth = jnp.take_along_axis(keys, jnp.broadcast_to(k - 1, (*keys.shape[:-1], 1)), axis=-1)
    logits = jnp.where(_order_key(logits) < kth, -jnp.inf, logits)
    if not use_top_p:
        return logits
    probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), pool_idx, axis=-1)  # over every survivor
    # Mass strictly more likely than each pool entry: the exclusive cumulative sum at the
    # first entry of its run of equal logits (ties share it, as in the bisection's test).
    ahead = jnp.cumsum(probs, axis=-1) - probs
    pos = jnp.arange(cap, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(keys[..., :1], bool), keys[..., 1:] != keys[..., :-1]], axis=-1)
    run_start = jax.lax.cummax(jnp.where(starts, pos, 0), axis=keys.ndim - 1)
    ahead = jnp.take_along_axis(ahead, run_start, axis=-1)
    n_keep = jnp.maximum(jnp.sum((ahead < top_p) & (keys >= kth), axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(keys, n_keep - 1, axis=-1)
    return jnp.where((_order_key(logits) < threshold) & (top_p < 1.0), -jnp.inf, logits)


def top_k_cap(top_k: int, vocab: int, most: int = 1024) -> int:
    """Static candidate count for `filter_logits` and `sample_rows` (0 = search the whole
    vocabulary): a power of two > top_k, so few values compile, and the last candidate
    tells whether the k-th largest logit ties with tokens outside the pool; `lax.top_k`
    beyond ~1k costs more on XLA:CPU than bisecting over the whole vocabulary."""
    cap = 1 << max(top_k, 0).bit_length()
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


class RowSampling(NamedTuple):
    """Per-row sampling settings of a generation call ([B] arrays; rows sharded like the batch).

    Each row draws its noise from its own key folded with the index of the token it
    generates, so a row's sample depends on its prompt's key, never on its row, its
    neighbours or the batch size. temperature 0 = greedy for that row."""
    keys: jax.Array  # [B, *key_shape] raw key data (jax.random.key_data)
    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32, <= 0: off
    top_p: jax.Array  # [B] float32, >= 1: off
    limit: jax.Array  # [B] int32: the row's max_new_tokens


def sample_rows(logits, rows: RowSampling, index, *, greedy: bool, use_top_k: bool, use_top_p: bool,
                top_k_cap: int = 0):
    """One token per row from logits [B, V]: `index` (scalar, or one per row) is the
    position of the token being generated (its key is fold_in(row key, index)). `greedy`:
    every row is greedy.

    `top_k_cap` (static; 0: none) bounds the top_k of every row with top_k > 0. Such a
    row draws among the `top_k_cap` largest logits only: the same distribution, but random
    numbers for a few dozen candidates rather than the whole vocabulary (SmolLM2's 49k
    cost XLA:CPU more than the rest of the filter: ~9 of a sampled step's ~17 ms at batch
    8). Rows without top-k, and a row whose k-th largest logit ties with tokens outside
    the pool (top-k keeps every tie), draw over the whole vocabulary, in a branch taken
    only when some row needs it."""
    best = greedy_token(logits)
    if greedy:
        return best
    index = jnp.broadcast_to(index, rows.temperature.shape)
    keys = jax.vmap(lambda k, i: jax.random.fold_in(jax.random.wrap_key_data(k), i))(rows.keys, index)
    temperature, top_k, top_p = rows.temperature[:, None], rows.top_k[:, None], rows.top_p[:, None]

    def draw(x, cap, filtered=True):  # filtered=False: temperature only
        x = filter_logits(x, temperature, top_k, top_p, use_top_k=use_top_k and filtered,
                          use_top_p=use_top_p and filtered, top_k_cap=cap)
        return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)

    if not (use_top_k and 0 < top_k_cap < logits.shape[-1]):
        return jnp.where(rows.temperature == 0.0, best, draw(logits, 0))
    # The barrier keeps XLA:CPU from fusing the top-k into the gathers below, which
    # recomputed it per gathered element (~150 ms a step at batch 8).
    pool, pool_idx = jax.lax.optimization_barrier(jax.lax.top_k(logits, top_k_cap))  # descending
    drawn = jnp.take_along_axis(pool_idx, draw(pool, top_k_cap)[:, None], axis=-1)[:, 0]
    kth = jnp.take_along_axis(pool, jnp.clip(top_k, 1, top_k_cap) - 1, axis=-1)[:, 0]
    tie = (kth == pool[:, -1]) & jnp.isfinite(kth)  # survivors may lie outside the pool
    whole = ((rows.top_k <= 0) | tie) & (rows.temperature > 0)

    def draw_whole():  # filtered only if one of these rows needs it (rollout rows often do not)
        return jax.lax.cond(jnp.any(whole & (tie | (rows.top_p < 1))), lambda: draw(logits, 0),
                            lambda: draw(logits, 0, filtered=False))

    drawn = jax.lax.cond(jnp.any(whole), lambda: jnp.where(whole, draw_whole(), drawn), lambda: drawn)
    return jnp.where(rows.temperature == 0.0, best, drawn)


def row_keys(rng, n: int, offset: int = 0) -> np.ndarray:
    """Raw key data [n, ...] of n prompts' keys: `rng` itself when it holds n keys (typed
    or raw), else fold_in(rng, offset + i) for prompt i (`offset`: the prompts of the
    processes before this one)."""
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 1:
        if rng.shape[0] != n:
            raise ValueError(f"rng holds {rng.shape[0]} keys for {n} prompts")
        return np.asarray(jax.random.key_data(rng))
    index = jnp.arange(offset, offset + n, dtype=jnp.uint32)
    return np.asarray(jax.random.key_data(jax.vmap(jax.random.fold_in, (None, 0))(rng, index)))


class DecodeState(NamedTuple):
    """What one decode segment hands the next (device arrays, rows sharded like the batch)."""
    step: jax.Array  # tokens generated so far (the next token's column)
    cache: KVCache
    kv_mask: jax.Array
    out_tok: jax.Array
    out_lp: jax.Array
    done: jax.Array
    pos: jax.Array


def _rows_constrain(x):
    """Keep x's leading (batch-row) axis sharded like the batch."""
    return parallel.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


class SlotState(NamedTuple):
    """Continuous batching: the decode slots between programs (rows sharded like the batch)."""
    cache: KVCache
    kv_mask: jax.Array  # [B, P + n_new]: the valid cache slots of each row
    out_tok: jax.Array  # [B, n_new]
    out_lp: jax.Array
    t: jax.Array  # [B] tokens generated by the row's current prompt
    done: jax.Array  # [B] finished, or never filled: free once its output is read
    pos: jax.Array  # [B] the next token's position id
    rows: RowSampling  # the slot's current prompt's settings and key


BATCHING = ("auto", "static", "continuous")
DEFAULT_CPU_PREFILL_TOKENS = 32768  # prompt tokens per prefill pass on CPU (Sampler's prefill_tokens=0)


def prefill_groups(counts: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """For a call that fits the decode slots: the bucket index each prompt bucket is
    prefilled at (`counts[b]` prompts in bucket `sizes[b]`). At most two sizes: the largest
    non-empty bucket, and, where it saves prefill tokens, one smaller bucket for the
    shorter prompts (counted as the refill rows they take, powers of two). More sizes would
    save a little more prefill but compile a program per size and row count (on the
    embedded default, ~0.6 GB more resident and slower first steps, docs/benchmarks.md)."""
    nonempty = [b for b, c in enumerate(counts) if c]
    top = nonempty[-1]
    rows = lambda n: 1 << max(n - 1, 0).bit_length()  # noqa: E731 - refill rows for n prompts
    best, split = sizes[top] * rows(sum(counts)), None
    for t in nonempty[:-1]:
        cost = sizes[t] * rows(sum(counts[: t + 1])) + sizes[top] * rows(sum(counts[t + 1:]))
        if cost < best:
            best, split = cost, t
    return [split if split is not None and b <= split else top if b <= top else b for b in range(len(counts))]


class Sampler:
    """Generates from token-id prompts; see `generate`."""

    def __init__(self, cfg: ModelConfig, graphdef, mesh: Mesh, *, max_batch: int = 64,
                 prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                 new_token_buckets: Sequence[int] = DEFAULT_NEW_TOKEN_BUCKETS, cache_dtype: str | None = None,
                 pad_id: int = 0, show_progress: bool = True, layer_loop: str = "auto", decode_segment: int = 128,
                 prefill_tokens: int = 0, batching: str = "auto", join_calls: bool = True,
                 share_prefill: bool = True):
        self.cfg, self.graphdef, self.mesh = cfg, graphdef, mesh
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.batching = batching
        # Whether `GenerateChat` makes independent calls (the rollout and the harness's
        # first call) one sampler call (config.py: sampler.join_calls says when not to).
        self.join_calls = bool(join_calls)
        # Rows with the same prompt (avg@k's k samples) share one prefill on the slot path.
        self.share_prefill = bool(share_prefill)
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
        # Prefill in groups of rows of at most this many prompt tokens (0: auto), so that
        # its activations do not scale with the whole batch: on XLA:CPU a batch-32 prefill
        # of 4k-token prompts needs ~11 GiB of temporaries in one pass. Rows are sliced
        # out of the batch, so only with unsharded batch rows; auto: CPU only. The slot
        # path's refills take at most this many tokens of rows each (`_refill_rows`).
        if prefill_tokens < 0:
            raise ValueError(f"prefill_tokens must be >= 0 (0: auto), got {prefill_tokens}")
        if prefill_tokens and self.batch_shards > 1:
            raise ValueError(f"prefill_tokens={prefill_tokens} needs unsharded batch rows (mesh data x fsdp = 1, "
                             f"got {self.batch_shards}); use 0")
        auto = DEFAULT_CPU_PREFILL_TOKENS if mesh.devices.flat[0].platform == "cpu" and self.batch_shards == 1 else 0
        self.prefill_tokens = int(prefill_tokens or auto)
        self.max_batch = max(self.batch_shards, max_batch - max_batch % self.batch_shards)
        # Multi-process: this process's share of every call's batch rows (see parallel.batch_share).
        self.share = parallel.batch_share(mesh)
        if decode_segment < 1:
            raise ValueError(f"decode_segment must be >= 1, got {decode_segment}")
        # Decode steps per jitted call: between calls the host runs `poll`, so a long
        # generation can be abandoned within one segment (a SIGTERM, see run.Run.poll).
        self.decode_segment = int(decode_segment)
        # Called by every process between decode segments (also before the first): it may
        # raise to abandon the call. With several processes it must agree (a collective).
        self.poll: Callable[[], None] | None = None
        self.trace_count = 0  # incremented each time a generation program is traced (= compiled)
        statics = ("n_new_bucket", "greedy", "use_top_k", "use_top_p", "top_k_cap")
        # `_start`: prefill + the first decode segment; `_resume`: one more segment on the
        # (donated) decode state. The decode state keeps the batch-row sharding, so each
        # process can read its rows of the outputs from its own shards.
        self._start = jax.jit(self._start_chunk, static_argnames=statics)
        self._resume = jax.jit(self._resume_chunk, static_argnames=statics, donate_argnums=1)
        # Continuous batching: an empty slot state, prompts prefilled into free slots, and
        # decode segments that stop early once enough slots are free to refill.
        self._slots_init = jax.jit(self._slots_init_fn, static_argnames=("batch", "prompt_len", "n_new", "key_shape"))
        self._refill = jax.jit(self._refill_fn, static_argnames=statics[1:], donate_argnums=1)
        self._segment = jax.jit(self._segment_fn, static_argnames=statics[1:], donate_argnums=1)

    # ---- public ---------------------------------------------------------------------

    def generate(self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                 rng: jax.Array, temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
                 top_p: float | Sequence[float] = 1.0, stop_tokens: Sequence[int] = ()) -> SampleOutput:
        """Sample a continuation of every prompt.

        `max_new_tokens`, `temperature`, `top_k` and `top_p` are one value for every row or
        one per prompt (so calls with different settings can share one generation). `rng`
        is one key, from which prompt i draws with fold_in(rng, i) (i counted over every
        process's prompts, in process order), or one key per prompt. A prompt's sample
        depends only on its key and settings, not on the other prompts of the call.

        Multi-process (`self.share` count > 1): a collective call. Each process passes only
        its own prompts (any number, also none) and gets back only their outputs; every
        process must make the same calls in the same order, or the others wait forever.
        """
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        n = len(prompts)
        per_row = lambda v, dtype: np.broadcast_to(np.asarray(v, dtype), (n,)).copy()  # noqa: E731
        limits = per_row(max_new_tokens, np.int32)
        temps, top_ks, top_ps = per_row(temperature, np.float32), per_row(top_k, np.int32), per_row(top_p, np.float32)
        if n and limits.min() < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {int(limits.min())}")
        count = self.share[1]
        sampled = temps > 0
        # Statics of the program: every process must agree on them (one small allgather).
        nb = len(self.prompt_buckets)
        b_of = [bisect.bisect_left(self.prompt_buckets, len(p)) for p in prompts]  # nb: too long (raises below)
        # rows whose prompt another row has too (avg@k)
        repeats = n - len({tuple(p) for p in prompts}) if self.share_prefill else 0
        flags = [n, max((len(p) for p in prompts), default=1), int(limits.max(initial=1)), int(sampled.any()),
                 int((sampled & (top_ks > 0)).any()), int((sampled & (top_ps < 1)).any()),
                 int(np.where(sampled, top_ks, 0).max(initial=0)), int(repeats > 0),
                 *np.bincount(np.asarray(b_of, np.int64), minlength=nb + 1)[:nb].tolist()]
        most, longest, most_new, any_sampled, any_top_k, any_top_p, largest_k, repeated, *per_bucket = (
            parallel.agree_max(flags) if count > 1 else flags)  # per_bucket: the most prompts a process has
        if most == 0:  # no process has a prompt: nothing to run (all agree on that)
            return SampleOutput([], np.zeros((0,), np.int32), [])
        n_new = bucket(most_new, self.new_token_buckets, "max_new_tokens")
        statics = dict(n_new_bucket=n_new, greedy=not any_sampled, use_top_k=bool(any_top_k),
                       use_top_p=bool(any_top_p),
                       top_k_cap=top_k_cap(largest_k, self.cfg.vocab_size) if any_top_k else 0)
        keys = row_keys(rng, n, self.share[0] * most)
        rows = self.max_batch // count  # this process's rows per chunk
        tokens, lengths, logprobs = [None] * n, np.zeros(n, np.int32), [None] * n
        stop = np.full((max(8, len(stop_tokens)),), -1, np.int32)  # fixed size: no recompile per stop set (up to 8)
        stop[: len(stop_tokens)] = list(stop_tokens)
        n_chunks = -(-most // rows)
        progress = _progress(most * count, self.show_progress and n_chunks > 1)
        t0 = time.perf_counter()
        # auto: the slot path (continuous batching) when the call has more prompts than
        # slots, or prompts of more than one prefill size (`prefill_groups`: the rollout
        # joined with the harness's longer first call): it starts every row at once and
        # prefills each size at its own bucket, where the static path prefills every row at
        # the longest (embedded default: the harness's seconds 0.60x -> 0.43x the three-call
        # design, docs/benchmarks.md). Also a call with repeated prompts (k samples of each
        # prompt): a refill prefills each distinct prompt once (`_run_slots`). Other calls
        # that fit the slots: the static path, one program (prefill + decode) instead of a
        # refill and a decode program.
        groups = prefill_groups(per_bucket, self.prompt_buckets) if any(per_bucket) else None
        mixed = groups is not None and len({groups[b] for b, c in enumerate(per_bucket) if c}) > 1
        if self.batching == "continuous" or (self.batching == "auto" and (n_chunks > 1 or mixed or repeated)):
            all_rows = RowSampling(keys, temps, top_ks, top_ps, limits)
            for idx, most_b, longest_b in self._slot_runs(b_of, longest, most, n_chunks, per_bucket):
                run_rows = RowSampling(*(x[np.asarray(idx, np.int64)] for x in all_rows))
                for j, (tok, lp) in self._run_slots(params, [prompts[i] for i in idx], longest_b, run_rows, stop,
                                                    statics, progress, slots=self._rows_bucket(most_b),
                                                    groups=groups if n_chunks <= 1 else None):
                    tokens[idx[j]], logprobs[idx[j]], lengths[idx[j]] = tok, lp, len(tok)
            n_chunks = 0
        for c in range(n_chunks):
            idx = list(range(c * rows, min((c + 1) * rows, n)))  # may be empty on some processes
            sampling = RowSampling(keys[idx], temps[idx], top_ks[idx], top_ps[idx], limits[idx])
            out_tok, out_lp, out_len = self._run_chunk(
                params, [prompts[i] for i in idx], min(rows, most - c * rows), longest if count > 1 else None,
                sampling, stop, statics)
            for row, i in enumerate(idx):
                k = int(out_len[row])
                tokens[i], logprobs[i], lengths[i] = out_tok[row, :k].tolist(), out_lp[row, :k], k
            progress.update(min(rows, most - c * rows) * count)
        progress.close()
        dt = time.perf_counter() - t0
        log.debug("generated %d tokens for %d prompts in %.2fs", lengths.sum(), n, dt)
        return SampleOutput(tokens, lengths, logprobs)

    # ---- internals --------------------------------------------------------------------

    def _rows_bucket(self, n_rows: int) -> int:
        """This process's rows in the batch bucket for `n_rows` (the most rows any process
        has): powers of two times the batch-shard count, at most `max_batch`."""
        count = self.share[1]
        B = max(1, self.batch_shards // count)
        while B < n_rows:
            B *= 2
        return min(B, self.max_batch // count)

    def _slot_runs(self, b_of: list[int], longest: int, most: int, n_chunks: int, per_bucket: list[int]):
        """The slot path's runs: (this process's prompt indices, the most prompts any process
        has in the run, the run's prompt bucket). `b_of`: each prompt's bucket index;
        `per_bucket`: the most prompts any process has per bucket. A call with more prompts
        than slots makes one run per prompt bucket, longest first: with slots busy either
        way, a row then never decodes against a longer neighbour's cache (at 4k-token
        drafts joined with 500-token answers the cache, and every decode step's attention,
        would be 8x the answers' own). A call that fits the slots is one run: every row
        starts at once and only the prefill is per group of buckets (`prefill_groups`)."""
        top = bucket(longest, self.prompt_buckets, "prompt length")  # agreed: every process raises alike
        if n_chunks <= 1:
            return [(list(range(len(b_of))), most, top)]
        return [([i for i, bi in enumerate(b_of) if bi == b], c, self.prompt_buckets[b])
                for b, c in reversed(list(enumerate(per_bucket))) if c]

    def _run_chunk(self, params, prompts, n_rows, longest, sampling: RowSampling, stop, statics):
        """One jitted call on `prompts` (this process's rows; `n_rows` is the most rows any
        process has in this chunk, `longest` the agreed longest prompt or None = these prompts')."""
        n = len(prompts)
        count = self.share[1]
        B = self._rows_bucket(n_rows)
        P = bucket(longest or max(len(p) for p in prompts), self.prompt_buckets, "prompt length")
        toks = np.full((B, P), self.pad_id, np.int32)
        mask = np.zeros((B, P), np.int32)
        for r, p in enumerate(prompts):  # left-pad: all rows share the write slot
            toks[r, P - len(p):] = p
            mask[r, P - len(p):] = 1
        mask[n:, -1] = 1  # dummy rows see one (pad) token so their softmax is well defined

        def pad(x, fill):  # dummy rows: greedy, one token
            return np.concatenate([x, np.full((B - n, *x.shape[1:]), fill, x.dtype)]) if B > n else x

        sampling = RowSampling(pad(sampling.keys, 0), pad(sampling.temperature, 0), pad(sampling.top_k, 0),
                               pad(sampling.top_p, 1), pad(sampling.limit, 1))
        limit = sampling.limit  # this process's rows, on the host
        sh = parallel.named_sharding(self.mesh, ("batch", "seq"), (B * count, P))
        row_sh = lambda x: parallel.named_sharding(self.mesh, ("batch",) + (None,) * (x.ndim - 1),  # noqa: E731
                                                   (B * count, *x.shape[1:]))
        # Each process supplies its own rows (with one share: host values every process holds).
        sampling = RowSampling(*(parallel.from_process_rows(x, row_sh(x), self.share) for x in sampling))
        args = (sampling, stop, np.int32(self.decode_segment))
        self._poll()
        state, finished = self._start(params, parallel.from_process_rows(toks, sh, self.share),
                                      parallel.from_process_rows(mask, sh, self.share), *args, **statics)
        # `finished` is replicated, so every process runs the same number of segments.
        while not parallel.to_host(finished):
            self._poll()
            state, finished = self._resume(params, state, *args, **statics)
        out_tok, out_lp = (parallel.process_rows(x, self.share) for x in (state.out_tok, state.out_lp))
        steps = int(parallel.to_host(state.step))
        n_new = out_tok.shape[1]
        # length: up to and including the first stop token, else the row's generated steps
        is_stop = np.isin(out_tok, stop) & (np.arange(n_new) < np.minimum(steps, limit)[:, None])
        out_len = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1) + 1, np.minimum(steps, limit))
        return out_tok[:n], out_lp[:n], out_len[:n].astype(np.int32)

    def _poll(self):
        if self.poll is not None:
            self.poll()

    # ---- continuous batching ----------------------------------------------------------

    def _run_slots(self, params, prompts, longest: int, rows: RowSampling, stop, statics, progress, slots: int,
                   groups: list[int] | None = None):
        """Continuous batching: yields (prompt index, (tokens, logprobs)) as rows finish.

        A fixed set of decode slots (`slots`: this process's rows of the batch, at most
        `max_batch / processes`); a waiting prompt is prefilled into a slot as soon as it is free, so a
        call costs about its total tokens, not rows x its longest row. A row draws with
        its own key and token index only, so its output does not depend on its slot, its
        neighbours or the timing. The cache has the longest prompt's bucket before the
        generated tokens; a prompt of a smaller bucket is written just before them. The
        prompts taken by one refill are prefilled per bucket, each group at its own size
        (`groups`: bucket index -> the bucket index it is prefilled at; default its own).
        Multi-process: every decision that shapes a program (refill sizes, their prompt
        buckets, whether to go on) is agreed, so all processes run the same programs.

        Rows with the same prompt (k samples of it) share its prefill: a refill prefills
        each distinct prompt of a device's rows once and copies its cache to those rows
        (`_refill_fn`'s `src`); the rows still draw with their own keys, so their tokens are
        those of separate prefills. Identical prompts are dealt to the same device."""
        count = self.share[1]
        S = slots  # this process's slots
        P = bucket(longest, self.prompt_buckets, "prompt length")
        nb = len(self.prompt_buckets)
        n_new = statics["n_new_bucket"]
        per_call = {k: v for k, v in statics.items() if k != "n_new_bucket"}  # the slot state fixes n_new
        state = self._slots_init(batch=S * count, prompt_len=P, n_new=n_new, key_shape=rows.keys.shape[1:])
        owner = [-1] * S  # the prompt each slot is generating, -1: free
        queue = collections.deque(range(len(prompts)))
        refill_at = max(1, S // 4)  # free slots (of one process) worth a refill while it has prompts waiting
        local = max(1, self.batch_shards // count)  # this process's devices holding batch rows
        per_device = S // local  # slots on each of them
        while True:
            free = [s for s in range(S) if owner[s] < 0]
            take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            # Each prompt goes to a free slot on the device that will hold its refill row
            # (see `_refill_fn`). A refill has the same number of rows on every device, so
            # each bucket's prompts are dealt evenly: to the device with the fewest of them
            # so far, then the most free slots.
            left = [[s for s in free if s // per_device == d] for d in range(local)]
            placed = [[[] for _ in range(local)] for _ in range(nb)]  # [bucket][device] -> (slot, prompt)
            last = (None, -1)  # (the prompt placed last, its device)
            for i in sorted(take, key=lambda i: len(prompts[i])):  # stable: a prompt's k copies stay adjacent
                b = bisect.bisect_left(self.prompt_buckets, len(prompts[i]))
                group = placed[groups[b] if groups else b]
                d = min((d for d in range(local) if left[d]), key=lambda d: (len(group[d]), -len(left[d])))
                if self.share_prefill and last[1] >= 0 and left[last[1]] and prompts[i] == last[0]:
                    d = last[1]  # a copy of the last prompt: the same device, to share its prefill
                group[d].append((left[d].pop(0), i))
                last = (prompts[i], d)
            # Distinct prompts per device in each refill a bucket can take (a fixed number
            # of refills per bucket, so every process agrees on one list).
            caps = [self._refill_rows(b, per_device) for b in range(nb)]
            distinct = [max(len({tuple(prompts[i]) if self.share_prefill else i for _, i in g[start:start + caps[b]]})
                            for g in placed[b]) for b in range(nb) for start in range(0, per_device, caps[b])]
            flags = [max(len(g) for g in groups) for groups in placed] + [len(queue), sum(o >= 0 for o in owner)
                                                                          + len(take)] + distinct
            *qs, waiting, active = (flags := parallel.agree_max(flags) if count > 1 else flags)[:nb + 2]
            distinct = iter(flags[nb + 2:])
            distinct = [[next(distinct) for _ in range(0, per_device, caps[b])] for b in range(nb)]
            # At most `_refill_rows` rows per device a refill: its prefill's activations stay
            # within `prefill_tokens`, in one pass (grouping rows inside the refill would
            # hold a second cache of all of them).
            for b, q_all, cap, start in ((b, q, caps[b], start) for b, q in enumerate(qs) if q
                                         for start in range(0, q, caps[b])):
                q = min(q_all - start, cap)
                q = min(per_device, 1 << (q - 1).bit_length())  # rows per device: powers of two
                u = min(q, 1 << (max(distinct[b][start // cap], 1) - 1).bit_length())  # prefill rows per device
                kb, ku, Pk = q * local, u * local, self.prompt_buckets[b]
                toks, mask = np.full((ku, Pk), self.pad_id, np.int32), np.zeros((ku, Pk), np.int32)
                slots = np.full((kb,), per_device, np.int32)  # padding rows: out of range, dropped
                src = np.zeros((kb,), np.int32)  # each row's prefill row, on its device
                mask[:, -1] = 1  # padding rows see one (pad) token so their softmax is well defined
                idx = np.zeros((kb,), np.int64)
                for d, group in enumerate(placed[b]):
                    first = {}  # prompt -> its prefill row on this device
                    for j, (s, i) in enumerate(group[start:start + q]):
                        r, key = d * q + j, tuple(prompts[i]) if u < q else j  # u == q: a row each
                        if key not in first:
                            first[key] = m = d * u + len(first)
                            toks[m], mask[m] = self.pad_id, 0
                            toks[m, Pk - len(prompts[i]):], mask[m, Pk - len(prompts[i]):] = prompts[i], 1
                        src[r] = first[key] - d * u
                        slots[r], owner[s], idx[r] = s - d * per_device, i, i
                new = RowSampling(*(x[idx] if len(x) else np.zeros((kb, *x.shape[1:]), x.dtype) for x in rows))
                sh = lambda x: parallel.named_sharding(self.mesh, ("batch",) + (None,) * (x.ndim - 1),  # noqa: E731
                                                       (x.shape[0] * count, *x.shape[1:]))
                put = lambda x: parallel.from_process_rows(x, sh(x), self.share)  # noqa: E731
                self._poll()
                state = self._refill(params, state, put(toks), put(mask), put(slots), put(src) if u < q else None,
                                     RowSampling(*(put(x) for x in new)), stop,
                                     **per_call)
            if not active and not waiting:
                return
            self._poll()
            # A process with prompts waiting stops the segment once enough of its own slots are free.
            waits = np.full((S,), bool(queue))
            waits = parallel.from_process_rows(waits, parallel.named_sharding(self.mesh, ("batch",), (S * count,)),
                                               self.share)
            state = self._segment(params, state, stop, np.int32(self.decode_segment), waits, np.int32(refill_at),
                                  **per_call)
            t, done = (parallel.process_rows(x, self.share) for x in (state.t, state.done))
            finished = [s for s in range(S) if owner[s] >= 0 and done[s]]
            if finished:
                out_tok, out_lp = (parallel.process_rows(x, self.share) for x in (state.out_tok, state.out_lp))
                for s in finished:
                    steps = int(t[s])
                    hits = np.flatnonzero(np.isin(out_tok[s, :steps], stop))
                    k_ = int(hits[0]) + 1 if hits.size else steps
                    yield owner[s], (out_tok[s, :k_].tolist(), out_lp[s, :k_])
                    owner[s] = -1
            progress.update(len(finished) * count)

    def _refill_rows(self, b: int, per_device: int) -> int:
        """Most rows per device one refill prefills at prompt bucket `b`: a power of two of
        at most `prefill_tokens` tokens (at least one row), or every slot without a limit."""
        if not self.prefill_tokens:
            return per_device
        rows = max(1, self.prefill_tokens // self.prompt_buckets[b])
        return min(per_device, 1 << (rows.bit_length() - 1))

    def _slots_init_fn(self, *, batch: int, prompt_len: int, n_new: int, key_shape):
        """Every slot free (done) and empty."""
        self.trace_count += 1
        with parallel.activation_mesh(self.mesh):
            per_layer = self.layer_loop == "unrolled"
            S = prompt_len + n_new
            rows = _rows_constrain
            zeros = lambda shape, dtype: rows(jnp.zeros(shape, dtype))  # noqa: E731
            return SlotState(self._empty_cache(batch, S, per_layer), zeros((batch, S), jnp.int32),
                             zeros((batch, n_new), jnp.int32), zeros((batch, n_new), jnp.float32),
                             zeros((batch,), jnp.int32), rows(jnp.ones((batch,), bool)), zeros((batch,), jnp.int32),
                             RowSampling(zeros((batch, *key_shape), jnp.uint32),
                                         *(rows(jnp.full((batch,), v, d)) for v, d in
                                           ((0, jnp.float32), (0, jnp.int32), (1, jnp.float32), (1, jnp.int32)))))

    def _refill_fn(self, params, state: "SlotState", prompt, prompt_mask, slots, src, new: RowSampling, stop, *,
                   greedy: bool, use_top_k: bool, use_top_p: bool, top_k_cap: int) -> "SlotState":
        """Prefill `prompt` rows (left-padded to their bucket Pk) into decode slots: cache
        slots [P - Pk, P), first token. `slots[r]` is the slot of row r within the block
        of slots on the device that holds row r (rows and slots are split alike over the
        batch shards; out of range: a padding row, dropped), so every device writes only
        its own rows: a scatter across devices would gather the whole prefilled cache
        (compile_check: 103 GiB per H100 at the paper's lengths). `src[r]`, where given:
        row r's prompt row within the prompt rows of its device (rows sharing a prompt
        share its prefill); None: prompt row r."""
        self.trace_count += 1
        with parallel.activation_mesh(self.mesh):
            model = nnx.merge(self.graphdef, params)
            forward, logits_fn, layers = self._layer_loop(model)
            n_new = state.out_tok.shape[1]
            P = state.kv_mask.shape[1] - n_new
            k, Pk = slots.shape[0], prompt.shape[1]
            positions = model_state.positions_from_mask(prompt_mask)
            last, part = self._prefill(model, prompt, positions, prompt_mask, 0, layers is not None)
            if src is not None:  # per-row values from the shared prefill rows (the cache: `_write_rows`)
                D = self.batch_shards
                rows_of = src + (jnp.arange(k) // (k // D)) * (prompt.shape[0] // D)
                last, positions, prompt_mask = (_rows_constrain(x[rows_of]) for x in (last, positions, prompt_mask))
            logits = logits_fn(last)
            first = sample_rows(logits, new, 0, greedy=greedy, use_top_k=use_top_k, use_top_p=use_top_p,
                                top_k_cap=top_k_cap)
            rows = SlotState(part, jnp.zeros((k, P + n_new), jnp.int32).at[:, P - Pk:P].set(prompt_mask),
                             jnp.zeros((k, n_new), jnp.int32).at[:, 0].set(first),
                             jnp.zeros((k, n_new), jnp.float32).at[:, 0].set(_token_logprob(logits, first)),
                             jnp.ones((k,), jnp.int32), jnp.isin(first, stop) | (new.limit <= 1),
                             positions[:, -1] + 1, new)
            return self._write_rows(state, rows, slots, P - Pk, per_layer=layers is not None, src=src)

    def _write_rows(self, state: "SlotState", rows: "SlotState", slots, at: int, *, per_layer: bool,
                    src=None) -> "SlotState":
        """`state` with each device's rows of `rows` written into its own slots `slots`
        (local to the device's block; out of range: dropped); the cache rows at [at, at + Pk).
        `src`: each row's cache row within its device's rows of `rows.cache` (None: its own)."""
        key_axes, value_axes = (a[1:] if per_layer else a for a in KVCache.AXES)
        b = 0 if per_layer else 1  # the cache's batch axis
        kinds = SlotState(KVCache(jax.tree.map(lambda _: ("k", key_axes), state.cache.k),
                                  jax.tree.map(lambda _: ("v", value_axes), state.cache.v)),
                          *(jax.tree.map(lambda x: ("row", ("batch",) + (None,) * (x.ndim - 1)), f)
                            for f in state[1:]))
        kinds, treedef = jax.tree.flatten(kinds, is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[0], str))
        dest, new = treedef.flatten_up_to(state), treedef.flatten_up_to(rows)

        def write(slots, src, dest, new):
            out = []
            for (kind, _), d, n in zip(kinds, dest, new):
                idx = [slice(None)] * d.ndim
                idx[b if kind != "row" else 0] = slots
                if kind != "row":  # keys [.., K, Dh, S], values [.., K, S, Dh]
                    idx[-1 if kind == "k" else -2] = slice(at, at + n.shape[-1 if kind == "k" else -2])
                    if src is not None:
                        n = jnp.take(n, src, axis=b)
                out.append(d.at[tuple(idx)].set(n.astype(d.dtype), mode="drop"))
            return out

        if self.batch_shards == 1:
            out = write(slots, src, dest, new)
        else:
            specs = lambda xs: [parallel.logical_to_spec(names, x.shape, self.mesh)  # noqa: E731
                                for (_, names), x in zip(kinds, xs)]
            row_spec = parallel.logical_to_spec(("batch",), slots.shape, self.mesh)
            out = jax.shard_map(write, mesh=self.mesh, in_specs=(row_spec, None if src is None else row_spec,
                                                                 specs(dest), specs(new)),
                                out_specs=specs(dest), check_vma=False)(slots, src, dest, new)
        return jax.tree.unflatten(treedef, out)

    def _segment_fn(self, params, state: "SlotState", stop, segment, waits, want, *, greedy: bool,
                    use_top_k: bool, use_top_p: bool, top_k_cap: int) -> "SlotState":
        """Decode steps, each row at its own position, until every row is done, `segment`
        steps, or a process whose rows `waits` (it has prompts waiting) has `want` of its
        rows done (free slots to refill). Rows are in process order, `max_batch / processes`
        each."""
        self.trace_count += 1
        with parallel.activation_mesh(self.mesh):
            model = nnx.merge(self.graphdef, params)
            forward, logits_fn, _ = self._layer_loop(model)
            B, n_new = state.out_tok.shape
            P = state.kv_mask.shape[1] - n_new
            rows = state.rows
            ar = jnp.arange(B)

            count = self.share[1]

            def cond(carry):
                n, _, _, _, _, _, done, _ = carry
                free = jnp.sum((done & waits).reshape(count, B // count), axis=1)  # per process
                return (n < segment) & ~jnp.all(done) & ~jnp.any(free >= want)

            def body(carry):
                n, cache, kv_mask, out_tok, out_lp, t, done, pos = carry
                slot = P + t - 1  # each row's previous token goes into its own next slot
                kv_mask = kv_mask.at[ar, slot].set(1)
                prev = out_tok[ar, jnp.maximum(t - 1, 0)]
                hidden, cache = forward(prev[:, None], pos[:, None], kv_mask, cache, slot)
                logits = logits_fn(hidden[:, 0])
                tok = sample_rows(logits, rows, t, greedy=greedy, use_top_k=use_top_k, use_top_p=use_top_p,
                                  top_k_cap=top_k_cap)
                live = ~done
                tok = jnp.where(live, tok, self.pad_id)
                col = jnp.where(live, t, n_new)  # finished rows write nowhere
                out_tok = out_tok.at[ar, col].set(tok, mode="drop")
                out_lp = out_lp.at[ar, col].set(_token_logprob(logits, tok), mode="drop")
                done = done | (live & (jnp.isin(tok, stop) | (t + 1 >= rows.limit)))
                return n + 1, cache, kv_mask, out_tok, out_lp, t + live, done, pos + live

            carry = (jnp.int32(0), state.cache, state.kv_mask, state.out_tok, state.out_lp, state.t, state.done,
                     state.pos)
            _, cache, kv_mask, out_tok, out_lp, t, done, pos = jax.lax.while_loop(cond, body, carry)
            return SlotState(cache, *(_rows_constrain(x) for x in (kv_mask, out_tok, out_lp, t, done, pos)), rows)

    def _start_chunk(self, params, prompt, prompt_mask, rows: RowSampling, stop, segment, *, n_new_bucket: int,
                     greedy: bool, use_top_k: bool, use_top_p: bool, top_k_cap: int):
        """Prefill, first token, then decode up to `segment` tokens: (DecodeState, finished)."""
        self.trace_count += 1
        B, P = prompt.shape
        with parallel.activation_mesh(self.mesh):
            model = nnx.merge(self.graphdef, params)
            forward, logits_fn, layers = self._layer_loop(model)
            kv_mask = jnp.concatenate([prompt_mask, jnp.zeros((B, n_new_bucket), jnp.int32)], axis=1)
            positions = model_state.positions_from_mask(prompt_mask)
            last, cache = self._prefill(model, prompt, positions, kv_mask, n_new_bucket, layers is not None)
            logits = logits_fn(last)
            sample = functools.partial(sample_rows, rows=rows, greedy=greedy, use_top_k=use_top_k,
                                       use_top_p=use_top_p, top_k_cap=top_k_cap)
            first = sample(logits, index=0)
            out_tok = jnp.zeros((B, n_new_bucket), jnp.int32).at[:, 0].set(first)
            out_lp = jnp.zeros((B, n_new_bucket), jnp.float32).at[:, 0].set(_token_logprob(logits, first))
            state = DecodeState(jnp.int32(1), cache, kv_mask, out_tok, out_lp,
                                jnp.isin(first, stop) | (rows.limit <= 1), positions[:, -1] + 1)
            return self._decode(forward, logits_fn, state, P, rows, stop, segment, sample)

    def _prefill(self, model, prompt, positions, kv_mask, n_new: int, per_layer: bool):
        """(last hidden state [B, D], the cache with the prompts written): one pass, or a
        loop over groups of rows of at most `prefill_tokens` tokens, each prefilled into a
        cache of its own rows that is then copied into the batch's cache. Always the scanned
        layer stack, also for a per-layer cache (`_scanned_prefill`)."""
        B, P = prompt.shape
        forward = functools.partial(self._scanned_prefill, model) if per_layer else model
        cache = self._empty_cache(B, P + n_new, per_layer=per_layer)
        rows = max(1, self.prefill_tokens // P) if self.prefill_tokens else B
        while B % rows:  # equal groups (B is a power of two times the batch shards)
            rows -= 1
        if rows >= B:
            hidden, cache = forward(prompt, positions, kv_mask, cache, 0)
            return hidden[:, -1], cache
        axis = 0 if per_layer else 1  # the batch axis of the cache arrays

        def group(g, carry):
            last, cache = carry
            take = lambda x: jax.lax.dynamic_slice_in_dim(x, g * rows, rows, 0)  # noqa: E731
            hidden, part = forward(take(prompt), take(positions), take(kv_mask)[:, :P],
                                   self._empty_cache(rows, P, per_layer=per_layer), 0)
            cache = jax.tree.map(lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x, g * rows, axis), cache, part)
            return jax.lax.dynamic_update_slice_in_dim(last, hidden[:, -1], g * rows, 0), cache

        last = jnp.zeros((B, self.cfg.hidden_size), as_dtype(self.cfg.dtype))
        return jax.lax.fori_loop(0, B // rows, group, (last, cache))

    def _resume_chunk(self, params, state, rows: RowSampling, stop, segment, *, n_new_bucket: int, greedy: bool,
                      use_top_k: bool, use_top_p: bool, top_k_cap: int):
        """Up to `segment` more decode steps on `state` (donated): (DecodeState, finished)."""
        self.trace_count += 1
        with parallel.activation_mesh(self.mesh):
            model = nnx.merge(self.graphdef, params)
            forward, logits_fn, _ = self._layer_loop(model)
            P = state.kv_mask.shape[1] - n_new_bucket
            sample = functools.partial(sample_rows, rows=rows, greedy=greedy, use_top_k=use_top_k,
                                       use_top_p=use_top_p, top_k_cap=top_k_cap)
            return self._decode(forward, logits_fn, state, P, rows, stop, segment, sample)

    def _decode(self, forward, logits_fn, state: DecodeState, P: int, rows: RowSampling, stop, segment, sample):
        """Decode steps until every row is done (a stop token or its own limit) or `segment`
        more steps (prompt bucket `P`): (state, finished)."""
        B = state.out_tok.shape[0]
        end = jnp.minimum(jnp.max(rows.limit), state.step + segment)

        def cond(carry):
            step, _, _, _, _, done, _ = carry
            return (step < end) & ~jnp.all(done)

        def body(carry):
            step, cache, kv_mask, out_tok, out_lp, done, pos = carry
            slot = P + step - 1  # the previous token goes into this cache slot
            kv_mask = jax.lax.dynamic_update_slice(kv_mask, jnp.ones((B, 1), jnp.int32), (0, slot))
            prev = jax.lax.dynamic_slice(out_tok, (0, step - 1), (B, 1))
            hidden, cache = forward(prev, pos[:, None], kv_mask, cache, slot)
            logits = logits_fn(hidden[:, 0])
            tok = sample(logits, index=step)
            tok = jnp.where(done, self.pad_id, tok)
            lp = jnp.where(done, 0.0, _token_logprob(logits, tok))
            out_tok = jax.lax.dynamic_update_slice(out_tok, tok[:, None], (0, step))
            out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, step))
            done = done | jnp.isin(tok, stop) | (step + 1 >= rows.limit)
            return step + 1, cache, kv_mask, out_tok, out_lp, done, pos + 1

        carry = (state.step, state.cache, state.kv_mask, state.out_tok, state.out_lp, state.done, state.pos)
        step, cache, kv_mask, out_tok, out_lp, done, pos = jax.lax.while_loop(cond, body, carry)
        c = _rows_constrain
        state = DecodeState(step, cache, c(kv_mask), c(out_tok), c(out_lp), c(done), c(pos))
        return state, (step >= jnp.max(rows.limit)) | jnp.all(done)

    def _scanned_prefill(self, model, tokens, positions, attn_mask, cache: KVCache, cache_index: int):
        """`cpu.forward_layers` for a prefill (nothing cached before it), from the scanned
        layer stack: a prefill is matmul-bound, so slicing each layer's weights out of the
        stack costs it little, while unrolling the layers in every generation program
        doubled that program's machine code (XLA:CPU: ~0.15 GB resident and ~6 s to compile
        per program on the embedded default, docs/benchmarks.md). The prompt's keys and
        values go into the per-layer cache's first slots."""
        if not (isinstance(cache_index, int) and cache_index == 0):
            raise ValueError(f"a scanned prefill writes from slot 0, got cache_index={cache_index!r}")
        B, n = tokens.shape
        hidden, part = model(tokens, positions, attn_mask[:, :n], self._empty_cache(B, n, per_layer=False), 0)
        return hidden, KVCache([c.at[..., :n].set(k) for c, k in zip(cache.k, part.k)],  # keys [B, K, Dh, S]
                               [c.at[:, :, :n].set(v) for c, v in zip(cache.v, part.v)])  # values [B, K, S, Dh]

    def _empty_cache(self, batch: int, slots: int, per_layer: bool) -> KVCache:
        cache = KVCache.zeros(self.cfg, batch, slots, self.cache_dtype, per_layer=per_layer)
        if per_layer:
            return KVCache(*([parallel.constrain(x, a[1:]) for x in xs] for xs, a in zip(cache, KVCache.AXES)))
        return KVCache(*(parallel.constrain(x, a) for x, a in zip(cache, KVCache.AXES)))

    def _layer_loop(self, model):
        """(forward(tokens, positions, mask, cache, index) -> (hidden, cache), logits(hidden),
        per-layer weights or None for the scanned stack)."""
        if self.layer_loop == "scan":
            return model, model.logits, None
        # Per-layer weight copies are made here, once per program, outside the decode loop.
        from ophsd_jax.models import cpu

        layers = cpu.layer_weights(model, split_outputs=2)  # two threads per output projection
        forward = lambda *a: cpu.forward_layers(model, layers, *a)  # noqa: E731
        return forward, lambda h: cpu.decode_logits(model, h), layers


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


class ChatRequest(NamedTuple):
    """One batched chat call: its conversations, sampling settings and key (conversation i
    samples with fold_in(rng, i), i counted over every process's conversations)."""
    conversations: Sequence[list[dict]]
    max_new_tokens: int
    rng: jax.Array
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def generate_chats(sampler: Sampler, tokenizer, params, requests: Sequence[ChatRequest], *,
                   template_kwargs: dict | None = None) -> list[ChatOutput]:
    """Independent chat calls as one generation (one sampler call): each request keeps its
    own sampling settings, length limit and keys, so its outputs are those it would get
    alone. The rollout and a harness's first call go through here together.

    Applies the chat template, generates, decodes. A prompt longer than the sampler's
    largest prompt bucket is skipped (`skipped`, text None) instead of ending the run; the
    callers count the skips. The sampler is called exactly once, also when nothing fits:
    with several processes the call is collective, so each process makes it whatever its
    own prompts are."""
    rendered = [[tokenizer.apply_chat_template(m, add_generation_prompt=True, **(template_kwargs or {}))
                 for m in r.conversations] for r in requests]
    limit = sampler.prompt_buckets[-1]
    sizes = [len(r.conversations) for r in requests]
    share, count = sampler.share
    most = parallel.agree_max(sizes) if count > 1 and requests else sizes  # per request, for global key indices
    rows = []  # (request, index) of every prompt that fits
    for j, prompts in enumerate(rendered):
        fits = [i for i, p in enumerate(prompts) if len(p) <= limit]
        if len(fits) < len(prompts):
            log.warning("skipping %d of %d prompts longer than the largest sampler.prompt_buckets entry (%d "
                        "tokens; longest %d)", len(prompts) - len(fits), len(prompts), limit, max(map(len, prompts)))
        rows += [(j, i) for i in fits]
    keys = [row_keys(r.rng, n, share * m) for r, n, m in zip(requests, sizes, most)]
    field = lambda name: [getattr(requests[j], name) for j, _ in rows]  # noqa: E731
    stop = tokenizer.stop_token_ids
    out = sampler.generate(params, [rendered[j][i] for j, i in rows], max_new_tokens=field("max_new_tokens"),
                           rng=np.stack([keys[j][i] for j, i in rows]) if rows else np.zeros((0, 2), np.uint32),
                           temperature=field("temperature"), top_k=field("top_k"), top_p=field("top_p"),
                           stop_tokens=stop)
    stop_set = set(stop)
    outputs = [ChatOutput([None] * n, rendered[j], [[] for _ in range(n)], [np.zeros((0,), np.float32)] * n,
                          [True] * n) for j, n in enumerate(sizes)]
    for k, (j, i) in enumerate(rows):
        o = outputs[j]
        o.tokens[i], o.logprobs[i], o.skipped[i] = out.tokens[k], out.logprobs[k], False
        o.texts[i] = tokenizer.decode([t for t in out.tokens[k] if t not in stop_set])
    return outputs


def generate_chat_tokens(sampler: Sampler, tokenizer, params, conversations: Sequence[list[dict]], *,
                         max_new_tokens: int, rng: jax.Array, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0, template_kwargs: dict | None = None) -> ChatOutput:
    """One chat call (`generate_chats` with one request)."""
    request = ChatRequest(conversations, max_new_tokens, rng, temperature, top_p, top_k)
    return generate_chats(sampler, tokenizer, params, [request], template_kwargs=template_kwargs)[0]


class GenerateChat:
    """The harness's `generate_chat(conversations, **sampling) -> ChatOutput`, bound to
    `params` (harnesses/base.py: `.texts`, and `.prompt_tokens`, the ids each reply was
    sampled after, which the teacher context is then scored in). A text is None where the
    prompt did not fit the sampler (see `generate_chats`). Each call draws a fresh key
    (fold_in of a call counter).

    `join`: a request that does not depend on the harness (the step's rollout). Where the
    sampler joins calls (`Sampler.join_calls`, the default) it is generated in one sampler
    call with the harness's first call (which depends only on the prompts too), each
    keeping its own settings and keys, so both get exactly what separate calls would give;
    `joined()` returns its output (generating it alone if it was not joined: the harness
    made no call, or the sampler does not join). `record`: a list each harness call's
    ChatOutput is appended to.
    """

    def __init__(self, sampler: Sampler, tokenizer, params, rng: jax.Array, *, default_max_new_tokens: int = 512,
                 template_kwargs: dict | None = None, record: list | None = None, join: ChatRequest | None = None):
        self.sampler, self.tokenizer, self.params, self.rng = sampler, tokenizer, params, rng
        self.default_max_new_tokens, self.template_kwargs, self.record = default_max_new_tokens, template_kwargs, record
        self._join, self._joined, self.calls = join, None, 0

    def __call__(self, conversations, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 max_new_tokens: int | None = None) -> ChatOutput:
        request = ChatRequest(conversations, max_new_tokens or self.default_max_new_tokens,
                              jax.random.fold_in(self.rng, self.calls), temperature, top_p, top_k)
        self.calls += 1
        *joined, out = self._generate([self._join] * self._pending() + [request])
        if joined:
            self._joined = joined[0]
        if self.record is not None:
            self.record.append(out)
        return out

    def joined(self) -> ChatOutput:
        """The output of the `join` request."""
        if self._joined is None and self._join is not None:
            self._joined = self._generate([self._join])[0]
        return self._joined

    def _pending(self) -> int:  # a join request to add to the next call
        return int(self._join is not None and self._joined is None and self.sampler.join_calls)

    def _generate(self, requests):
        return generate_chats(self.sampler, self.tokenizer, self.params, requests,
                              template_kwargs=self.template_kwargs)

