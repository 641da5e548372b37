"""Causal self-attention for training and prefill, behind one function.

    attention(q, k, v, valid, impl=...)  # q: [B,T,H,Dh]; k, v: [B,T,K,Dh]; valid: [B,T]

Query t attends key s when s <= t and `valid[:, s]` (left or right padding). Rows of
padding queries produce finite values that nobody reads. Implementations (`impl`):

- "dense": the [B,K,G,T,S] scores in causal query blocks of 128 (fast on XLA:CPU at the
  lengths that fit a CPU; memory and compile time grow with T: Python-unrolled blocks).
- "blockwise": online softmax over key blocks inside `fori_loop`s with a written-out
  backward (flash attention in plain JAX): O(T * block) memory, one compiled block
  whatever T is. The fallback everywhere.
- "splash": Pallas splash attention on TPU (GQA, causal, padding as segment ids).
- "pallas_gpu": the Pallas Triton flash attention on GPU (kv heads repeated to the
  query heads; padding as segment ids).
- "auto": splash on TPU, pallas_gpu on GPU, dense on CPU up to `DENSE_MAX_LEN` tokens
  while its fp32 scores ([B,H,T,T], which XLA may keep alive across blocks) stay under
  `DENSE_MAX_BYTES`, and blockwise beyond: a batch-32 prefill of 4k-token prompts would
  otherwise need ~19 GiB for SmolLM2's 9 heads.

Kernels run per device under `shard_map` over the active mesh (batch over data x fsdp,
heads over tensor), since XLA cannot partition a Pallas call by itself.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLS = ("auto", "dense", "blockwise", "splash", "pallas_gpu")
DENSE_MAX_LEN = 4096  # "auto" on CPU: dense query blocks up to this length ...
DENSE_MAX_BYTES = 1 << 30  # ... and this many bytes of fp32 scores [B, H, T, T]
CAUSAL_BLOCK = 128  # query rows per block in "dense"
BLOCK = 512  # query and key rows per block in "blockwise" and the kernels
_MASKED = -1e30  # a finite fill keeps fully masked (padding) rows NaN-free


def resolve(impl: str, platform: str, length: int, score_bytes: int = 0) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention implementation must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    return "dense" if length <= DENSE_MAX_LEN and score_bytes <= DENSE_MAX_BYTES else "blockwise"


def attention(q, k, v, valid, *, impl: str = "auto"):
    """Causal grouped-query self-attention; see the module docstring."""
    from ophsd_jax import parallel

    mesh = parallel.active_mesh()
    platform = (mesh.devices.flat[0].platform if mesh is not None else jax.devices()[0].platform)
    B, T, H = q.shape[:3]
    impl = resolve(impl, platform, T, score_bytes=4 * B * H * T * T)
    if impl == "dense":
        mask = jnp.tril(jnp.ones((T, T), bool))[None] & valid.astype(bool)[:, None, :]
        return dense_causal(q, k, v, mask)
    if impl == "blockwise":
        return blockwise(q, k, v, valid)
    if T % 128:  # the kernels tile the sequence in 128-row blocks
        return blockwise(q, k, v, valid)
    kernel = {"splash": _splash, "pallas_gpu": _pallas_gpu}[impl]
    return _per_device(kernel, q, k, v, valid, mesh)


def _per_device(kernel, q, k, v, valid, mesh):
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, valid)
    from ophsd_jax import parallel

    # batch rows and heads as the rules table shards them (a dim that does not divide stays whole)
    qs = parallel.logical_to_spec(("batch", None, "heads", None), q.shape, mesh)
    ks = parallel.logical_to_spec(("batch", None, "kv_heads", None), k.shape, mesh)
    if qs[2] != ks[2]:  # query and kv heads must split alike; else keep heads whole
        qs, ks = P(qs[0], None, None, None), P(ks[0], None, None, None)
    vs = P(qs[0], None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(qs, ks, ks, vs), out_specs=qs, check_vma=False)(
        q, k, v, valid)


# ---- dense (XLA; the CPU path) ---------------------------------------------------------------


def dense_causal(q, k, v, mask):
    """Query rows in blocks that see only the keys up to their block's end: skips most of
    the masked half of the scores. mask: [B,T,T] bool (causal & valid keys)."""
    kt, vt = (jnp.swapaxes(x, 1, 2) for x in (k, v))  # [B,K,S,Dh]
    T = q.shape[1]
    if T <= CAUSAL_BLOCK:
        return grouped_attention(q, kt, vt, mask)
    outs = [grouped_attention(q[:, i:i + CAUSAL_BLOCK], kt[:, :, :i + CAUSAL_BLOCK], vt[:, :, :i + CAUSAL_BLOCK],
                              mask[:, i:i + CAUSAL_BLOCK, :i + CAUSAL_BLOCK]) for i in range(0, T, CAUSAL_BLOCK)]
    return jnp.concatenate(outs, axis=1)


def grouped_attention(q, k, v, mask, keys_transposed: bool = False):
    """q: [B,T,H,Dh]; k, v: [B,K,S,Dh] (k: [B,K,Dh,S] if keys_transposed);
    mask: [B,T,S] bool -> [B,T,H,Dh].

    The query rows of one kv head are laid out as one [G*T, Dh] block (query head h uses
    kv head h // G, as in HF), so both products, and their gradients, are plain batched
    matmuls over (batch, kv head) and the [B,K,G,T,S] scores come out of the matmul in
    the layout the mask and softmax read. Mixing (t, g) with (s, k) in one einsum instead
    makes XLA:CPU transpose the scores, which costs more than the matmuls.
    """
    B, T, H, Dh = q.shape
    K, S = v.shape[1], v.shape[2]
    G = H // K
    qg = q.reshape(B, T, K, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, Dh)
    spec = "bkqd,bkds->bkqs" if keys_transposed else "bkqd,bksd->bkqs"
    scores = jnp.einsum(spec, qg, k.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores.reshape(B, K, G, T, S) / math.sqrt(Dh)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(B, K, G * T, S)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v.astype(q.dtype))  # [B, K, G*T, Dh]
    return out.reshape(B, K, G, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)


# ---- blockwise (flash attention in plain JAX) --------------------------------------------------


def blockwise(q, k, v, valid, block: int | None = None):
    """Causal GQA attention with O(T * block) memory. T is padded up to a multiple of
    the block (padded keys are invalid, padded query rows are dropped)."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    blk = min(block or BLOCK, _round_up(T, 8))
    Tp = _round_up(T, blk)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    # [B, K, G, T, Dh] query groups per kv head; [B, K, T, Dh] keys and values
    qg = pad(q).reshape(B, Tp, K, H // K, Dh).transpose(0, 2, 3, 1, 4)
    kk, vv = (pad(x).transpose(0, 2, 1, 3) for x in (k, v))
    out = _flash(qg, kk, vv, pad(valid.astype(jnp.int32)), blk)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, H, Dh)[:, :T]


def _round_up(n, m):
    return -(-n // m) * m


def _block_scores(qb, kb, valid_b, i, j, blk, scale):
    """Scores [B,K,G,blk,blk] fp32 of query block i against key block j, masked."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale
    qpos = i * blk + jnp.arange(blk)
    kpos = j * blk + jnp.arange(blk)
    ok = (qpos[:, None] >= kpos[None, :])[None] & valid_b.astype(bool)[:, None, :]  # [B, blk, blk]
    return jnp.where(ok[:, None, None], s, _MASKED)


def _slice(x, i, blk, axis):
    return jax.lax.dynamic_slice_in_dim(x, i * blk, blk, axis)


def _flash_forward(q, k, v, valid, blk):
    """(out [B,K,G,T,Dh], logsumexp [B,K,G,T]) by online softmax over key blocks."""
    B, K, G, T, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh)
    n = T // blk

    def q_block(i):
        qb = _slice(q, i, blk, 3)

        def k_block(j, carry):
            m, l, acc = carry
            s = _block_scores(qb, _slice(k, j, blk, 2), _slice(valid, j, blk, 1), i, j, blk, scale)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), _slice(v, j, blk, 2),
                                                     preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full((B, K, G, blk), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, blk), jnp.float32),
                jnp.zeros((B, K, G, blk, Dh), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, i + 1, k_block, init)  # causal: key blocks up to i only
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    out, lse = jax.lax.map(q_block, jnp.arange(n))  # [n, B, K, G, blk, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, T, Dh)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, T)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, valid, blk):
    return _flash_forward(q, k, v, valid, blk)[0]


def _flash_fwd(q, k, v, valid, blk):
    out, lse = _flash_forward(q, k, v, valid, blk)
    return out, (q, k, v, valid, out, lse)


def _flash_bwd(blk, res, d_out):
    """Flash-attention backward: per query block, recompute each key block's
    probabilities from the saved logsumexp; dK, dV accumulate into full-size buffers."""
    q, k, v, valid, out, lse = res
    B, K, G, T, Dh = q.shape
    scale = 1.0 / math.sqrt(Dh)
    n = T // blk
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,K,G,T]

    def q_block(i, carry):
        dk, dv, dq = carry
        qb, dob = _slice(q, i, blk, 3), _slice(d_out, i, blk, 3)
        lse_b, delta_b = _slice(lse, i, blk, 3), _slice(delta, i, blk, 3)

        def k_block(j, inner):
            dk, dv, dq_b = inner
            kb, vb = _slice(k, j, blk, 2), _slice(v, j, blk, 2)
            s = _block_scores(qb, kb, _slice(valid, j, blk, 1), i, j, blk, scale)
            p = jnp.exp(s - lse_b[..., None])  # [B,K,G,bq,bk]
            dv_j = jnp.einsum("bkgqs,bkgqd->bksd", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", dob, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_b[..., None]) * scale
            dq_b = dq_b + jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(qb.dtype), qb, preferred_element_type=jnp.float32)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, _slice(dk, j, blk, 2) + dk_j, j * blk, 2)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, _slice(dv, j, blk, 2) + dv_j, j * blk, 2)
            return dk, dv, dq_b

        dk, dv, dq_b = jax.lax.fori_loop(0, i + 1, k_block, (dk, dv, jnp.zeros((B, K, G, blk, Dh), jnp.float32)))
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_b, i * blk, 3)
        return dk, dv, dq

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    dk, dv, dq = jax.lax.fori_loop(0, n, q_block, (zeros(k), zeros(v), zeros(q)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- Pallas kernels (per device) ----------------------------------------------------------------


def _segments(valid):
    """Segment ids: 1 on real tokens, 0 on padding (padding rows then attend padding)."""
    return valid.astype(jnp.int32)


def _splash(q, k, v, valid):
    """TPU splash attention on one device's rows: q [b,T,H,Dh], k, v [b,T,K,Dh]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, H, Dh = q.shape
    blk = min(BLOCK, T)
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    kernel = sk.make_splash_mha(mask=sm.MultiHeadMask([sm.CausalMask((T, T))] * H), head_shards=1, q_seq_shards=1,
                                block_sizes=sizes)
    qh = (q * (1.0 / math.sqrt(Dh))).astype(q.dtype).transpose(0, 2, 1, 3)  # [b, H, T, Dh]
    kh, vh = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [b, K, T, Dh]
    seg = _segments(valid)
    out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=sk.SegmentIds(q=s, kv=s)))(qh, kh, vh, seg)
    return out.transpose(0, 2, 1, 3)


