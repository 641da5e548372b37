"""Token-level divergences over the full vocabulary, computed tile by tile.

The distillation loss compares the student distribution ``p_S`` and the teacher
distribution ``p_T`` at every response position. Both come from final hidden
states times the LM head, ``[tokens, D] @ [D, V]``. For Qwen3-8B sized runs
(V = 151,936, thousands of response tokens) a full ``[tokens, V]`` fp32 logits
array is tens of GB, and autodiff keeps several of them alive. So
:func:`divergence` scans over token tiles with a custom VJP whose backward pass
recomputes the logits block by block and applies the analytic gradient: the
forward pass holds ``[tile, V]`` logits at a time, the backward pass
``[tile, vocab_tile]``, and the head gradient is built one ``[D, vocab_tile]``
column block at a time, so there is no ``[tokens, V]`` array and no ``[D, V]``
scratch buffer.

Conventions (all per token; ``log`` is natural log; fp32 softmax math):

* ``reverse_kl``: ``KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)`` (default,
  mode seeking).
* ``forward_kl``: ``KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)``.
* ``jsd`` (generalised JSD, same convention as GKD and TRL's
  ``generalized_jsd_loss``): with the mixture ``M = beta * p_T + (1 - beta) * p_S``,
  ``JSD_beta = beta * KL(p_T || M) + (1 - beta) * KL(p_S || M)``.
  The endpoints are defined as the KLs, exactly:
  ``beta = 0`` is *forward* KL ``KL(p_T || p_S)`` and ``beta = 1`` is *reverse* KL
  ``KL(p_S || p_T)``. They are the limits of the rescaled interior values:
  ``JSD_beta / beta -> KL(p_T || p_S)`` as ``beta -> 0`` and
  ``JSD_beta / (1 - beta) -> KL(p_S || p_T)`` as ``beta -> 1`` (``JSD_beta``
  itself goes to 0 at both ends, so the endpoints are a jump, as in TRL).
  ``beta = 0.5`` is the symmetric Jensen-Shannon divergence.

Gradients flow to the student hidden states and the LM head through the
student logits only; the teacher logits are constants (``stop_gradient`` on the
teacher hidden states and on the head used for them).

Reduction: a token-mean over the batch,
``loss = sum_{b,t} w_b * m_{b,t} * min(div_{b,t}, clip) / sum_{b,t} m_{b,t}``, where
``m`` is the response mask (times the subsampling keep mask when subsampling)
and ``w_b`` are optional per-sample weights (e.g. :func:`reward_weights`, which
average to 1). The denominator does not include ``w``.

Token subsampling (optional): score each response token by normalised student
entropy and teacher/student JSD (:func:`token_scores`), then keep a fraction
of each row's tokens (:func:`select_tokens`): the top-scoring ones by default,
or a keyed sample proportional to the scores. This costs one extra forward
scan over the vocabulary.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

KINDS = ("reverse_kl", "forward_kl", "jsd")


# ---------------------------------------------------------------------------
# Per-token math on [..., V] fp32 logits.
# ---------------------------------------------------------------------------


def _resolve_kind(kind: str, beta: float) -> str:
    """Map the JSD endpoints onto the exact KLs (see module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KINDS}")
    if kind == "jsd":
        beta = float(beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            return "forward_kl"
        if beta == 1.0:
            return "reverse_kl"
    return kind


def _log_mixture(logp, logq, beta):
    """``log M - log p`` and ``log M - log q`` for ``M = beta q + (1 - beta) p``.

    Written with ``log1p(expm1(.))`` of the log-ratio so that identical
    distributions give exactly 0 (a plain ``logaddexp`` does not round-trip), and
    split on the sign of the log-ratio so ``expm1`` never overflows.
    """
    delta = logq - logp
    # Valid where delta <= 0: log M - log p = log(1 + beta (q/p - 1)).
    a = jnp.log1p(beta * jnp.expm1(jnp.minimum(delta, 0.0)))
    # Valid where delta >= 0: log M - log q = log(1 + (1 - beta) (p/q - 1)).
    b = jnp.log1p((1.0 - beta) * jnp.expm1(-jnp.maximum(delta, 0.0)))
    lm_p = jnp.where(delta <= 0, a, delta + b)
    lm_q = jnp.where(delta >= 0, b, a - delta)
    return lm_p, lm_q


def _token_stats(s_logits, t_logits, kind, beta):
    """Per-token statistics from full-vocabulary fp32 logits ``[..., V]``.

    Returns ``(div, c, lse_s, lse_t)``: the divergence, the per-token constant
    that the gradient formula of :func:`_logit_grad` needs (see there), and the
    two log-normalisers. The backward pass uses them to get exact gradients
    from one vocabulary block at a time.
    """
    lse_s = jax.nn.logsumexp(s_logits, axis=-1)
    lse_t = jax.nn.logsumexp(t_logits, axis=-1)
    logp = s_logits - lse_s[..., None]
    logq = t_logits - lse_t[..., None]
    p = jnp.exp(logp)
    if kind == "reverse_kl":
        div = jnp.sum(p * (logp - logq), axis=-1)
        c = div
    elif kind == "forward_kl":
        div = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
        c = jnp.zeros_like(div)
    else:  # interior JSD_beta
        lm_p, lm_q = _log_mixture(logp, logq, beta)
        div = -(beta * jnp.sum(jnp.exp(logq) * lm_q, axis=-1)
                + (1.0 - beta) * jnp.sum(p * lm_p, axis=-1))
        c = -jnp.sum(p * lm_p, axis=-1)
    return div, c, lse_s, lse_t


def _logit_grad(logp, logq, c, kind, beta):
    """d div / d student logits on any vocabulary slice, given per-token ``c``.

    * reverse KL: ``p (log p - log q - KL)`` with ``c = KL``;
    * forward KL: ``p - q``;
    * JSD_beta: ``d JSD / d p_v = (1 - beta) r_v`` with ``r = log p - log M``;
      through the softmax ``(1 - beta) p (r - sum_v p r)`` with ``c = sum_v p r``.

    Analytic rather than autodiff so that identical student and teacher logits
    give an exactly zero gradient (autodiff leaves ``p (1 - sum p)`` rounding).
    """
    p = jnp.exp(logp)
    if kind == "reverse_kl":
        return p * (logp - logq - c[..., None])
    if kind == "forward_kl":
        return p - jnp.exp(logq)
    lm_p, _ = _log_mixture(logp, logq, beta)
    return (1.0 - beta) * p * (-lm_p - c[..., None])


def _entropy(logits):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ---------------------------------------------------------------------------
# Tiling.
# ---------------------------------------------------------------------------


def _logits(h, w, compute_dtype, vocab_major=False):
    """fp32 logits from hidden ``[..., D]`` and head ``[D, V]``, or ``[V, D]`` when
    ``vocab_major`` (operands in compute dtype)."""
    dtype = compute_dtype or jnp.result_type(h, w)
    return jnp.einsum(
        "...d,vd->...v" if vocab_major else "...d,dv->...v", h.astype(dtype), w.astype(dtype),
        preferred_element_type=jnp.float32,
    )


def _tokens_per_tile(shape, tile):
    b, t = shape[:2]
    return max(1, min(t, tile // b))


def _to_chunks(x, tt):
    """``[B, T, ...]`` -> ``[T_pad / tt, B, tt, ...]``, zero-padding T."""
    b, t = x.shape[:2]
    n = -(-t // tt)
    x = jnp.pad(x, [(0, 0), (0, n * tt - t)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((b, n, tt) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_chunks(y, t):
    """``[n, B, tt, ...]`` -> ``[B, T, ...]`` (drops the padding)."""
    n, b, tt = y.shape[:3]
    return jnp.moveaxis(y, 0, 1).reshape((b, n * tt) + y.shape[3:])[:, :t]


def _scan_tiles(tile_fn: Callable, student_hidden, teacher_hidden, lm_head, teacher_lm_head,
                tile, compute_dtype=None, vocab_major=False):
    """Forward only: apply ``tile_fn(s_logits, t_logits) -> tuple of [B, tt]`` per tile.

    The scan runs over chunks of the sequence axis; each step sees a
    ``[B, tt, D]`` slab with ``tt = max(1, tile // B)``, i.e. about ``tile``
    tokens, and builds ``[B, tt, V]`` fp32 logits. Chunking T (not a flattened
    token axis) keeps the batch axis intact, so a batch-sharded input stays
    sharded inside the loop.
    """
    t = student_hidden.shape[1]
    tt = _tokens_per_tile(student_hidden.shape, tile)
    xs = (_to_chunks(student_hidden, tt), _to_chunks(teacher_hidden, tt))

    def step(carry, x):
        hs, ht = x
        s = _logits(hs, lm_head, compute_dtype, vocab_major)
        tl = _logits(ht, teacher_lm_head, compute_dtype, vocab_major)
        return carry, tile_fn(s, tl)

    _, ys = jax.lax.scan(step, None, xs)
    return tuple(_from_chunks(y, t) for y in ys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tiled_divergence(hs, w, ht, wt, cfg):
    """Per-token ``(divergence, student entropy, teacher entropy)``, each ``[B, T]``.

    ``cfg = (kind, beta, tile, vocab_tile, compute_dtype, vocab_major)``, static. Only the
    divergence is differentiable (w.r.t. ``hs`` and ``w``); the entropies are
    for logging (their cotangent is ignored; the caller stops their gradient).
    The teacher inputs ``ht``, ``wt`` get no gradient.
    """
    return _tiled_fwd(hs, w, ht, wt, cfg)[0]


def _tiled_fwd(hs, w, ht, wt, cfg):
    kind, beta, tile, _, compute_dtype, vocab_major = cfg

    def tile_fn(s, t):
        return (*_token_stats(s, t, kind, beta), _entropy(s), _entropy(t))

    div, c, lse_s, lse_t, ent_s, ent_t = _scan_tiles(tile_fn, hs, ht, w, wt, tile, compute_dtype, vocab_major)
    # Residuals: the inputs and [B, T] per-token stats, no [tokens, V] arrays.
    return (div, ent_s, ent_t), (hs, w, ht, wt, c, lse_s, lse_t)


def _tiled_bwd(cfg, res, cts):
    """Recompute logits one ``[B, tt, vocab_tile]`` block at a time.

    Outer loop over vocabulary blocks, inner loop over token tiles: each head
    gradient block ``[D, vocab_tile]`` (``[vocab_tile, D]`` for a vocab-major
    head) is summed over all tokens in an fp32 accumulator and written once, so
    the head gradient needs no ``[D, V]`` scratch buffer (not even for a bf16
    head). The hidden-state gradient is summed over vocabulary blocks in an fp32
    ``[B, T, D]`` buffer.
    """
    kind, beta, tile, vocab_tile, compute_dtype, vocab_major = cfg
    hs, w, ht, wt, c, lse_s, lse_t = res
    g = cts[0].astype(jnp.float32)
    vaxis = 0 if vocab_major else 1
    t, d, v = hs.shape[1], hs.shape[2], w.shape[vaxis]
    head = "vd" if vocab_major else "dv"
    tt = _tokens_per_tile(hs.shape, tile)
    dtype = compute_dtype or jnp.result_type(hs, w)
    xs = tuple(_to_chunks(x, tt) for x in (hs, ht, g, c, lse_s, lse_t))
    vc = min(vocab_tile, v)

    def vocab_step(carry, j):
        dh, dw = carry
        # The last block is shifted left to stay in range. Its columns that the
        # previous block covered are rewritten in dw with the same values, and
        # masked out of dh so they are not added twice.
        start = jnp.minimum(j * vc, v - vc)
        fresh = start + jnp.arange(vc) >= j * vc
        w_j = jax.lax.dynamic_slice_in_dim(w, start, vc, axis=vaxis)
        wt_j = jax.lax.dynamic_slice_in_dim(wt, start, vc, axis=vaxis)

        def token_step(inner, x):
            dw_j, dh = inner
            i, (hs_i, ht_i, g_i, c_i, lse_s_i, lse_t_i) = x
            logp = _logits(hs_i, w_j, compute_dtype, vocab_major) - lse_s_i[..., None]
            logq = _logits(ht_i, wt_j, compute_dtype, vocab_major) - lse_t_i[..., None]
            ds = (g_i[..., None] * _logit_grad(logp, logq, c_i, kind, beta)).astype(dtype)
            dw_j = dw_j + jnp.einsum(f"btd,btv->{head}", hs_i.astype(dtype), ds,
                                     preferred_element_type=jnp.float32)
            dh_i = jnp.einsum(f"btv,{head}->btd", jnp.where(fresh, ds, 0), w_j.astype(dtype),
                              preferred_element_type=jnp.float32)
            return (dw_j, dh.at[i].add(dh_i)), None

        dw_j = jnp.zeros((vc, d) if vocab_major else (d, vc), jnp.float32)
        (dw_j, dh), _ = jax.lax.scan(token_step, (dw_j, dh), (jnp.arange(len(xs[0])), xs))
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_j.astype(w.dtype), start, axis=vaxis)
        return (dh, dw), None

    dh0 = jnp.zeros(xs[0].shape, jnp.float32)
    (dh, dw), _ = jax.lax.scan(vocab_step, (dh0, jnp.zeros_like(w)), jnp.arange(-(-v // vc)))
    return _from_chunks(dh, t).astype(hs.dtype), dw, None, None


_tiled_divergence.defvjp(_tiled_fwd, _tiled_bwd)


# ---------------------------------------------------------------------------
# Token subsampling.
# ---------------------------------------------------------------------------


def _topk_jsd(s_logits, t_logits, k):
    """Symmetric JSD restricted to the teacher's top-k tokens (both renormalised)."""
    t_top, idx = jax.lax.top_k(t_logits, k)
    s_top = jnp.take_along_axis(s_logits, idx, axis=-1)
    return _token_stats(s_top, t_top, "jsd", 0.5)[0]


def token_scores(
    student_hidden,
    teacher_hidden,
    lm_head,
    mask,
    *,
    alpha: float = 1.0,
    gamma: float = 0.0,
    teacher_top_k: int | None = None,
    teacher_lm_head=None,
    tile: int = 256,
    compute_dtype=None,
    vocab_major: bool = False,
):
    """Subsampling weights ``(H_S / max H_S)^alpha * (JSD / max JSD)^gamma``, ``[B, T]``.

    ``H_S`` is the student entropy and ``JSD`` the symmetric ``JSD_0.5`` between
    student and teacher at each token; both are normalised by their maximum over
    the masked tokens of the batch. With ``teacher_top_k`` the JSD is computed on
    the teacher's top-k tokens only (both distributions renormalised on that
    set). No gradient flows through the scores. Masked-out tokens score 0.
    """
    teacher_lm_head = lm_head if teacher_lm_head is None else teacher_lm_head
    student_hidden, teacher_hidden, lm_head, teacher_lm_head = jax.lax.stop_gradient(
        (student_hidden, teacher_hidden, lm_head, teacher_lm_head)
    )

    def tile_fn(s, t):
        if teacher_top_k:
            jsd = _topk_jsd(s, t, int(teacher_top_k))
        else:
            jsd = _token_stats(s, t, "jsd", 0.5)[0]
        return _entropy(s), jsd

    ent, jsd = _scan_tiles(
        tile_fn, student_hidden, teacher_hidden, lm_head, teacher_lm_head, tile, compute_dtype,
        vocab_major,
    )
    valid = mask > 0

    def normalised(x):
        x = jnp.where(valid, jnp.maximum(x, 0.0), 0.0)  # rounding can give -1e-9
        return x / jnp.maximum(jnp.max(x), 1e-30)

    score = jnp.power(normalised(ent), alpha) * jnp.power(normalised(jsd), gamma)
    return jnp.where(valid, score, 0.0)


def select_tokens(scores, mask, keep_fraction: float, key=None):
    """Keep ``ceil(keep_fraction * n_b)`` of the ``n_b`` response tokens of each row.

    ``key=None``: deterministic, the highest-score tokens (ties go to the
    earlier position). With a ``jax.random`` key: a sample without replacement
    with probabilities proportional to the scores (Gumbel top-k), deterministic
    given the key. Returns a float ``[B, T]`` 0/1 keep mask (subset of ``mask``).
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    valid = mask > 0
    if key is None:
        rank_key = scores.astype(jnp.float32)
    else:
        gumbel = jax.random.gumbel(key, scores.shape, jnp.float32)
        # Zero-score tokens get a very low but finite key: they are picked only
        # when a row has fewer positive-score tokens than it must keep.
        rank_key = jnp.log(jnp.maximum(scores.astype(jnp.float32), 1e-30)) + gumbel
    rank_key = jnp.where(valid, rank_key, -jnp.inf)
    order = jnp.argsort(-rank_key, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)  # position -> rank in its row
    n_valid = jnp.sum(valid, axis=-1, keepdims=True)
    n_keep = jnp.ceil(keep_fraction * n_valid - 1e-6)  # guard against 0.3 * 10 = 3.0000000001
    return jnp.where(valid & (rank < n_keep), 1.0, 0.0)


# ---------------------------------------------------------------------------
# Public losses.
# ---------------------------------------------------------------------------


def reward_weights(rewards, beta_r: float, valid=None):
    """Per-sample weights ``softmax(rewards / beta_r) * n`` (they average to 1).

    ``valid`` (optional ``[B]`` bool) excludes padded dummy rows: they get
    weight 0 and ``n`` counts valid rows only.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if valid is None:
        valid = jnp.ones(rewards.shape, bool)
    valid = jnp.asarray(valid, bool)
    logits = jnp.where(valid, rewards / beta_r, -jnp.inf)
    w = jax.nn.softmax(logits) * jnp.sum(valid)
    return jnp.where(valid, w, 0.0)


def clip_per_token(div, clip: float | None):
    """Per-token clip ``min(div, clip)``; clipped tokens get zero gradient."""
    return div if clip is None else jnp.minimum(div, clip)


def _reduce(div, ent_s, ent_t, mask, used, weights, clip):
    """Masked token-mean loss and scalar logging stats."""
    mask = mask.astype(jnp.float32)
    token_w = used if weights is None else used * weights.astype(jnp.float32)[:, None]
    denom = jnp.maximum(jnp.sum(used), 1.0)
    loss = jnp.sum(token_w * clip_per_token(div, clip)) / denom
    n_mask = jnp.maximum(jnp.sum(mask), 1.0)
    div_sg = jax.lax.stop_gradient(div)
    clipped = 0.0 if clip is None else jnp.sum(used * (div_sg > clip)) / denom
    aux = {
        "tokens": jnp.sum(mask),
        "tokens_used": jnp.sum(used),
        "student_entropy": jnp.sum(mask * ent_s) / n_mask,
        "teacher_entropy": jnp.sum(mask * ent_t) / n_mask,
        "divergence_mean": jnp.sum(mask * div_sg) / n_mask,
        "divergence_max": jnp.max(jnp.where(mask > 0, div_sg, 0.0)),
        "clip_fraction": jnp.asarray(clipped, jnp.float32),
    }
    return loss, jax.lax.stop_gradient(aux)


def divergence(
    student_hidden,
    teacher_hidden,
    lm_head,
    mask,
    *,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    tile: int = 256,
    vocab_tile: int = 4096,
    weights=None,
    clip: float | None = None,
    teacher_lm_head=None,
    compute_dtype=None,
    keep_fraction: float | None = None,
    alpha: float = 1.0,
    gamma: float = 0.0,
    teacher_top_k: int | None = None,
    subsample_key=None,
    vocab_major: bool = False,
):
    """Exact full-vocabulary divergence, tiled over tokens. Returns ``(loss, aux)``.

    Args:
      student_hidden, teacher_hidden: ``[B, T, D]`` final (post-norm) hidden
        states at the positions that predict the response tokens, aligned.
      lm_head: ``[D, V]`` head for the student logits (gets gradient); ``[V, D]``
        with ``vocab_major`` (a tied embedding as stored: transposing it would
        cost a ``[D, V]`` copy, and another for its gradient).
      mask: ``[B, T]``, nonzero at response positions.
      kind, beta: ``"reverse_kl"`` | ``"forward_kl"`` | ``"jsd"`` with ``beta``
        in [0, 1] (static Python float); see the module docstring.
      tile: about how many tokens' logits exist at once (``[B, tile // B, V]``).
      vocab_tile: column block of the in-place head-gradient update.
      weights: optional ``[B]`` per-sample weights.
      clip: optional per-token divergence cap.
      teacher_lm_head: the teacher's head, same layout (e.g. frozen initial
        weights); defaults to ``lm_head``. Never gets gradient.
      compute_dtype: dtype of the matmul operands (e.g. ``jnp.bfloat16`` with
        fp32 master weights); default: promote hidden and head dtypes. Softmax
        math is always fp32 and the head gradient is accumulated in fp32.
      keep_fraction, alpha, gamma, teacher_top_k, subsample_key: optional
        token subsampling (see :func:`token_scores`, :func:`select_tokens`);
        the loss is then the mean over the kept tokens.

    ``aux`` holds scalar logging stats: ``tokens`` (response tokens),
    ``tokens_used`` (after subsampling), ``student_entropy`` and
    ``teacher_entropy`` (masked means), ``divergence_mean``/``divergence_max``
    (unclipped, over response tokens) and ``clip_fraction``.
    """
    kb = (_resolve_kind(kind, beta), float(beta))
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden shapes differ: {student_hidden.shape} vs {teacher_hidden.shape}")
    if mask.shape != student_hidden.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} != {student_hidden.shape[:2]}")
    t_head = jax.lax.stop_gradient(lm_head if teacher_lm_head is None else teacher_lm_head)
    t_hidden = jax.lax.stop_gradient(teacher_hidden)
    mask = mask.astype(jnp.float32)

    used = mask
    if keep_fraction is not None and keep_fraction < 1.0:
        scores = token_scores(
            student_hidden, t_hidden, lm_head, mask, alpha=alpha, gamma=gamma,
            teacher_top_k=teacher_top_k, teacher_lm_head=t_head, tile=tile,
            compute_dtype=compute_dtype, vocab_major=vocab_major,
        )
        used = mask * select_tokens(scores, mask, keep_fraction, subsample_key)

    cdt = None if compute_dtype is None else jnp.dtype(compute_dtype)
    cfg = (*kb, int(tile), int(vocab_tile), cdt, bool(vocab_major))
    div, ent_s, ent_t = _tiled_divergence(student_hidden, lm_head, t_hidden, t_head, cfg)
    ent_s, ent_t = jax.lax.stop_gradient((ent_s, ent_t))
    return _reduce(div, ent_s, ent_t, mask, used, weights, clip)


def naive_divergence(
    student_hidden,
    teacher_hidden,
    lm_head,
    mask,
    *,
    kind: str = "reverse_kl",
    beta: float = 0.5,
    weights=None,
    clip: float | None = None,
    teacher_lm_head=None,
):
    """Reference: the textbook formulas on the full ``[B, T, V]`` logits, plain autodiff.

    Independent of the tiled code path (no custom VJP, TRL-style
    ``logaddexp`` mixture). Used by the tests and the memory benchmark. Same
    reduction as :func:`divergence`; subsampling is expressed by passing the
    keep mask as ``mask``.
    """
    kind = _resolve_kind(kind, beta)
    t_head = jax.lax.stop_gradient(lm_head if teacher_lm_head is None else teacher_lm_head)
    s = _logits(student_hidden, lm_head, None)
    t = _logits(jax.lax.stop_gradient(teacher_hidden), t_head, None)
    logp = jax.nn.log_softmax(s, axis=-1)
    logq = jax.nn.log_softmax(t, axis=-1)
    p, q = jnp.exp(logp), jnp.exp(logq)
    if kind == "reverse_kl":
        div = jnp.sum(p * (logp - logq), axis=-1)
    elif kind == "forward_kl":
        div = jnp.sum(q * (logq - logp), axis=-1)
    else:
        logm = jnp.logaddexp(logp + math.log(1.0 - beta), logq + math.log(beta))
        div = beta * jnp.sum(q * (logq - logm), axis=-1) + (1.0 - beta) * jnp.sum(
            p * (logp - logm), axis=-1
        )
    ent_s = -jnp.sum(jax.lax.stop_gradient(p * logp), axis=-1)
    ent_t = -jnp.sum(q * logq, axis=-1)
    mask = mask.astype(jnp.float32)
    return _reduce(div, ent_s, ent_t, mask, mask, weights, clip)
