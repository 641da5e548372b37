"""Layer pieces with hand-written or re-laid-out math vs plain jnp references: values and
gradients (the model-level parity tests check forward values against transformers)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances as tol
from ophsd_jax.models import attention as attn
from ophsd_jax.models.cpu import swiglu_mlp


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _naive_mlp(h, wg, wu, wd):
    return (jax.nn.silu(h @ wg) * (h @ wu)) @ wd


# Relative to the largest entry, two evaluations in another order. fp32: the chain of sums
# of the forward (gate/up over D, down over F) and the backward (the same, plus the weight
# gradients' sum over the B*T tokens). bf16: each value on the path (gate, up, their
# activation product, the output; the cotangents back) is rounded to bf16 once, U_BF16
# relative, 5 roundings a side.
_B, _T, _D, _F = 2, 7, 16, 40
MLP_TOL = {jnp.float32: tol.pair(tol.prob(2 * (2 * _D + _F) + _B * _T)), jnp.bfloat16: tol.pair(5 * tol.U_BF16)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_mlp_value_and_grads_match_autodiff(dtype):
    ks = jax.random.split(jax.random.key(0), 5)
    B, T, D, F = _B, _T, _D, _F
    bound = MLP_TOL[dtype]
    args = [jax.random.normal(ks[0], (B, T, D)), jax.random.normal(ks[1], (D, F)) * 0.3,
            jax.random.normal(ks[2], (D, F)) * 0.3, jax.random.normal(ks[3], (F, D)) * 0.3]
    args = [a.astype(dtype) for a in args]
    cot = jax.random.normal(ks[4], (B, T, D)).astype(dtype)  # a non-uniform output cotangent

    def loss(f):
        return lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cot.astype(jnp.float32))

    assert _rel_err(swiglu_mlp(*args).astype(jnp.float32), _naive_mlp(*args).astype(jnp.float32)) < bound
    ours = jax.grad(loss(swiglu_mlp), argnums=(0, 1, 2, 3))(*args)
    ref = jax.grad(loss(_naive_mlp), argnums=(0, 1, 2, 3))(*args)
    for name, a, b in zip(("h", "w_gate", "w_up", "w_down"), ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert _rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) < bound, name


def _naive_attention(q, k, v, mask):
    """Repeat kv heads to all query heads, one [T, S] score matrix per head."""
    G = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    s = jnp.where(mask[:, None], s, -1e30)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


def _case(seed, B, T, H, K, Dh, valid):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, Dh))
    k = jax.random.normal(ks[1], (B, T, K, Dh))
    v = jax.random.normal(ks[2], (B, T, K, Dh))
    valid = jnp.asarray(valid, bool)
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & valid[:, None, :]
    live = mask.any(-1)[:, :, None, None] & valid[:, :, None, None]  # real query rows (outputs that are read)
    cot = jax.random.normal(ks[3], (B, T, H, Dh)) * live
    return q, k, v, valid, mask, live, cot


def _attention_atol(q, k, v):
    """Worst case, first order, two evaluations: the scores q.k / sqrt(Dh) are Dh-term dot
    products, off by gamma(Dh) sum_d |q_d k_d| / sqrt(Dh); that moves each probability by at
    most twice as much relative (softmax is 2-Lipschitz in log space), the normaliser adds
    gamma(T), and the output, a convex combination of v (terms bounded by max |v|), gamma(T)."""
    G = q.shape[2] // k.shape[2]
    kk = np.repeat(np.abs(np.asarray(k, np.float64)), G, axis=2)
    abs_scores = np.einsum("bthd,bshd->bhts", np.abs(np.asarray(q, np.float64)), kk) / math.sqrt(q.shape[-1])
    score_err = tol.gamma(q.shape[-1]) * float(abs_scores.max())
    T = q.shape[1]
    return tol.pair((2 * score_err + 2 * tol.gamma(T + 1)) * float(np.abs(np.asarray(v)).max()))


def _attention_grad_rtol(q, k):
    """Gradients relative to their largest entry, two evaluations: the chain of the forward
    (scores over Dh, normaliser and average over T) and the backward (dp over Dh, the softmax's
    sum over T, dq over T, dk/dv over the T queries of the G heads that share a kv head)."""
    T, Dh, G = q.shape[1], q.shape[-1], q.shape[2] // k.shape[2]
    return tol.pair(tol.prob(2 * Dh + 4 * T + G * T))


def test_grouped_attention_value_and_grads_match_naive():
    B, T, H, K, Dh = 2, 6, 6, 2, 8
    q, k, v, valid, mask, live, cot = _case(1, B, T, H, K, Dh, [[1] * T, [0, 0] + [1] * (T - 2)])
    np.testing.assert_allclose(grouped(q, k, v, mask), _naive_attention(q, k, v, mask), rtol=0,
                               atol=_attention_atol(q, k, v))
    f = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, mask) * cot)  # noqa: E731
    for a, b in zip(jax.grad(f(grouped), (0, 1, 2))(q, k, v), jax.grad(f(_naive_attention), (0, 1, 2))(q, k, v)):
        assert _rel_err(a, b) < _attention_grad_rtol(q, k)


def grouped(q, k, v, mask):
    return attn.grouped_attention(q, *(jnp.swapaxes(x, 1, 2) for x in (k, v)), mask)


# right- and left-padded rows, T not a multiple of the blocks, GQA (4 query heads per kv head)
PADDED = [[1] * 8 + [0] * 3, [0] * 5 + [1] * 6]


@pytest.mark.parametrize("impl,block", [("dense", 4), ("blockwise", 4), ("blockwise", 8), ("blockwise", 16)])
def test_causal_attention_matches_naive(impl, block, monkeypatch):
    """Every implementation the CPU runs: same outputs and gradients as the naive
    [T, S] softmax on every real query row (padding rows are never read)."""
    monkeypatch.setattr(attn, "CAUSAL_BLOCK", block)
    monkeypatch.setattr(attn, "BLOCK", block)
    B, T, H, K, Dh = 2, 11, 8, 2, 8
    q, k, v, valid, mask, live, cot = _case(2, B, T, H, K, Dh, PADDED)
    ours = attn.attention(q, k, v, valid, impl=impl)
    assert np.isfinite(np.asarray(ours)).all()
    np.testing.assert_allclose(ours * live, _naive_attention(q, k, v, mask) * live, rtol=0,
                               atol=_attention_atol(q, k, v))
    f = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * cot)  # noqa: E731
    got = jax.grad(f(lambda q, k, v: attn.attention(q, k, v, valid, impl=impl)), (0, 1, 2))(q, k, v)
    ref = jax.grad(f(lambda q, k, v: _naive_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, ref):
        assert np.isfinite(np.asarray(a)).all(), name
        assert _rel_err(a, b) < _attention_grad_rtol(q, k), name


@pytest.mark.parametrize("Dh", [16, 128])  # fp32: 128 / 64-row blocks; 128 x fp32: 64 / 32
def test_pallas_gpu_kernel_matches_naive_in_the_interpreter(Dh):
    """The GPU Triton kernel at the block sizes `pallas_gpu_blocks` picks, run by Pallas's
    interpreter on CPU: outputs and gradients of the real query rows against the naive softmax.
    (The kernel's shared-memory use, which decides those sizes, needs a GPU: see its docstring.)"""
    B, T, H, K = 2, 128, 4, 2
    q, k, v, valid, mask, live, cot = _case(4, B, T, H, K, Dh, [[1] * 100 + [0] * 28, [0] * 37 + [1] * 91])
    fwd, bwd = attn.pallas_gpu_blocks(T, Dh, 4)
    assert (fwd, bwd) == ((128, 64) if Dh == 16 else (64, 32))
    kernel = lambda q, k, v: attn._pallas_gpu(q, k, v, valid, interpret=True)  # noqa: E731
    np.testing.assert_allclose(kernel(q, k, v) * live, _naive_attention(q, k, v, mask) * live, rtol=0,
                               atol=_attention_atol(q, k, v))
    f = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * cot)  # noqa: E731
    got = jax.grad(f(kernel), (0, 1, 2))(q, k, v)
    ref = jax.grad(f(lambda q, k, v: _naive_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, ref):
        assert _rel_err(a, b) < _attention_grad_rtol(q, k), name


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_causal_blocks_are_used(impl, monkeypatch):
    """The first block's rows do not depend on later keys, and a block past the causal
    diagonal is not computed: changing later keys leaves the first rows bit-identical."""
    monkeypatch.setattr(attn, "CAUSAL_BLOCK", 4)
    monkeypatch.setattr(attn, "BLOCK", 4)
    B, T, H, K, Dh = 2, 12, 4, 2, 8
    q, k, v, valid, *_ = _case(3, B, T, H, K, Dh, [[1] * T] * B)
    base = attn.attention(q, k, v, valid, impl=impl)
    moved = attn.attention(q, k.at[:, 4:].add(1.0), v.at[:, 4:].add(1.0), valid, impl=impl)
    np.testing.assert_array_equal(moved[:, :4], base[:, :4])
    assert not np.allclose(moved[:, 4:], base[:, 4:])


def test_blockwise_compiles_one_block_whatever_the_length():
    """Compile size does not grow with T: the lowered program of 4x the length has (about)
    the same number of dot operations."""
    def dots(T):
        q, k, v, valid, *_ = _case(4, 1, T, 4, 2, 8, [[1] * T])
        loss = lambda q, k, v: jnp.sum(attn.blockwise(q, k, v, valid, block=64))  # noqa: E731
        return jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).as_text().count("dot_general")
    assert dots(1024) == dots(256)


def test_auto_picks_by_backend():
    assert attn.resolve("auto", "tpu", 12288) == "splash"
    assert attn.resolve("auto", "gpu", 12288) == "pallas_gpu"
    assert attn.resolve("auto", "cpu", 1024) == "dense"
    assert attn.resolve("auto", "cpu", 12288) == "blockwise"
    # a batch-32 prefill of 4k tokens (9 heads): the dense scores would need ~19 GiB
    assert attn.resolve("auto", "cpu", 4096, score_bytes=4 * 32 * 9 * 4096 * 4096) == "blockwise"
    assert attn.resolve("auto", "cpu", 1024, score_bytes=4 * 4 * 9 * 1024 * 1024) == "dense"
    with pytest.raises(ValueError, match="attention implementation"):
        attn.resolve("flash", "cpu", 8)
