"""Sampler: greedy parity with transformers.generate (both layer loops), log-probs,
filtering statistics, compile counts, and sharded generation."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.extend import core as jex_core

import tolerances as tol
from hf_reference import make_hf_model, save_hf_model
from ophsd_jax import parallel
from ophsd_jax.models import state as S
from ophsd_jax.models.weights import load_hf
from ophsd_jax.sampling import (RowSampling, Sampler, filter_logits, greedy_token, prefill_groups, sample_rows,
                                top_k_cap)

PROMPTS = [[5, 17, 99, 23, 4, 61, 7], [250, 11], [42, 42, 8, 300, 19, 77, 150, 3, 9, 200, 12]]


def logprob_atol(cfg, graphdef, params, max_new):
    """Two fp32 computations of a sampled token's log-probability (prefill + KV-cache decode
    vs one forward, scan vs unrolled, sharded vs not): `tol.log_softmax_atol` of the logits'."""
    seq = max(map(len, PROMPTS)) + max_new
    return tol.log_softmax_atol(tol.logits_atol(cfg, graphdef, params, seq), cfg.vocab_size)


# (family, seed, init std) chosen so greedy decoding has no near-ties (asserted below).
MODELS = {"llama": (6, 0.2), "qwen3": (0, 0.1)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory):
    seed, std = MODELS[request.param]
    hf = make_hf_model(request.param, seed=seed, init_std=std)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    cfg, graphdef, params = load_hf(path, parallel.single_device_mesh())
    return hf, cfg, graphdef, params


def hf_greedy(hf, prompts, max_new, stop):
    T = max(map(len, prompts))
    ids = torch.zeros((len(prompts), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                      eos_token_id=stop or None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores, 1)  # [B, steps, V]
    rows = []
    for i in range(len(prompts)):
        gen = out.sequences[i, T:].tolist()
        if stop:
            hits = [j for j, t in enumerate(gen) if t in stop]
            gen = gen[: hits[0] + 1] if hits else gen
        rows.append(gen)
    return rows, scores


def assert_no_near_ties(scores, rows, min_gap=1e-2):
    for i, row in enumerate(rows):
        top2 = torch.topk(scores[i, : len(row)], 2, dim=-1).values
        gap = (top2[:, 0] - top2[:, 1]).min().item()
        assert gap > min_gap, f"row {i}: top-2 logits within {gap}; pick another seed"


LAYER_LOOPS = ["scan", "unrolled"]


@pytest.mark.parametrize("layer_loop,causal_block,impl,prefill_tokens", [
    ("scan", None, "dense", 0), ("unrolled", None, "dense", 0), ("unrolled", 4, "dense", 0),
    ("scan", 4, "blockwise", 0),
    # prefill in groups of rows: one row per pass (prompt bucket 64), two rows per pass
    ("unrolled", None, "dense", 64), ("scan", None, "dense", 128)])
def test_greedy_matches_transformers_with_stop_tokens(model, layer_loop, causal_block, impl, prefill_tokens,
                                                      monkeypatch):
    hf, cfg, graphdef, params = model
    cfg = cfg.replace(attention=impl)
    graphdef = S.abstract_model(cfg)[0]
    if causal_block:  # prefill in query (and key) blocks smaller than these prompts
        from ophsd_jax.models import attention
        monkeypatch.setattr(attention, "CAUSAL_BLOCK", causal_block)
        monkeypatch.setattr(attention, "BLOCK", causal_block)
    sampler = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=4, show_progress=False,
                      layer_loop=layer_loop, prefill_tokens=prefill_tokens)
    assert sampler.prompt_buckets[0] == 64 and sampler.prefill_tokens == (prefill_tokens or 32768)
    ref, scores = hf_greedy(hf, PROMPTS, 12, stop=None)
    assert_no_near_ties(scores, ref)
    ours = sampler.generate(params, PROMPTS, max_new_tokens=12, rng=jax.random.key(0), temperature=0.0)
    assert ours.tokens == ref
    # A stop token taken from the middle of row 0's continuation: that row must end there.
    stop = [ref[0][5]]
    ref_s, _ = hf_greedy(hf, PROMPTS, 12, stop=stop)
    ours_s = sampler.generate(params, PROMPTS, max_new_tokens=12, rng=jax.random.key(0), temperature=0.0,
                              stop_tokens=stop)
    assert ours_s.tokens == ref_s
    assert len(ours_s.tokens[0]) <= 6 and ours_s.tokens[0][-1] == stop[0]
    assert list(ours_s.lengths) == [len(r) for r in ref_s]


@pytest.mark.parametrize("layer_loop", LAYER_LOOPS)
def test_logprobs_equal_teacher_forced_forward(model, layer_loop):
    _, cfg, graphdef, params = model
    sampler = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=4, show_progress=False,
                      layer_loop=layer_loop)
    out = sampler.generate(params, PROMPTS, max_new_tokens=10, rng=jax.random.key(1), temperature=1.0)
    atol = logprob_atol(cfg, graphdef, params, 10)
    for prompt, gen, lp in zip(PROMPTS, out.tokens, out.logprobs):
        seq = jnp.asarray([prompt + gen], jnp.int32)
        m = jnp.ones_like(seq)
        h, _ = S.forward(graphdef, params, seq, S.positions_from_mask(m), m)
        logp = jax.nn.log_softmax(S.logits(graphdef, params, h)[0], axis=-1)
        ref = np.asarray([logp[len(prompt) - 1 + j, t] for j, t in enumerate(gen)])
        np.testing.assert_allclose(lp, ref, rtol=0, atol=atol)


