"""Tiled divergences vs. the naive full-logits reference and hand computations."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _assert_close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_value_and_grads_match_naive(kind, beta):
    hs, ht, w, mask, weights = _inputs()
    kw = dict(kind=kind, beta=beta, weights=weights)
    val, (g_h, g_w) = _value_and_grads(losses.divergence, hs, ht, w, mask, **kw, **TILING)
    ref, (r_h, r_w) = _value_and_grads(losses.naive_divergence, hs, ht, w, mask, **kw)
    assert float(ref) > 1e-3  # the comparison is not between two zeros
    _assert_close(val, ref)
    _assert_close(g_h, r_h)
    _assert_close(g_w, r_w)
    # Masked positions get no gradient.
    assert np.all(np.asarray(g_h)[np.asarray(mask) == 0] == 0)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3)])
def test_separate_teacher_head_and_aux_match_naive(kind, beta):
    hs, ht, w, mask, _ = _inputs(seed=1)
    w_teacher = w + 0.2 * jax.random.normal(jax.random.key(7), w.shape)
    kw = dict(kind=kind, beta=beta, teacher_lm_head=w_teacher)
    val, (g_h, g_w) = _value_and_grads(losses.divergence, hs, ht, w, mask, **kw, **TILING)
    ref, (r_h, r_w) = _value_and_grads(losses.naive_divergence, hs, ht, w, mask, **kw)
    _assert_close(val, ref)
    _assert_close(g_h, r_h)
    _assert_close(g_w, r_w)
    _, aux = losses.divergence(hs, ht, w, mask, **kw, **TILING)
    _, aux_ref = losses.naive_divergence(hs, ht, w, mask, **kw)
    assert set(aux) == set(aux_ref)
    for name in aux:
        assert aux[name].shape == ()
        _assert_close(aux[name], aux_ref[name])
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
    # ... and the limits of the rescaled interior values.
    eps = 1e-3
    np.testing.assert_allclose(_loss(hs, ht, w, mask, kind="jsd", beta=eps) / eps, fkl, rtol=1e-2)
    np.testing.assert_allclose(
        _loss(hs, ht, w, mask, kind="jsd", beta=1 - eps) / eps, rkl, rtol=1e-2
    )
    # JSD_0.5 is symmetric in (student, teacher) and bounded by log 2.
    j = _loss(hs, ht, w, mask, kind="jsd", beta=0.5)
    np.testing.assert_allclose(_loss(ht, hs, w, mask, kind="jsd", beta=0.5), j, rtol=1e-5)
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
    val, (g_h, g_w) = _value_and_grads(losses.divergence, hs, ht, w, mask, **kw, **TILING)
    np.testing.assert_allclose(float(val), expected, rtol=1e-5)
    ref, (r_h, r_w) = _value_and_grads(losses.naive_divergence, hs, ht, w, mask, **kw)
    _assert_close(val, ref)
    _assert_close(g_h, r_h)
    _assert_close(g_w, r_w)
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
    np.testing.assert_allclose(w, e / e.sum() * 4, rtol=1e-6)
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-6)
    # Padded dummy rows are excluded and get weight 0.
    valid = np.array([True, True, True, False])
    w = np.asarray(losses.reward_weights(r, beta_r=0.5, valid=valid))
    np.testing.assert_allclose(w[:3], e[:3] / e[:3].sum() * 3, rtol=1e-6)
    assert w[3] == 0.0


@pytest.mark.parametrize("alpha,gamma,top_k", [(1.0, 0.0, None), (0.5, 2.0, None), (1.0, 1.0, 7)])
def test_token_scores_match_numpy(alpha, gamma, top_k):
    hs, ht, w, mask, _ = _inputs(seed=6)
    s, t = _numpy_token_stats(hs, ht, w)
    logp = _log_softmax(s)
    ent = -(np.exp(logp) * logp).sum(-1)
    if top_k:
        idx = np.argsort(-t, axis=-1)[..., :top_k]
        jsd = _np_jsd(np.take_along_axis(s, idx, -1), np.take_along_axis(t, idx, -1))
    else:
        jsd = _np_jsd(s, t)
    m = np.asarray(mask, bool)
    expected = (ent / ent[m].max()) ** alpha * (jsd / jsd[m].max()) ** gamma * m
    got = losses.token_scores(
        hs, ht, w, mask, alpha=alpha, gamma=gamma, teacher_top_k=top_k, tile=16
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-6)


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
    val, (g_h, g_w) = _value_and_grads(
        losses.divergence, hs, ht, w, mask, kind="jsd", beta=0.5, weights=weights,
        keep_fraction=0.5, vocab_tile=256, **kw,
    )
    ref, (r_h, r_w) = _value_and_grads(
        losses.naive_divergence, hs, ht, w, mask * keep, kind="jsd", beta=0.5, weights=weights
    )
    _assert_close(val, ref)
    _assert_close(g_h, r_h)
    _assert_close(g_w, r_w)
    _, aux = losses.divergence(hs, ht, w, mask, keep_fraction=0.5, gamma=1.0, **TILING)
    assert float(aux["tokens_used"]) == float(keep.sum())
    assert float(aux["tokens"]) == float(mask.sum())


def test_bf16_inputs_and_compute_dtype():
    hs, ht, w, mask, _ = _inputs(seed=8)
    hs16, ht16, w16 = (x.astype(jnp.bfloat16) for x in (hs, ht, w))
    val, (g_h, g_w) = _value_and_grads(losses.divergence, hs16, ht16, w16, mask, **TILING)
    ref, (r_h, r_w) = _value_and_grads(losses.naive_divergence, hs16, ht16, w16, mask)
    assert g_h.dtype == jnp.bfloat16 and g_w.dtype == jnp.bfloat16
    _assert_close(val, ref, rtol=1e-4)  # same bf16 operands, fp32 softmax on both sides
    _assert_close(g_w.astype(jnp.float32), r_w.astype(jnp.float32), rtol=2e-2)
    # fp32 master head with bf16 matmuls: fp32 head gradient.
    val2, (_, g_w2) = _value_and_grads(
        losses.divergence, hs16, ht16, w, mask, compute_dtype=jnp.bfloat16, **TILING
    )
    assert g_w2.dtype == jnp.float32
    _assert_close(val2, ref, rtol=1e-4)


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
    val, (g_h, g_w) = _value_and_grads(losses.divergence, sh[0], sh[1], w, sh[2], **kw)
    ref, (r_h, r_w) = _value_and_grads(losses.divergence, hs, ht, w, mask, **kw)
    _assert_close(val, ref)
    _assert_close(g_h, r_h)
    _assert_close(g_w, r_w)


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
