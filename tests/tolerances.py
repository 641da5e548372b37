"""Tolerances for comparisons that involve floating-point rounding, derived from the computation.

XLA:CPU chooses its kernels (vector width, blocking, fusion) per CPU model and per array
shape, so the order in which fp32 sums accumulate, and with it the last bits of a result,
differs between machines, and between a full batch and its micro-batches, or a sharded
and an unsharded program. A tolerance must bound the rounding error of *any* order, not
the error seen on one machine. Two standard models are used:

* Worst case (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., 2002,
  Lemma 3.1 and eq. (4.4)): a sum of n terms, in any order and blocking, is within
  ``gamma(n) * sum(|x_i|)`` of the exact sum, ``gamma(n) = n*u / (1 - n*u)``, with u the
  unit roundoff (2**-24 for fp32). Used for single, short reductions.

* Probabilistic (Higham & Mary, "A new approach to probabilistic rounding error analysis",
  SIAM J. Sci. Comput. 41(5), 2019, Theorem 3.1): if the rounding errors are independent
  with mean zero, the error is at most ``lam * sqrt(n) * u * sum(|x_i|)`` with probability at
  least ``1 - 2*exp(-lam**2 / 2)``; with lam = 7 that is 1 - 5e-11. Used for long chains (a
  decoder forward, a train step), where the worst case grows like n and would be too loose
  to catch real bugs. First order: the errors of successive reductions add (a chain of
  reductions of n_1, n_2, ... terms counts as one of n_1 + n_2 + ... terms), each relative
  to the magnitude of what it computes.

Two fp32 computations of the same exact value are each within the bound of it, so they are
within twice the bound of each other (``pair``).
"""

from __future__ import annotations

import math

import numpy as np

U32 = 2.0**-24  # unit roundoff of float32 (half its machine epsilon)
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
LAMBDA = 7.0  # confidence of the probabilistic bound: fails with probability < 2*exp(-24.5) = 5e-11


def gamma(n: int, u: float = U32) -> float:
    """Worst-case relative error bound of a sum or dot product of n terms (any order)."""
    assert n * u < 1
    return n * u / (1 - n * u)


def prob(n: int, u: float = U32) -> float:
    """Probabilistic relative error bound of a chain of reductions with n terms in all."""
    return LAMBDA * math.sqrt(n) * u


def pair(bound: float) -> float:
    """Two computations, each within `bound` of the exact value, differ by at most this."""
    return 2 * bound


# ---- the decoder --------------------------------------------------------------------------


def decoder_terms(cfg, seq_len: int) -> int:
    """Accumulated terms along the computation of one logit by the decoder: per layer two
    RMSNorms (D each), the q/k/v projections (D), the scores (head_dim), the attention
    average (seq_len), the output projection (heads x head_dim), the gate/up projections (D)
    and the down projection (intermediate size); then the final norm (D) and the head (D)."""
    d, f, h, dh = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
    per_layer = 2 * d + d + dh + seq_len + h * dh + d + f
    return cfg.num_layers * per_layer + 2 * d


def logit_scale(final_norm, head) -> float:
    """A bound on |logit| and on the sum of |terms| of the head's dot products: the final
    RMSNorm output h has norm <= sqrt(D) * max|norm weight|, so by Cauchy-Schwarz
    sum_d |h_d W_dv| <= sqrt(D) * max|norm weight| * max_v ||W[:, v]||. Errors of earlier
    layers reach the logits as a relative error of h, scaled by the same quantity."""
    final_norm, head = np.asarray(final_norm, np.float64), np.asarray(head, np.float64)  # head: [D, V]
    d = head.shape[0]
    return float(math.sqrt(d) * np.abs(final_norm).max() * np.linalg.norm(head, axis=0).max())


def model_logit_scale(graphdef, params) -> float:
    """`logit_scale` of a model's final norm and (tied or untied) head."""
    import jax

    from ophsd_jax.models import state as S

    final_norm = S.flat_names(params)["final_norm"].get_value()
    return logit_scale(jax.device_get(final_norm), jax.device_get(S.lm_head(graphdef, params)))


def logits_atol(cfg, graphdef, params, seq_len: int, extra_terms: int = 0) -> float:
    """Two fp32 decoder forwards of the same inputs (ours and transformers', sharded and not,
    scanned and unrolled) give logits within this of each other; `extra_terms`: sums one of
    them adds along the path (e.g. LoRA's low-rank products)."""
    return pair(prob(decoder_terms(cfg, seq_len) + extra_terms) * model_logit_scale(graphdef, params))