def test_layer_loops_agree(model):
    """Scanned and unrolled layers: same tokens, same log-probs, when sampling too."""
    _, cfg, graphdef, params = model
    mesh = parallel.single_device_mesh()
    outs = [Sampler(cfg, graphdef, mesh, max_batch=4, show_progress=False, layer_loop=loop).generate(
        params, PROMPTS, max_new_tokens=10, rng=jax.random.key(3), temperature=1.0) for loop in LAYER_LOOPS]
    assert outs[0].tokens == outs[1].tokens
    for a, b in zip(outs[0].logprobs, outs[1].logprobs):
        np.testing.assert_allclose(a, b, rtol=0, atol=logprob_atol(cfg, graphdef, params, 10))
    assert Sampler(cfg, graphdef, mesh).layer_loop == "unrolled"  # the CPU default
    with pytest.raises(ValueError, match="layer_loop"):
        Sampler(cfg, graphdef, mesh, layer_loop="loop")


def _count_primitive(jaxpr, name: str) -> int:
    """Equations of primitive `name` in `jaxpr`, each nested jaxpr counted at every place
    it is used (a loop body once, an unrolled layer once per layer)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jex_core.ClosedJaxpr):
                    n += _count_primitive(sub.jaxpr, name)
                elif isinstance(sub, jex_core.Jaxpr):
                    n += _count_primitive(sub, name)
    return n


def test_the_unrolled_layer_loop_unrolls_only_the_decode(model):
    """The prefill runs through the scanned stack in both layer loops: on XLA:CPU each
    unrolled layer is machine code of its own, and an unrolled prefill doubled every
    generation program's (docs/benchmarks.md). So a start program (prefill + decode)
    minus a resume program (decode only) has the same matmuls in both loops."""
    _, cfg, graphdef, params = model
    mesh = parallel.single_device_mesh()
    dots = {}
    for loop in LAYER_LOOPS:
        sampler = Sampler(cfg, graphdef, mesh, max_batch=4, show_progress=False, layer_loop=loop, decode_segment=2)
        traced = {}
        for name in ("_start", "_resume"):
            fn = getattr(sampler, name)

            def capture(*a, fn=fn, name=name, **kw):
                traced[name] = _count_primitive(fn.trace(*a, **kw).jaxpr.jaxpr, "dot_general")
                return fn(*a, **kw)

            setattr(sampler, name, capture)
        sampler.generate(params, PROMPTS, max_new_tokens=5, rng=jax.random.key(0), temperature=0.0)
        dots[loop] = traced
    # the unrolled decode has a layer's matmuls per layer (and its projections in blocks)
    assert dots["unrolled"]["_resume"] >= dots["scan"]["_resume"] + cfg.num_layers - 1
    assert (dots["unrolled"]["_start"] - dots["unrolled"]["_resume"]
            == dots["scan"]["_start"] - dots["scan"]["_resume"]), dots

def test_greedy_token_is_argmax():
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 3, (64, 50)).astype(np.float32)  # many ties: the first maximum wins
    logits[0, 7] = np.nan  # a NaN counts as the maximum, as in argmax
    logits[1, 3] = logits[1, 9] = np.nan
    logits[2] = -np.inf
    np.testing.assert_array_equal(greedy_token(jnp.asarray(logits)), np.argmax(logits, axis=-1))


def _reference_filtered_probs(logits, temperature, top_k, top_p):
    """Independent numpy filtering: sort, cut, renormalise."""
    z = logits / temperature
    order = np.argsort(-z)
    keep = np.zeros_like(z, bool)
    k = top_k if top_k > 0 else len(z)
    p = np.exp(z[order[:k]] - z[order[0]])
    p /= p.sum()
    mass = 0.0
    for j, idx in enumerate(order[:k]):
        if mass >= top_p:
            break
        keep[idx] = True
        mass += p[j]
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("pooled", [False, True])  # True: as the sampler calls it (draw among top_k_cap)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0),
                                                     (1.0, 0, 0.8), (1.3, 3, 0.9)])
def test_sampling_frequencies_match_filtered_distribution(temperature, top_k, top_p, pooled):
    logits = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)
    expected = _reference_filtered_probs(logits.astype(np.float64), temperature, top_k, top_p)
    n = 40000
    keys = jax.random.split(jax.random.key(123), n)
    one = lambda x, dtype: jnp.asarray([x], dtype)  # noqa: E731

    def sample(k):  # the sampler's own per-row path, one row per key
        rows = RowSampling(jax.random.key_data(k)[None], one(temperature, jnp.float32), one(top_k, jnp.int32),
                           one(top_p, jnp.float32), one(1, jnp.int32))
        return sample_rows(jnp.asarray(logits)[None], rows, 0, greedy=False, use_top_k=top_k > 0,
                           use_top_p=top_p < 1.0, top_k_cap=top_k_cap(top_k, len(logits)) if pooled else 0)[0]

    draw = jax.jit(jax.vmap(sample))
    counts = np.bincount(np.asarray(draw(keys)), minlength=len(logits))
    freq = counts / n
    assert np.all(counts[expected == 0] == 0), f"filtered tokens were sampled: {counts}"
    # 5-sigma binomial bound per token: fails for any wrong filter/temperature handling.
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-9), (freq, expected)


def test_pooled_draw_keeps_ties_outside_the_pool():
    """The sampler draws among the top_k_cap largest logits; a row whose k-th largest ties
    with tokens beyond that pool must still draw from every tied token (top-k keeps ties),
    while its neighbours keep the pooled draw. Frequencies checked per row kind, for a batch
    with and without such a row (the fallback is a branch taken only when a row needs it)."""
    n, top_k = 20000, 2
    tied = np.array([2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0], np.float32)  # 2nd largest shared by 6 tokens
    plain = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)
    cap = top_k_cap(top_k, len(tied))
    assert 0 < cap < len(tied)  # the pooled path

    def expected(z):
        keep = z >= np.sort(z)[::-1][top_k - 1]
        p = np.where(keep, np.exp(z.astype(np.float64) - z.max()), 0.0)
        return p / p.sum()

    def draw(logits):
        m = len(logits)
        rows = RowSampling(jax.random.key_data(jax.random.split(jax.random.key(7), m)),
                           jnp.ones((m,), jnp.float32), jnp.full((m,), top_k, jnp.int32),
                           jnp.ones((m,), jnp.float32), jnp.ones((m,), jnp.int32))
        fn = jax.jit(lambda x: sample_rows(x, rows, 0, greedy=False, use_top_k=True, use_top_p=False,
                                           top_k_cap=cap))
        return np.asarray(fn(jnp.asarray(logits)))

    mixed = draw(np.stack([tied] * n + [plain] * n))
    for got, z in [(mixed[:n], tied), (mixed[n:], plain), (draw(np.stack([plain] * n)), plain)]:
        freq, want = np.bincount(got, minlength=len(z)) / n, expected(z)
        assert np.all(freq[want == 0] == 0), freq
        assert np.all(np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-9), (freq, want)


def _sorted_filter(logits, temperature, top_k, top_p):
    """The plain sort-based filter (numpy, per row): reference for the bisection one."""
    logits = logits.astype(np.float32) / np.float32(max(temperature, 1e-6))
    out = logits.copy()
    for row in out:
        order = np.sort(row)[::-1]
        if top_k:
            row[row < order[min(top_k, len(row)) - 1]] = -np.inf
            order = np.sort(row)[::-1]
        if top_p < 1:
            e = np.exp(order.astype(np.float64) - order[0])
            probs = e / e.sum()
            before = np.cumsum(probs) - probs
            n_keep = max(int(np.sum(before < top_p)), 1)
            row[row < order[n_keep - 1]] = -np.inf
    return out


@pytest.mark.parametrize("vocab,ties", [(50, False), (3000, False), (3000, True)])
def test_filter_keeps_the_same_tokens_as_sorting(vocab, ties):
    rng = np.random.default_rng(vocab + ties)
    logits = rng.normal(0, 3, (6, vocab)).astype(np.float32)
    if ties:  # many equal logits: ties at the k-th value and at the top-p cut
        logits = np.round(logits * 2) / 2
    logits[1, : vocab // 2] = -np.inf  # rows may arrive already masked
    # a few likely tokens, then more ties at the k-th value than top_k_cap holds: top-p must
    # renormalise over every survivor of top-k, not only over the candidates
    logits[2] = -5.0
    logits[2, :5], logits[2, 5:45] = [4.0, 3.5, 3.0, 2.5, 2.0], 0.0
    for temperature, top_k, top_p in [(1.0, 1, 1.0), (1.0, 20, 1.0), (0.7, 0, 0.9), (1.3, 40, 0.5), (1.0, 0, 0.999),
                                      (0.6, 20, 0.95), (1.0, 20, 0.75), (1.0, vocab, 0.3), (1.0, 5 * vocab, 1.0)]:
        cap = top_k_cap(top_k, vocab)  # also 0 (whole vocabulary) when top_k is 0 or large
        for pool in {0, cap}:
            got = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p, use_top_k=top_k > 0,
                                           use_top_p=top_p < 1.0, top_k_cap=pool))
            _check_filtered(got, logits, temperature, top_k, top_p)


def _check_filtered(got, logits, temperature, top_k, top_p):
    want = _sorted_filter(logits, temperature, top_k, top_p)
    kept = np.isfinite(got)
    if top_p < 1:  # a token whose cut mass is within the fp32 error of that mass of top_p may flip:
        # the softmax's normaliser and the masked sum of probabilities, V positive terms each
        delta = tol.prob(2 * logits.shape[-1])
        surely_kept = np.isfinite(_sorted_filter(logits, temperature, top_k, top_p - delta))
        maybe_kept = np.isfinite(_sorted_filter(logits, temperature, top_k, top_p + delta))
        assert np.all(kept[surely_kept]) and not np.any(kept & ~maybe_kept), (temperature, top_k, top_p)
        assert np.sum(kept != np.isfinite(want)) <= 2, (temperature, top_k, top_p)
    else:
        np.testing.assert_array_equal(kept, np.isfinite(want), err_msg=f"T={temperature} top_k={top_k}")
    # numpy's x / T is rounded once; XLA may compute x * (1 / T) with an approximate reciprocal:
    # allow 4 roundings in all
    np.testing.assert_allclose(got[kept], (logits / np.float32(temperature))[kept], rtol=tol.gamma(4), atol=0)


def test_filter_keeps_at_least_one_token():
    logits = jnp.array([[5.0, 1.0, 0.0]])
    f = filter_logits(logits, 1.0, 1, 0.01, use_top_k=True, use_top_p=True)
    assert np.isfinite(np.asarray(f)).tolist() == [[True, False, False]]


def test_one_compilation_per_bucket(model):
    _, cfg, graphdef, params = model
    sampler = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=4, show_progress=False,
                      prompt_buckets=(16, 32), new_token_buckets=(8, 16))
    # Same buckets (batch 3-4 -> 4 rows, prompts <= 16, new tokens <= 8), other lengths and settings
    # (distinct prompts: repeated ones take the slot path, test_repeated_prompts_share_one_prefill...).
    calls = [(PROMPTS, 5, 1.0, 0, 1.0), (PROMPTS + [[9]], 7, 0.8, 0, 1.0), ([[1, 2, 3, 4] * 3, [2, 3, 4] * 4, [5] * 12], 8, 1.2, 0, 1.0)]
    for i, (prompts, new, temp, top_k, top_p) in enumerate(calls):
        sampler.generate(params, prompts, max_new_tokens=new, rng=jax.random.key(i), temperature=temp,
                         top_k=top_k, top_p=top_p, stop_tokens=[i])
    assert sampler.trace_count == 1
    sampler.generate(params, PROMPTS, max_new_tokens=12, rng=jax.random.key(0), temperature=1.0)  # new token bucket
    assert sampler.trace_count == 2
    sampler.generate(params, [[3] * 20], max_new_tokens=12, rng=jax.random.key(0), temperature=1.0)  # prompt bucket
    assert sampler.trace_count == 3


def test_large_batches_are_chunked(model):
    _, cfg, graphdef, params = model
    sampler = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=2, show_progress=False)
    whole = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=8, show_progress=False)
    prompts = PROMPTS + [[7, 8, 9], [100, 101]]
    a = sampler.generate(params, prompts, max_new_tokens=6, rng=jax.random.key(0), temperature=0.0)
    b = whole.generate(params, prompts, max_new_tokens=6, rng=jax.random.key(0), temperature=0.0)
    assert a.tokens == b.tokens and len(a.tokens) == 5


@pytest.mark.parametrize("layer_loop", LAYER_LOOPS)
def test_sharded_generation_matches_single_device(model, layer_loop):
    _, cfg, graphdef, params = model
    single = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=8, show_progress=False)
    ref = single.generate(params, PROMPTS * 2, max_new_tokens=10, rng=jax.random.key(0), temperature=0.0)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    placed = jax.device_put(params, S.param_shardings(params, mesh))
    sharded = Sampler(cfg, graphdef, mesh, max_batch=8, show_progress=False, layer_loop=layer_loop)
    out = sharded.generate(placed, PROMPTS * 2, max_new_tokens=10, rng=jax.random.key(0), temperature=0.0)
    assert out.tokens == ref.tokens
    for a, b in zip(out.logprobs, ref.logprobs):
        np.testing.assert_allclose(a, b, rtol=0, atol=logprob_atol(cfg, graphdef, params, 10))


@pytest.mark.parametrize("layer_loop", ["unrolled", "scan"])
def test_decode_segments_match_one_program_and_can_be_abandoned(model, layer_loop):
    """Decoding in segments of 3 steps gives the tokens and log-probs of one segment, bit for
    bit; `poll` runs before the start and between segments (where a stop abandons the call)."""
    _, cfg, graphdef, params = model

    def sampler(segment):
        return Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=4, show_progress=False,
                       prompt_buckets=(16, 32), new_token_buckets=(16,), layer_loop=layer_loop,
                       decode_segment=segment)

    kw = dict(max_new_tokens=13, rng=jax.random.key(1), temperature=1.0, top_k=5)
    whole = sampler(16).generate(params, PROMPTS, **kw)
    segmented, polls = sampler(3), []
    segmented.poll = lambda: polls.append(len(polls))
    parts = segmented.generate(params, PROMPTS, **kw)
    assert parts.tokens == whole.tokens and parts.lengths.tolist() == whole.lengths.tolist() == [13] * 3
    for a, b in zip(parts.logprobs, whole.logprobs):
        np.testing.assert_array_equal(a, b)
    # start: prefill + tokens 2-4; then 5-7, 8-10, 11-13: one poll before each program
    assert len(polls) == 4

    class Abandoned(Exception):
        pass

    def poll():
        polls.append(len(polls))
        if len(polls) == 2:  # before the second program (the first segment after the start)
            raise Abandoned

    polls.clear()
    segmented.poll = poll
    with pytest.raises(Abandoned):
        segmented.generate(params, PROMPTS, **kw)
    segmented.poll = None  # the sampler is fine after an abandoned call
    assert segmented.generate(params, PROMPTS, **kw).tokens == whole.tokens


def test_per_row_settings_match_separate_calls(model):
    """One call with per-row limits, temperatures, top-k/top-p and keys gives each row what
    a call of that row alone gives (its sample depends on its key, not on its row or its
    neighbours): what lets the rollout and a harness call share one generation."""
    _, cfg, graphdef, params = model
    sampler = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=4, show_progress=False,
                      prompt_buckets=(16,), new_token_buckets=(16,))
    keys = jax.random.split(jax.random.key(7), 4)
    rows = [(PROMPTS[0], 9, 1.0, 0, 1.0), (PROMPTS[1], 4, 0.0, 0, 1.0), (PROMPTS[2], 12, 0.7, 5, 0.9),
            (PROMPTS[0], 6, 1.3, 0, 0.8)]
    joint = sampler.generate(params, [r[0] for r in rows], max_new_tokens=[r[1] for r in rows], rng=keys,
                             temperature=[r[2] for r in rows], top_k=[r[3] for r in rows],
                             top_p=[r[4] for r in rows])
    for i, (prompt, new, temp, top_k, top_p) in enumerate(rows):
        alone = sampler.generate(params, [prompt], max_new_tokens=new, rng=keys[i:i + 1], temperature=temp,
                                 top_k=top_k, top_p=top_p)
        assert joint.tokens[i] == alone.tokens[0], i
        assert joint.lengths[i] == alone.lengths[0] <= new
        np.testing.assert_allclose(joint.logprobs[i], alone.logprobs[0], rtol=0,
                                   atol=logprob_atol(cfg, graphdef, params, 16))
    assert joint.lengths[1] == 4 and joint.lengths[0] == 9  # no stop tokens: each row runs to its own limit
    # One key: prompt i samples with fold_in(key, i), whatever the chunking.
    key = jax.random.key(11)
    whole = sampler.generate(params, PROMPTS, max_new_tokens=8, rng=key, temperature=1.0)
    small = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=1, show_progress=False,
                    prompt_buckets=(16,), new_token_buckets=(16,))
    assert small.generate(params, PROMPTS, max_new_tokens=8, rng=key, temperature=1.0).tokens == whole.tokens
    assert whole.tokens[2] == sampler.generate(params, [PROMPTS[2]], max_new_tokens=8,
                                               rng=jax.random.fold_in(key, 2)[None], temperature=1.0).tokens[0]


def test_generate_chats_equals_separate_chat_calls(model):
    """Two requests in one generation (e.g. rollout + a harness's first call) give each
    request's conversations what a call of that request alone gives."""
    from fake_model import ByteTokenizer
    from ophsd_jax.sampling import ChatRequest, generate_chat_tokens, generate_chats

    _, cfg, graphdef, params = model
    tok = ByteTokenizer()
    sampler = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=8, show_progress=False,
                      prompt_buckets=(32, 64), new_token_buckets=(8, 16))
    a = ChatRequest([[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "hi there"}]], 12,
                    jax.random.key(1), 1.0, 1.0, 0)
    b = ChatRequest([[{"role": "user", "content": "plan it"}], [{"role": "user", "content": "x" * 80}]], 5,
                    jax.random.key(2), 0.6, 0.95, 20)  # the second prompt is too long: skipped
    joint = generate_chats(sampler, tok, params, [a, b])
    for request, out in zip((a, b), joint):
        alone = generate_chat_tokens(sampler, tok, params, request.conversations,
                                     max_new_tokens=request.max_new_tokens, rng=request.rng,
                                     temperature=request.temperature, top_p=request.top_p, top_k=request.top_k)
        assert out.tokens == alone.tokens and out.texts == alone.texts and out.skipped == alone.skipped
        assert all(len(t) <= request.max_new_tokens for t in out.tokens)
    assert joint[1].skipped == [False, True] and joint[1].texts[1] is None


