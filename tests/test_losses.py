"""Tiled divergences vs. the naive full-logits reference and hand computations."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances as tol
from ophsd_jax.distill import losses

B, T, D, V = 3, 37, 16, 1000
# tile=16 with B=3 gives 5 tokens per row per tile: T=37 is not a multiple, so
# the last tile is padded. vocab_tile=256 does not divide V=1000, so the last
# vocabulary block of the backward pass overlaps the previous one.
TILING = dict(tile=16, vocab_tile=256)

KINDS = [
    ("reverse_kl", 0.5),
    ("forward_kl", 0.5),
    ("jsd", 0.1),
    ("jsd", 0.5),
    ("jsd", 0.9),
    ("jsd", 0.0),
    ("jsd", 1.0),
]


def _inputs(seed=0, scale=0.5):
    k = jax.random.split(jax.random.key(seed), 5)
    hs = jax.random.normal(k[0], (B, T, D), jnp.float32)
    # Teacher hidden states correlated with the student's so the divergences
    # are of a realistic size (neither ~0 nor saturated).
    ht = hs + 0.7 * jax.random.normal(k[1], (B, T, D), jnp.float32)
    w = scale * jax.random.normal(k[2], (D, V), jnp.float32)
    mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
    mask = mask.at[2, 20:].set(0.0)  # a right-padded row
    weights = jnp.array([0.4, 1.3, 1.3], jnp.float32)
    return hs, ht, w, mask, weights


def _value_and_grads(fn, hs, ht, w, mask, **kw):
    def loss(a, c):
        return fn(a, ht, c, mask, **kw)[0]

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hs, w)


def _np_divergence(s, t, kind, beta):
    """float64 per-token divergence of logits s (student), t (teacher); also, for the error
    bounds, per token the sum of |terms| of its expectation (A) and the log-probabilities'
    magnitudes, sum_v (p + q)(|log p| + |log q|) (L)."""
    logp, logq = _log_softmax(s), _log_softmax(t)
    p, q = np.exp(logp), np.exp(logq)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        terms = p * (logp - logq)
    elif kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        terms = q * (logq - logp)
    else:  # beta KL(q || M) + (1 - beta) KL(p || M), M = beta q + (1 - beta) p
        log_m = np.log(beta * q + (1 - beta) * p)
        terms = beta * q * (logq - log_m) + (1 - beta) * p * (logp - log_m)
    return terms.sum(-1), np.abs(terms).sum(-1), ((p + q) * (np.abs(logp) + np.abs(logq))).sum(-1)


def _bounds(hs, ht, w, mask, weights=None, kind="reverse_kl", beta=0.5, w_teacher=None, two=True):
    """(value atol, gradient tolerance relative to a leaf's largest entry) of fp32 evaluations
    of the weighted token-mean divergence: two of them (tiled and naive; `two`), or one against
    float64. A logit is a D-term dot product, a log-probability adds a V-term log-sum-exp, the
    divergence is a V-term expectation and the loss a mean over the B*T tokens: one chain of
    D + 2V + B*T reductions (`tol.prob`) of the expectation's terms (A per token); each
    log-probability is also rounded about 3 times, 3u * |log p| (L per token). The gradients
    run the same chain backwards (over V for the hidden states, over the tokens for the head);
    the logit gradient inherits the log-probabilities' rounding relative to its own size,
    which is the terms' (L / A)."""
    s, t = _numpy_token_stats(hs, ht, w, w_teacher)
    _, a, l = _np_divergence(s, t, kind, beta)
    m = np.asarray(mask, bool)
    rw = np.ones(m.shape[0]) if weights is None else np.asarray(weights, np.float64)
    a_mean, l_mean = ((rw[:, None] * x)[m].sum() / m.sum() for x in (a, l))
    n = hs.shape[-1] + 2 * w.shape[-1] + m.size
    k = 2 if two else 1
    return k * (tol.prob(n) * a_mean + 3 * tol.U32 * l_mean), k * (tol.prob(n) + 3 * tol.U32 * l_mean / a_mean)


def _assert_close(actual, expected, atol=None, rtol_of_max=None):
    """Within `atol`, or within `rtol_of_max` times the largest |expected| entry."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if atol is None:
        atol = rtol_of_max * float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


def _assert_value_and_grads(val, grads, ref, ref_grads, bounds):
    value_atol, grad_rtol = bounds
    _assert_close(val, ref, atol=value_atol)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r, rtol_of_max=grad_rtol)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_value_and_grads_match_naive(kind, beta):
    hs, ht, w, mask, weights = _inputs()
    kw = dict(kind=kind, beta=beta, weights=weights)
    val, grads = _value_and_grads(losses.divergence, hs, ht, w, mask, **kw, **TILING)
    ref, ref_grads = _value_and_grads(losses.naive_divergence, hs, ht, w, mask, **kw)
    assert float(ref) > 1e-3  # the comparison is not between two zeros
    _assert_value_and_grads(val, grads, ref, ref_grads, _bounds(hs, ht, w, mask, **kw))
    # Masked positions get no gradient.
    assert np.all(np.asarray(grads[0])[np.asarray(mask) == 0] == 0)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_a_vocab_major_head_gives_the_same_loss_and_the_transposed_gradient(kind, beta):
    """A tied embedding goes in as stored, [V, D] (`vocab_major`): the loss and the hidden
    states' gradient are the naive [D, V] ones, the head's gradient is theirs transposed."""
    hs, ht, w, mask, weights = _inputs(seed=2)
    w_teacher = w + 0.2 * jax.random.normal(jax.random.key(8), w.shape)
    kw = dict(kind=kind, beta=beta, weights=weights)
    val, (g_hidden, g_head) = _value_and_grads(losses.divergence, hs, ht, w.T, mask, vocab_major=True,
                                               teacher_lm_head=w_teacher.T, **kw, **TILING)
    ref, ref_grads = _value_and_grads(losses.naive_divergence, hs, ht, w, mask, teacher_lm_head=w_teacher, **kw)
    assert g_head.shape == (V, D)
    bounds = _bounds(hs, ht, w, mask, **kw, w_teacher=w_teacher)
    _assert_value_and_grads(val, (g_hidden, g_head.T), ref, ref_grads, bounds)
    scores = losses.token_scores(hs, ht, w.T, mask, vocab_major=True, teacher_lm_head=w_teacher.T, tile=16)
    ref_scores = losses.token_scores(hs, ht, w, mask, teacher_lm_head=w_teacher, tile=16)
    # Default scores H / max H: each fp32 evaluation within 2 r of exact (test_token_scores_match_numpy).
    r_ent = tol.prob(D + V) + 3 * tol.U32
    assert np.all(np.abs(np.asarray(scores) - np.asarray(ref_scores)) <= 2 * 2 * r_ent * np.asarray(ref_scores))


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_separate_teacher_head_and_aux_match_naive(kind, beta):
    hs, ht, w, mask, _ = _inputs(seed=1)
    w_teacher = w + 0.2 * jax.random.normal(jax.random.key(7), w.shape)
    kw = dict(kind=kind, beta=beta, teacher_lm_head=w_teacher)
    val, grads = _value_and_grads(losses.divergence, hs, ht, w, mask, **kw, **TILING)
    ref, ref_grads = _value_and_grads(losses.naive_divergence, hs, ht, w, mask, **kw)
    bounds = _bounds(hs, ht, w, mask, kind=kind, beta=beta, w_teacher=w_teacher)
    _assert_value_and_grads(val, grads, ref, ref_grads, bounds)
    _, aux = losses.divergence(hs, ht, w, mask, **kw, **TILING)
    _, aux_ref = losses.naive_divergence(hs, ht, w, mask, **kw)
    assert set(aux) == set(aux_ref)
    # Entropies and divergence statistics: expectations whose terms are bounded by L, the
    # largest token's (a max over tokens is as exact as its largest element).
    s, t = _numpy_token_stats(hs, ht, w, w_teacher)
    l_max = float(_np_divergence(s, t, kind, beta)[2][np.asarray(mask, bool)].max())
    aux_atol = tol.pair((tol.prob(D + 2 * V + B * T) + 3 * tol.U32) * l_max)
    for name in aux:
        assert aux[name].shape == ()
        _assert_close(aux[name], aux_ref[name], atol=aux_atol)
    assert float(aux["tokens"]) == float(np.sum(mask))


def test_teacher_branch_gets_no_gradient():
    hs, ht, w, mask, _ = _inputs(seed=2)

    def loss(a, b, c, tc):
        return losses.divergence(a, b, c, mask, teacher_lm_head=tc, **TILING)[0]

    g_ht, g_wt = jax.grad(loss, argnums=(1, 3))(hs, ht, w, w)
    assert np.all(np.asarray(g_ht) == 0) and np.all(np.asarray(g_wt) == 0)
    # With the shared head, its gradient is the student-side gradient only:
    # the same as with a constant copy of the head on the teacher side.
    g_shared = jax.grad(lambda c: losses.divergence(hs, ht, c, mask, **TILING)[0])(w)
    g_copy = jax.grad(lambda c: loss(hs, ht, c, jnp.array(w)))(w)
    np.testing.assert_array_equal(np.asarray(g_shared), np.asarray(g_copy))


@pytest.mark.parametrize("kind,beta", KINDS)
def test_identical_teacher_gives_exact_zero(kind, beta):
    hs, _, w, mask, weights = _inputs(seed=3)
    val, (g_h, g_w) = _value_and_grads(
        losses.divergence, hs, hs, w, mask, kind=kind, beta=beta, weights=weights, **TILING
    )
    assert float(val) == 0.0
    assert np.all(np.asarray(g_h) == 0.0)
    assert np.all(np.asarray(g_w) == 0.0)


def _loss(hs, ht, w, mask, **kw):
    return float(losses.divergence(hs, ht, w, mask, **kw, **TILING)[0])


def test_jsd_endpoints_and_limits():
    hs, ht, w, mask, _ = _inputs(seed=4)
    fkl = _loss(hs, ht, w, mask, kind="forward_kl")
    rkl = _loss(hs, ht, w, mask, kind="reverse_kl")
    assert abs(fkl - rkl) > 1e-3 * rkl  # the two KLs are distinguishable here
    # Endpoints are the KLs exactly: beta=0 -> KL(p_T||p_S), beta=1 -> KL(p_S||p_T).
    assert _loss(hs, ht, w, mask, kind="jsd", beta=0.0) == fkl
    assert _loss(hs, ht, w, mask, kind="jsd", beta=1.0) == rkl
    # ... and the limits of the rescaled interior values: JSD_b / b -> KL(p_T||p_S) as b -> 0,
    # JSD_(1-b) / b -> KL(p_S||p_T). Off by the exact truncation error (float64, these logits)
    # plus fp32 rounding (one evaluation against float64 each), divided by b.
    s, t = _numpy_token_stats(hs, ht, w)
    m = np.asarray(mask, bool)
    mean = lambda x: float(x[m].mean())  # noqa: E731
    eps = 1e-3
    for beta, limit, kind in [(eps, fkl, "forward_kl"), (1 - eps, rkl, "reverse_kl")]:
        exact = mean(_np_divergence(s, t, "jsd", beta)[0]) / eps
        truncation = abs(exact - mean(_np_divergence(s, t, kind, beta)[0]))
        rounding = (_bounds(hs, ht, w, mask, kind="jsd", beta=beta, two=False)[0] / eps
                    + _bounds(hs, ht, w, mask, kind=kind, two=False)[0])
        assert abs(_loss(hs, ht, w, mask, kind="jsd", beta=beta) / eps - limit) <= truncation + rounding
        assert truncation < 10 * eps * exact  # first order in b: the limit is really approached
    # JSD_0.5 is symmetric in (student, teacher) and bounded by log 2.
    j = _loss(hs, ht, w, mask, kind="jsd", beta=0.5)
    np.testing.assert_allclose(_loss(ht, hs, w, mask, kind="jsd", beta=0.5), j, rtol=0,
                               atol=_bounds(hs, ht, w, mask, kind="jsd", beta=0.5)[0])
    assert 0.0 < j < np.log(2.0)


def _numpy_token_stats(hs, ht, w, w_teacher=None):
    """float64 per-token reverse KL, student entropy and JSD_0.5 (hand formulas)."""
    w_teacher = w if w_teacher is None else w_teacher
    s = np.asarray(hs, np.float64) @ np.asarray(w, np.float64)
    t = np.asarray(ht, np.float64) @ np.asarray(w_teacher, np.float64)
    return s, t


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_jsd(s, t):
    logp, logq = _log_softmax(s), _log_softmax(t)
    p, q = np.exp(logp), np.exp(logq)
    m = 0.5 * (p + q)
    return 0.5 * (q * (logq - np.log(m))).sum(-1) + 0.5 * (p * (logp - np.log(m))).sum(-1)


def test_clip_per_token():
    hs, ht, w, mask, weights = _inputs(seed=5)
    s, t = _numpy_token_stats(hs, ht, w)
    logp, logq = _log_softmax(s), _log_softmax(t)
    div = (np.exp(logp) * (logp - logq)).sum(-1)  # reverse KL per token
    m = np.asarray(mask, bool)
    clip = float(np.median(div[m]))
    expected = (np.asarray(weights)[:, None] * np.minimum(div, clip) * m).sum() / m.sum()
    kw = dict(clip=clip, weights=weights)
    val, grads = _value_and_grads(losses.divergence, hs, ht, w, mask, **kw, **TILING)
    _assert_close(val, expected, atol=_bounds(hs, ht, w, mask, weights, two=False)[0])  # vs float64
    ref, ref_grads = _value_and_grads(losses.naive_divergence, hs, ht, w, mask, **kw)
    _assert_value_and_grads(val, grads, ref, ref_grads, _bounds(hs, ht, w, mask, weights))
    g_h = grads[0]
    # Clipped tokens (away from the threshold) contribute no gradient.
    clipped = m & (div > clip * 1.01)
    assert clipped.sum() > 5
    assert np.all(np.asarray(g_h)[clipped] == 0)
    assert np.any(np.asarray(g_h)[m & (div < clip * 0.99)] != 0)
    _, aux = losses.divergence(hs, ht, w, mask, **kw, **TILING)
    np.testing.assert_allclose(float(aux["clip_fraction"]), (m & (div > clip)).sum() / m.sum())


def test_reward_weights():
    r = np.array([1.0, 0.0, 0.5, 0.0])
    w = np.asarray(losses.reward_weights(r, beta_r=0.5))
    e = np.exp(r / 0.5)
    # fp32 against float64: r / beta, the max subtracted, exp (accurate to 2u), a sum of 4
    # (3 additions), the division and the rescaling: 9 roundings; numpy's fp32 mean adds 4.
    np.testing.assert_allclose(w, e / e.sum() * 4, rtol=tol.gamma(9), atol=0)
    np.testing.assert_allclose(w.mean(), 1.0, rtol=tol.gamma(9 + 4), atol=0)
    # Padded dummy rows are excluded and get weight 0.
    valid = np.array([True, True, True, False])
    w = np.asarray(losses.reward_weights(r, beta_r=0.5, valid=valid))
    np.testing.assert_allclose(w[:3], e[:3] / e[:3].sum() * 3, rtol=tol.gamma(9), atol=0)
    assert w[3] == 0.0


@pytest.mark.parametrize("alpha,gamma,top_k", [(1.0, 0.0, None), (0.5, 2.0, None), (1.0, 1.0, 7)])
def test_token_scores_match_numpy(alpha, gamma, top_k):
    hs, ht, w, mask, _ = _inputs(seed=6)
    s, t = _numpy_token_stats(hs, ht, w)
    logp = _log_softmax(s)
    ent = -(np.exp(logp) * logp).sum(-1)
    if top_k:
        idx = np.argsort(-t, axis=-1)[..., :top_k]
        s_j, t_j = np.take_along_axis(s, idx, -1), np.take_along_axis(t, idx, -1)
    else:
        s_j, t_j = s, t
    jsd = _np_jsd(s_j, t_j)
    m = np.asarray(mask, bool)
    expected = (ent / ent[m].max()) ** alpha * (jsd / jsd[m].max()) ** gamma * m
    got = losses.token_scores(
        hs, ht, w, mask, alpha=alpha, gamma=gamma, teacher_top_k=top_k, tile=16
    )
    # fp32 against float64, per token, relative: the entropy is a chain of D + V reductions
    # of its terms p |log p| plus the log-probabilities' 3u; the JSD's error is `_bounds`'s
    # per token (terms A, log-probability magnitudes L) over its value. The score
    # (H / max H)^alpha (JSD / max JSD)^gamma adds alpha and gamma times those of the token
    # and of the maximum (first order).
    _, a, l = _np_divergence(s_j, t_j, "jsd", 0.5)
    r_ent = tol.prob(D + V) + 3 * tol.U32
    r_jsd = (tol.prob(D + 2 * V) * a + 3 * tol.U32 * l) / jsd
    top = np.unravel_index(np.argmax(np.where(m, jsd, -np.inf)), jsd.shape)
    bound = expected * (alpha * 2 * r_ent + gamma * (r_jsd + r_jsd[top]))
    assert np.all(np.abs(np.asarray(got, np.float64) - expected) <= bound)


def test_select_tokens_top_fraction():
    rng = np.random.default_rng(0)
    scores = rng.uniform(size=(3, 20)).astype(np.float32)
    mask = np.ones((3, 20), np.float32)
    mask[1, 12:] = 0
    mask[2, :] = 0  # an empty dummy row
    keep = np.asarray(losses.select_tokens(jnp.asarray(scores), jnp.asarray(mask), 0.3))
    for b, n in enumerate([20, 12, 0]):
        k = int(np.ceil(0.3 * n))
        assert keep[b].sum() == k
        valid = np.flatnonzero(mask[b])
        top = valid[np.argsort(-scores[b, valid], kind="stable")[:k]]
        assert set(np.flatnonzero(keep[b])) == set(top)


def test_select_tokens_sampled_is_keyed():
    scores = jnp.asarray(np.r_[np.linspace(0.1, 1.0, 10), np.zeros(10)][None].repeat(4, 0))
    mask = jnp.ones((4, 20))
    a = np.asarray(losses.select_tokens(scores, mask, 0.25, jax.random.key(1)))
    b = np.asarray(losses.select_tokens(scores, mask, 0.25, jax.random.key(1)))
    c = np.asarray(losses.select_tokens(scores, mask, 0.25, jax.random.key(2)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(a.sum(-1) == 5)
    assert np.all(a[:, 10:] == 0)  # zero-score tokens are not picked while others remain


def test_subsampled_loss_matches_naive_on_kept_tokens():
    hs, ht, w, mask, weights = _inputs(seed=7)
    kw = dict(alpha=1.0, gamma=1.0, teacher_top_k=None, tile=16)
    scores = losses.token_scores(hs, ht, w, mask, **kw)
    keep = losses.select_tokens(scores, mask, 0.5)
    assert 0 < float(keep.sum()) < float(mask.sum())
    val, grads = _value_and_grads(
        losses.divergence, hs, ht, w, mask, kind="jsd", beta=0.5, weights=weights,
        keep_fraction=0.5, vocab_tile=256, **kw,
    )
    ref, ref_grads = _value_and_grads(
        losses.naive_divergence, hs, ht, w, mask * keep, kind="jsd", beta=0.5, weights=weights
    )
    bounds = _bounds(hs, ht, w, mask * keep, weights, kind="jsd", beta=0.5)
    _assert_value_and_grads(val, grads, ref, ref_grads, bounds)
    _, aux = losses.divergence(hs, ht, w, mask, keep_fraction=0.5, gamma=1.0, **TILING)
    assert float(aux["tokens_used"]) == float(keep.sum())
    assert float(aux["tokens"]) == float(mask.sum())


def test_bf16_inputs_and_compute_dtype():
    hs, ht, w, mask, _ = _inputs(seed=8)
    hs16, ht16, w16 = (x.astype(jnp.bfloat16) for x in (hs, ht, w))
    val, (g_h, g_w) = _value_and_grads(losses.divergence, hs16, ht16, w16, mask, **TILING)
    ref, (r_h, r_w) = _value_and_grads(losses.naive_divergence, hs16, ht16, w16, mask)
    assert g_h.dtype == jnp.bfloat16 and g_w.dtype == jnp.bfloat16
    # Same bf16 operands, exact bf16 products, fp32 sums and softmax on both sides: the fp32
    # bounds of the bf16 inputs.
    value_atol, grad_rtol = _bounds(*(x.astype(jnp.float32) for x in (hs16, ht16, w16)), mask)
    _assert_close(val, ref, atol=value_atol)
    # The bf16 head gradient: each side's fp32 result rounded to bf16 (half an ulp, U_BF16
    # relative, each), and the naive reference's autodiff may round the logits' cotangent to
    # bf16 before its dot product (U_BF16 per term); on top of the fp32 error.
    _assert_close(g_w.astype(jnp.float32), r_w.astype(jnp.float32), rtol_of_max=3 * tol.U_BF16 + grad_rtol)
    # fp32 master head with bf16 matmuls: fp32 head gradient.
    val2, (_, g_w2) = _value_and_grads(
        losses.divergence, hs16, ht16, w, mask, compute_dtype=jnp.bfloat16, **TILING
    )
    assert g_w2.dtype == jnp.float32
    _assert_close(val2, ref, atol=value_atol)


_SHAPE = re.compile(r"\b(?:f32|bf16|f16|s32|pred)\[([0-9,]*)\]")


def _array_shapes(hlo_text):
    return {tuple(int(d) for d in m.group(1).split(",") if d) for m in _SHAPE.finditer(hlo_text)}


def _largest_vocab_arrays(fn, b, t, d, v, **kw):
    """Element counts of the arrays with a vocabulary-sized dim in the compiled loss+grad."""
    args = (
        jax.ShapeDtypeStruct((b, t, d), jnp.float32),
        jax.ShapeDtypeStruct((b, t, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((b, t), jnp.float32),
    )

    def f(hs, ht, w, m):
        return jax.value_and_grad(lambda a, c: fn(a, ht, c, m, **kw)[0], argnums=(0, 1))(hs, w)

    text = jax.jit(f).lower(*args).compile().as_text()
    shapes = _array_shapes(text)
    assert shapes, "could not parse the HLO"
    return [int(np.prod(s)) for s in shapes if v in s], max(int(np.prod(s)) for s in shapes)


def test_no_full_logits_array_in_compiled_program():
    b, t, d, v, tile = 4, 512, 32, 1000, 64  # N = 2048 tokens = 32 tiles
    n = b * t
    vocab_sized, largest = _largest_vocab_arrays(
        losses.divergence, b, t, d, v, tile=tile, vocab_tile=256
    )
    # Allowed: a tile of logits [B, tile/B, V], the head and its gradient [D, V].
    assert max(vocab_sized) <= max(tile, d) * v
    assert largest < n * v // 8  # nothing anywhere near [N, V] (e.g. stacked tiles)
    # The same check does flag the naive implementation.
    vocab_sized, _ = _largest_vocab_arrays(losses.naive_divergence, b, t, d, v)
    assert max(vocab_sized) >= n * v


def test_batch_sharded_matches_unsharded():
    devices = np.array(jax.devices())
    if len(devices) < 2:
        pytest.skip("needs several devices")
    mesh = jax.sharding.Mesh(devices, ("data",))
    nb = len(devices)
    k = jax.random.split(jax.random.key(9), 3)
    hs = jax.random.normal(k[0], (nb, 12, D))
    ht = jax.random.normal(k[1], (nb, 12, D))
    w = 0.5 * jax.random.normal(k[2], (D, V))
    mask = jnp.ones((nb, 12))
    row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sh = [jax.device_put(x, row) for x in (hs, ht, mask)]
    kw = dict(kind="jsd", beta=0.5, tile=4 * nb, vocab_tile=256)
    val, grads = _value_and_grads(losses.divergence, sh[0], sh[1], w, sh[2], **kw)
    ref, ref_grads = _value_and_grads(losses.divergence, hs, ht, w, mask, **kw)
    _assert_value_and_grads(val, grads, ref, ref_grads, _bounds(hs, ht, w, mask, kind="jsd", beta=0.5))


def test_bad_arguments_raise():
    hs, ht, w, mask, _ = _inputs()
    with pytest.raises(ValueError, match="unknown divergence kind"):
        losses.divergence(hs, ht, w, mask, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        losses.divergence(hs, ht, w, mask, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="mask shape"):
        losses.divergence(hs, ht, w, mask[:, :-1])
    with pytest.raises(ValueError, match="keep_fraction"):
        losses.select_tokens(mask, mask, 0.0)