def log_softmax_atol(logits_tol: float, vocab: int) -> float:
    """Two computations of log_softmax(z) = z - logsumexp(z) from logits that differ by at most
    `logits_tol`: that moves each log-probability by at most twice as much (z_v and the
    log-sum-exp, which is 1-Lipschitz in the max norm); each side's log-sum-exp of V positive
    terms adds a relative error prob(V) to the sum, an absolute one to its log."""
    return 2 * logits_tol + pair(prob(vocab + 2))


# ---- divergences -------------------------------------------------------------------------


def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reverse_kl(student_logits, teacher_logits, mask, weights=None) -> float:
    """The token-mean reverse KL of these logits, in float64 (what the train step's loss
    computes; `weights` per row, the mean over the mask's tokens)."""
    ls, lt = log_softmax(np.asarray(student_logits, np.float64)), log_softmax(np.asarray(teacher_logits, np.float64))
    kl = (np.exp(ls) * (ls - lt)).sum(-1)
    m = np.asarray(mask, bool)
    w = np.ones(m.shape[0]) if weights is None else np.asarray(weights, np.float64)
    return float((w[:, None] * kl)[m].sum() / m.sum())


def divergence_atol(student_logits, teacher_logits, mask, logits_err: float, weights=None) -> float:
    """Bound on the fp32 rounding error of the token-mean reverse KL(p_s || p_t) computed from
    these logits, whose own error is at most `logits_err` per element (one computation).

    Per token, with d = log p_s - log p_t (float64 here, from the given logits):
    * the two log-sum-exps over V positive terms: prob(V + 2) each, absolute;
    * each log-probability, rounded at most 3 times: 3u * |log p|, weighted by p_s, i.e.
      3u * (H(p_s) + CE(p_s, p_t));
    * the V-term expectation of d itself: prob(V) * E|d|;
    * the logits' own error, through the first-order sensitivity of the KL:
      |dKL| <= e * (||p_s * (d - KL)||_1 + ||p_s - p_t||_1);
    * the token mean: prob(N) relative.
    """
    s, t = np.asarray(student_logits, np.float64), np.asarray(teacher_logits, np.float64)
    m = np.asarray(mask, bool)
    w = np.ones(m.shape[0]) if weights is None else np.asarray(weights, np.float64)
    ls, lt = log_softmax(s), log_softmax(t)
    ps, pt = np.exp(ls), np.exp(lt)
    d = ls - lt
    kl = (ps * d).sum(-1)
    vocab = s.shape[-1]
    h_plus_ce = -(ps * (ls + lt)).sum(-1)
    sens = np.abs(ps * (d - kl[..., None])).sum(-1) + np.abs(ps - pt).sum(-1)
    per_token = (2 * prob(vocab + 2) + 3 * U32 * h_plus_ce + prob(vocab) * (ps * np.abs(d)).sum(-1)
                 + logits_err * sens)
    mean_error = float((w[:, None] * per_token)[m].sum() / m.sum())
    return mean_error + prob(int(m.sum())) * abs(reverse_kl(s, t, m, w))


def divergence_grad_rtol(student_logits, teacher_logits, mask, logits_err: float, weights=None) -> float:
    """Bound on the relative fp32 error (L2) of the reverse KL's cotangent w.r.t. the student
    logits, c = w * p_s * (d - KL) / N per token, computed from these logits (first order).

    An error e of each logit moves each d_v = log p_s,v - log p_t,v by at most 4e (each
    log-probability by 2e, see `log_softmax_atol`); rounding adds 3u * (|log p_s| + |log p_t|)
    and the two log-sum-exps 2 * prob(V). Then |dc_v| <= p_s,v * (|dd_v| + |dKL| + |d_v - KL| * |dd_v|)
    (the last from p_s's own change). The backward pass maps c linearly to the parameter
    gradient; for a generic error direction that keeps the relative error (an assumption:
    the worst case is the map's condition number), plus its own chain of reductions.
    """
    s, t = np.asarray(student_logits, np.float64), np.asarray(teacher_logits, np.float64)
    m = np.asarray(mask, bool)
    w = np.ones(m.shape[0]) if weights is None else np.asarray(weights, np.float64)
    ls, lt = log_softmax(s), log_softmax(t)
    ps = np.exp(ls)
    d = ls - lt
    kl = (ps * d).sum(-1, keepdims=True)
    dd = 4 * logits_err + 3 * U32 * (np.abs(ls) + np.abs(lt)) + 2 * prob(s.shape[-1] + 2)
    dkl = (ps * dd).sum(-1, keepdims=True)
    c = (w[:, None, None] * ps * (d - kl))[m]
    dc = (w[:, None, None] * ps * (dd + dkl + np.abs(d - kl) * dd))[m]
    return float(np.linalg.norm(dc) / np.linalg.norm(c))