_RAGGED_REFS = {}


def ragged_references(hf):
    """(prompts, limits, transformers' greedy continuations): ragged prompts (1-23 tokens)
    whose continuation has no near-tie, each generated alone (cached per model)."""
    if id(hf) not in _RAGGED_REFS:
        prompts, limits, refs = [], [], []
        for i in range(30):
            p, n = [(31 * i + 7 * j) % 290 + 3 for j in range(1 + (5 * i) % 23)], 2 + (7 * i) % 11
            (ref,), scores = hf_greedy(hf, [p], n, stop=None)
            top2 = torch.topk(scores[0, :len(ref)], 2, dim=-1).values
            if (top2[:, 0] - top2[:, 1]).min().item() > 1e-2:
                prompts, limits, refs = prompts + [p], limits + [n], refs + [ref]
        assert len(prompts) >= 9 and len({len(p) for p in prompts}) >= 5  # > 2 x 4 slots, ragged
        _RAGGED_REFS[id(hf)] = prompts, limits, refs
    return _RAGGED_REFS[id(hf)]


RAGGED = [[(31 * i + 7 * j) % 290 + 3 for j in range(1 + (5 * i) % 23)] for i in range(11)]  # 1..23 tokens


@pytest.mark.parametrize("layer_loop", ["unrolled", pytest.param("scan", marks=pytest.mark.slow)])
def test_continuous_batching_matches_transformers_on_a_ragged_batch_larger_than_the_slots(model, layer_loop):
    """Ragged prompts (1-23 tokens, more than twice the 4 decode slots), each with its own
    length limit, and a stop token: every prompt gets transformers' greedy continuation (prompts generated
    one at a time there), cut at its own limit or its first stop token."""
    hf, cfg, graphdef, params = model
    prompts, limits, refs = ragged_references(hf)
    stop = collections.Counter(t for r in refs for t in set(r[:-1])).most_common(1)[0][0]  # ends rows early
    # prompt buckets 8/16/32: refills of shorter buckets are written just before the generated slots
    sampler = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=4, show_progress=False,
                      layer_loop=layer_loop, batching="continuous", prompt_buckets=(8, 16, 32))
    out = sampler.generate(params, prompts, max_new_tokens=limits, rng=jax.random.key(0), temperature=0.0,
                           stop_tokens=[stop])
    expected = [r[: r.index(stop) + 1] if stop in r else r for r in refs]
    assert out.tokens == expected and list(out.lengths) == [len(e) for e in expected]
    assert sum(stop in r[:-1] for r in refs) >= 2  # the stop token did end rows early
    static = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=4, show_progress=False,
                     layer_loop=layer_loop, batching="static", prompt_buckets=(8, 16, 32))
    ref = static.generate(params, prompts, max_new_tokens=limits, rng=jax.random.key(0), temperature=0.0,
                          stop_tokens=[stop])
    assert ref.tokens == out.tokens  # greedy: the static path's outputs, token for token
    for a, b in zip(out.logprobs, ref.logprobs):
        np.testing.assert_allclose(a, b, rtol=0, atol=logprob_atol(cfg, graphdef, params, 12))