def _pallas_gpu(q, k, v, valid, interpret: bool = False):
    """Triton flash attention (jax.experimental.pallas.ops.gpu.attention.mha) on one
    device's rows; it has no grouped heads, so kv heads are repeated to the query heads.
    `interpret`: Pallas's interpreter, for tests on CPU."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    B, T, H, Dh = q.shape
    G = H // k.shape[2]
    k, v = (jnp.repeat(x, G, axis=2) for x in (k, v))
    fwd, bwd = pallas_gpu_blocks(T, Dh, q.dtype.itemsize)
    return gpu_attention.mha(q, k, v, _segments(valid), sm_scale=1.0 / math.sqrt(Dh), causal=True,
                             block_sizes=gpu_attention.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=bwd,
                                                                  block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd),
                             interpret=interpret)


def pallas_gpu_blocks(T: int, head_dim: int, itemsize: int) -> tuple[int, int]:
    """(forward, backward) block rows of the Triton kernel, sized to the 227 KiB of shared
    memory per block of an H100/H200: a kernel over it fails at launch (RESOURCE_EXHAUSTED).
    Measured on an H200: bf16 x head dim 128 runs forward and backward at 128 rows
    (docs/benchmarks.md, 14.9 ms at T=8192); fp32 x 64 runs the forward at 128 but not the
    backward (257 KiB asked; 64 runs); fp32 x 128 with a 128-row forward asked 256.5 KiB.
    Larger rows get half-size blocks (64 / 32, not yet run on a GPU)."""
    row = head_dim * itemsize
    fwd, bwd = (128, 128) if itemsize <= 2 and row <= 256 else (128, 64) if row <= 256 else (64, 32)
    return min(fwd, T), min(bwd, T)
