"""Layer pieces with hand-written or re-laid-out math vs plain jnp references: values and
gradients (the model-level parity tests check forward values against transformers)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ophsd_jax.models.transformer import attention, swiglu_mlp


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _naive_mlp(h, wg, wu, wd):
    return (jax.nn.silu(h @ wg) * (h @ wu)) @ wd


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_swiglu_mlp_value_and_grads_match_autodiff(dtype, tol):
    ks = jax.random.split(jax.random.key(0), 5)
    B, T, D, F = 2, 7, 16, 40
    args = [jax.random.normal(ks[0], (B, T, D)), jax.random.normal(ks[1], (D, F)) * 0.3,
            jax.random.normal(ks[2], (D, F)) * 0.3, jax.random.normal(ks[3], (F, D)) * 0.3]
    args = [a.astype(dtype) for a in args]
    cot = jax.random.normal(ks[4], (B, T, D)).astype(dtype)  # a non-uniform output cotangent

    def loss(f):
        return lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot.astype(jnp.float32))

    assert _rel_err(swiglu_mlp(*args).astype(jnp.float32), _naive_mlp(*args).astype(jnp.float32)) < tol
    ours = jax.grad(loss(swiglu_mlp), argnums=(0, 1, 2, 3))(*args)
    ref = jax.grad(loss(_naive_mlp), argnums=(0, 1, 2, 3))(*args)
    for name, a, b in zip(("h", "w_gate", "w_up", "w_down"), ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert _rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) < tol, name


def _naive_attention(q, k, v, mask):
    """Repeat kv heads to all query heads, one [T, S] score matrix per head."""
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    s = jnp.where(mask[:, None], s, -1e30)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


def test_grouped_attention_value_and_grads_match_naive():
    ks = jax.random.split(jax.random.key(1), 4)
    B, T, H, K, Dh = 2, 6, 6, 2, 8
    q = jax.random.normal(ks[0], (B, T, H, Dh))
    k = jax.random.normal(ks[1], (B, T, K, Dh))
    v = jax.random.normal(ks[2], (B, T, K, Dh))
    valid = jnp.array([[1] * T, [0, 0] + [1] * (T - 2)], bool)  # row 1 left-padded
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & valid[:, None, :]
    np.testing.assert_allclose(attention(q, k, v, mask), _naive_attention(q, k, v, mask), atol=1e-5)
    cot = jax.random.normal(ks[3], (B, T, H, Dh)) * valid[:, :, None, None]  # padded queries: no gradient
    f = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, mask) * cot)  # noqa: E731
    for a, b in zip(jax.grad(f(attention), (0, 1, 2))(q, k, v), jax.grad(f(_naive_attention), (0, 1, 2))(q, k, v)):
        assert _rel_err(a, b) < 1e-5


def test_causal_blocks_match_naive(monkeypatch):
    """Query blocks that see only keys up to their end: same outputs and gradients on
    every query row that has a key to attend to (T not a multiple of the block)."""
    from ophsd_jax.models import transformer

    monkeypatch.setattr(transformer, "CAUSAL_BLOCK", 4)
    ks = jax.random.split(jax.random.key(2), 4)
    B, T, H, K, Dh = 2, 11, 4, 2, 8
    q = jax.random.normal(ks[0], (B, T, H, Dh))
    k = jax.random.normal(ks[1], (B, T, K, Dh))
    v = jax.random.normal(ks[2], (B, T, K, Dh))
    valid = jnp.array([[1] * (T - 3) + [0] * 3, [0] * 5 + [1] * (T - 5)], bool)  # right- and left-padded
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & valid[:, None, :]
    live = mask.any(-1)[:, :, None, None]  # query rows with at least one key
    ours = attention(q, k, v, mask, causal=True)
    np.testing.assert_allclose(ours * live, _naive_attention(q, k, v, mask) * live, atol=1e-5)
    cot = jax.random.normal(ks[3], (B, T, H, Dh)) * live
    f = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, mask) * cot)  # noqa: E731
    blocked = jax.grad(f(lambda *a: attention(*a, causal=True)), (0, 1, 2))(q, k, v)
    for a, b in zip(blocked, jax.grad(f(_naive_attention), (0, 1, 2))(q, k, v)):
        assert _rel_err(a, b) < 1e-5
    # the blocks are really used: the first block's rows do not depend on later keys
    moved = attention(q, k.at[:, 4:].add(1.0), v, jnp.ones((B, T, T), bool), causal=True)
    np.testing.assert_array_equal(moved[:, :4], attention(q, k, v, jnp.ones((B, T, T), bool), causal=True)[:, :4])