def test_a_prompts_sample_does_not_depend_on_its_slot_or_neighbours(model):
    """Sampling (T=1): with continuous batching, a prompt's tokens are those it gets alone,
    and those it gets in another order (its own key moved with it), whichever slot it
    lands in and whoever shares the batch."""
    _, cfg, graphdef, params = model
    mesh = parallel.single_device_mesh()
    keys = jax.random.split(jax.random.key(5), len(RAGGED))
    limits = [3 + (5 * i) % 9 for i in range(len(RAGGED))]
    sampler = Sampler(cfg, graphdef, mesh, max_batch=4, show_progress=False, batching="continuous")
    together = sampler.generate(params, RAGGED, max_new_tokens=limits, rng=keys, temperature=1.0)
    order = [7, 2, 10, 0, 5, 9, 1, 4, 8, 3, 6]
    shuffled = sampler.generate(params, [RAGGED[i] for i in order], max_new_tokens=[limits[i] for i in order],
                                rng=keys[np.asarray(order)], temperature=1.0)
    assert [shuffled.tokens[order.index(i)] for i in range(len(RAGGED))] == together.tokens
    for i in (0, 6, 10):
        alone = sampler.generate(params, [RAGGED[i]], max_new_tokens=limits[i], rng=keys[i:i + 1], temperature=1.0)
        assert alone.tokens[0] == together.tokens[i]
    assert len({tuple(t) for t in together.tokens}) > 5  # really sampled, not one constant row


def _spy(sampler, name, record):
    """Wrap one of the sampler's jitted programs to record its calls' (args, kwargs)."""
    inner = getattr(sampler, name)

    def call(*args, **kwargs):
        record.append((args, kwargs))
        return inner(*args, **kwargs)
    setattr(sampler, name, call)


def test_prompts_of_several_buckets_are_prefilled_each_at_their_own_bucket(model):
    """On the slot path (also by default), a call that fits the slots but spans prompt
    buckets (the rollout joined with longer harness prompts) starts every row at once,
    but prefills each bucket's prompts at that bucket's size, not all at the longest; a call with more
    prompts than slots (auto) runs one slot state per bucket, longest first, each with a
    cache of its own bucket. Greedy tokens equal the static path's (every row at the
    longest bucket)."""
    _, cfg, graphdef, params = model
    mesh = parallel.single_device_mesh()
    short, long = [p for p in RAGGED if len(p) <= 8][:3], [p for p in RAGGED if len(p) > 16][:2]
    assert len(short) == 3 and len(long) == 2
    prompts = short + long
    kw = dict(max_new_tokens=[3, 5, 4, 6, 2], rng=jax.random.key(0), temperature=0.0)
    static = Sampler(cfg, graphdef, mesh, max_batch=8, show_progress=False, batching="static",
                     prompt_buckets=(8, 16, 32)).generate(params, prompts, **kw)
    for batching in ("continuous", "auto"):  # auto: such a call takes the slot path too
        sampler = Sampler(cfg, graphdef, mesh, max_batch=8, show_progress=False, prompt_buckets=(8, 16, 32),
                          batching=batching)
        refills, inits, starts = [], [], []
        _spy(sampler, "_refill", refills)
        _spy(sampler, "_slots_init", inits)
        _spy(sampler, "_start", starts)
        out = sampler.generate(params, prompts, **kw)
        assert out.tokens == static.tokens
        assert sorted(args[2].shape for args, _ in refills) == [(2, 32), (4, 8)]  # rows (powers of two) x bucket
        assert [k["prompt_len"] for _, k in inits] == [32] and [k["batch"] for _, k in inits] == [8]
        assert not starts
    # auto, a call that fits the slots with one prefill size: the static path's one program.
    refills.clear(), starts.clear()
    assert sampler.generate(params, long, **{**kw, "max_new_tokens": 4}).tokens == Sampler(
        cfg, graphdef, mesh, max_batch=8, show_progress=False, batching="static", prompt_buckets=(8, 16, 32)
    ).generate(params, long, **{**kw, "max_new_tokens": 4}).tokens
    assert not refills and [args[1].shape for args, _ in starts] == [(2, 32)]
    # More prompts than the 2 slots: a slot state per bucket, the longest first.
    refills.clear(), inits.clear()
    small = Sampler(cfg, graphdef, mesh, max_batch=2, show_progress=False, prompt_buckets=(8, 16, 32))
    _spy(small, "_slots_init", inits)
    assert small.generate(params, prompts, **kw).tokens == static.tokens
    assert [k["prompt_len"] for _, k in inits] == [32, 8]


def test_repeated_prompts_share_one_prefill_and_keep_their_own_samples(model):
    """k samples of each prompt (avg@k): a refill prefills each distinct prompt once and
    copies its cache to its rows, which still draw with their own keys, so every row's
    tokens are those it gets with a prefill of its own (`batching=static`: one prefill per
    row). By default (auto) such a call takes the slot path even when it fits the slots."""
    _, cfg, graphdef, params = model
    mesh = parallel.single_device_mesh()
    k, base = 4, [RAGGED[1], RAGGED[4], RAGGED[9]]  # 3 distinct prompts of two buckets, 4 samples each
    prompts = [p for p in base for _ in range(k)]
    kw = dict(max_new_tokens=[3 + (5 * i) % 7 for i in range(len(prompts))],
              rng=jax.random.split(jax.random.key(7), len(prompts)), temperature=1.0)
    ref = Sampler(cfg, graphdef, mesh, max_batch=16, show_progress=False, batching="static",
                  prompt_buckets=(8, 16, 32)).generate(params, prompts, **kw)
    assert len({tuple(t) for t in ref.tokens}) > len(base)  # the copies really sampled differently
    for max_batch, batching in ((16, "auto"), (8, "continuous")):  # all rows at once; refills as slots free
        sampler = Sampler(cfg, graphdef, mesh, max_batch=max_batch, show_progress=False, batching=batching,
                          prompt_buckets=(8, 16, 32))
        refills = []
        _spy(sampler, "_refill", refills)
        out = sampler.generate(params, prompts, **kw)
        assert out.tokens == ref.tokens, batching
        for a, b in zip(out.logprobs, ref.logprobs):
            np.testing.assert_allclose(a, b, rtol=0, atol=logprob_atol(cfg, graphdef, params, 12))
        shapes = [(args[2].shape, args[4].shape[0]) for args, _ in refills]  # (prefilled rows x bucket, rows)
        assert all((args[5] is None) == (args[2].shape[0] == args[4].shape[0]) for args, _ in refills)
        assert sum(rows for _, rows in shapes) >= len(prompts)
        assert sum(p[0] for p, _ in shapes) < sum(rows for _, rows in shapes) // 2, shapes
        if batching == "auto":  # bucket 8: one prompt's 4 rows; bucket 32: two prompts' 8 rows
            assert sorted(shapes) == [((1, 8), 4), ((2, 32), 8)]


def test_a_refill_prefills_at_most_prefill_tokens_per_pass(model):
    """`prefill_tokens` bounds a refill's rows (its prefill's activations) on the slot path:
    a refill takes at most prefill_tokens // bucket rows (a power of two, at least one), so
    filling the slots takes several refills; the tokens are those of one refill per bucket."""
    _, cfg, graphdef, params = model
    mesh = parallel.single_device_mesh()
    limits = [3 + (5 * i) % 9 for i in range(len(RAGGED))]
    kw = dict(max_new_tokens=limits, rng=jax.random.split(jax.random.key(3), len(RAGGED)), temperature=1.0)
    runs = {}
    for cap in (0, 16):
        sampler = Sampler(cfg, graphdef, mesh, max_batch=4, show_progress=False, prompt_buckets=(8, 16, 32),
                          batching="continuous", prefill_tokens=cap)
        refills = []
        _spy(sampler, "_refill", refills)
        runs[cap] = sampler.generate(params, RAGGED, **kw).tokens, [args[2].shape for args, _ in refills]
    assert runs[16][0] == runs[0][0]
    assert max(rows for rows, _ in runs[0][1]) == 4  # unbounded (0 on this mesh: CPU auto, 32768 tokens)
    assert all(rows * bucket <= max(16, bucket) for rows, bucket in runs[16][1]), runs[16][1]
    assert len(runs[16][1]) > len(runs[0][1])
    assert sum(rows for rows, _ in runs[16][1]) >= len(RAGGED)


def test_prefill_groups_use_at_most_two_sizes_and_only_where_they_save_tokens():
    sizes = (64, 128, 256, 512, 1024)

    def tokens(counts, groups):  # prefill tokens, each group's prompts padded to power-of-two rows
        per = {}
        for b, c in enumerate(counts):
            per[groups[b]] = per.get(groups[b], 0) + c
        return sum(sizes[g] * (1 << max(int(n) - 1, 0).bit_length()) for g, n in per.items() if n)

    # the embedded default's joined call: 4 rollout prompts in 128, the planner's 4 in 256 and 512
    assert prefill_groups([0, 4, 1, 3, 0], sizes) == [1, 1, 3, 3, 4]
    assert prefill_groups([0, 0, 5, 0, 0], sizes) == [2, 2, 2, 3, 4]  # one bucket: its own
    assert prefill_groups([0, 0, 1, 3, 0], sizes) == [3, 3, 3, 3, 4]  # 256 x 1 + 512 x 4 > 512 x 4
    assert prefill_groups([2, 0, 1, 1, 0], sizes) == [0, 3, 3, 3, 4]  # three buckets, two sizes
    rng = np.random.default_rng(0)
    for _ in range(200):  # never more tokens than one size, and the best split of two
        counts = rng.integers(0, 5, len(sizes)) * (rng.random(len(sizes)) < 0.6)
        if not counts.any():
            continue
        groups = prefill_groups(counts.tolist(), sizes)
        top = max(b for b, c in enumerate(counts) if c)
        used = {groups[b] for b, c in enumerate(counts) if c}
        assert len(used) <= 2 and top in used and all(groups[b] >= b for b in range(len(sizes)))
        splits = [[t if b <= t else top for b in range(len(sizes))] for t in range(top + 1)]
        assert tokens(counts, groups) == min(tokens(counts, g) for g in splits)


@pytest.mark.slow  # (CI time) the two-process slow test also runs continuous batching over shards
def test_continuous_batching_on_a_sharded_mesh_matches_one_device(model):
    _, cfg, graphdef, params = model
    limits = [2 + (7 * i) % 11 for i in range(len(RAGGED))]
    single = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=4, show_progress=False,
                     batching="continuous")
    ref = single.generate(params, RAGGED, max_new_tokens=limits, rng=jax.random.key(0), temperature=0.0)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    placed = jax.device_put(params, S.param_shardings(params, mesh))
    sharded = Sampler(cfg, graphdef, mesh, max_batch=8, show_progress=False, batching="continuous")
    out = sharded.generate(placed, RAGGED, max_new_tokens=limits, rng=jax.random.key(0), temperature=0.0)
    assert out.tokens == ref.tokens
    # Repeated prompts (4 samples each) share a prefill per device: each row's samples are
    # those of one device with a prefill per row.
    prompts = [p for p in RAGGED[:6] for _ in range(4)]
    kw = dict(max_new_tokens=[2 + (3 * i) % 7 for i in range(len(prompts))],
              rng=jax.random.split(jax.random.key(2), len(prompts)), temperature=1.0)
    ref = Sampler(cfg, graphdef, parallel.single_device_mesh(), max_batch=32, show_progress=False,
                  batching="static").generate(params, prompts, **kw)
    refills = []
    _spy(sharded, "_refill", refills)
    assert sharded.generate(placed, prompts, **kw).tokens == ref.tokens
    assert any(args[5] is not None for args, _ in refills)
    with pytest.raises(ValueError, match="batching"):
        Sampler(cfg, graphdef, mesh, batching="dynamic")


def test_bf16_kv_cache_halves_the_cache_and_matches_the_fp32_model(model):
    """sampler.cache_dtype=bfloat16: the cache is stored in bf16 (half the bytes) and read
    back into fp32 attention. The sampled tokens' log-probs match a teacher-forced fp32
    forward within the fp32 bound of `logprob_atol` computed with bf16's unit roundoff
    (2^-9) in place of fp32's: rounding the cached keys and values is one more rounding
    in each of the decoder's terms."""
    _, cfg, graphdef, params = model
    mesh = parallel.single_device_mesh()
    f32 = Sampler(cfg, graphdef, mesh, max_batch=4, show_progress=False)
    b16 = Sampler(cfg, graphdef, mesh, max_batch=4, show_progress=False, cache_dtype="bfloat16")
    caches = [s._empty_cache(4, 32, per_layer=s.layer_loop == "unrolled") for s in (f32, b16)]
    assert {x.dtype for x in jax.tree.leaves(caches[0])} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(caches[1])} == {jnp.dtype(jnp.bfloat16)}
    assert sum(x.nbytes for x in jax.tree.leaves(caches[0])) == 2 * sum(x.nbytes for x in jax.tree.leaves(caches[1]))
    out = b16.generate(params, PROMPTS, max_new_tokens=10, rng=jax.random.key(1), temperature=1.0)
    seq = max(map(len, PROMPTS)) + 10
    logits_err = tol.pair(tol.prob(tol.decoder_terms(cfg, seq), u=2.0**-9) * tol.model_logit_scale(graphdef, params))
    atol = tol.log_softmax_atol(logits_err, cfg.vocab_size)
    deviation = 0.0
    for prompt, gen, lp in zip(PROMPTS, out.tokens, out.logprobs):
        tokens = jnp.asarray([prompt + gen], jnp.int32)
        m = jnp.ones_like(tokens)
        h, _ = S.forward(graphdef, params, tokens, S.positions_from_mask(m), m)
        logp = jax.nn.log_softmax(S.logits(graphdef, params, h)[0], axis=-1)
        ref = np.asarray([logp[len(prompt) - 1 + j, t] for j, t in enumerate(gen)])
        np.testing.assert_allclose(lp, ref, rtol=0, atol=atol)
        deviation = max(deviation, float(np.abs(lp - ref).max()))
    assert deviation > logprob_atol(cfg, graphdef, params, 10)  # the bf16 cache was read, not an fp32 one
