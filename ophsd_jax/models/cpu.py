"""XLA:CPU fast paths for the decoder: the MLP's written-out backward, and decoding
unrolled over per-layer weight copies with the output projections in column blocks.

Used only on the CPU backend (`transformer.backend_ops`, and the sampler's "unrolled"
layer loop). Each piece computes the same math as the core model; each exists because
XLA:CPU made the plain form slow (docs/benchmarks.md has the measurements):
- a scan over stacked weights copies each layer's weight slice out of the stack every
  decode step (the matmul library needs a plain buffer): `layer_weights` copies them
  once per generation call and `forward_layers` unrolls the layers (the decode only: a
  prefill is matmul-bound and runs through the scan, `Sampler._scanned_prefill`);
- a lone matrix-vector product runs on one thread: `wo` and `w_down` as column blocks
  are independent products both threads run (`dense`);
- with tied embeddings, logits as a multiply-reduce over the [V, D] table run ~1.4x
  faster than a dot against its transpose for 2+ rows (for one row far slower: there
  `decode_logits` takes the dot);
- left to autodiff, the SwiGLU backward was emitted with transposed gate/up gradients
  fused into the silu derivative (`swiglu_mlp`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ophsd_jax.models import transformer as T


def dense(spec: str, x, w):
    """einsum(spec, x, w); w may be a tuple of blocks of its last (output) axis."""
    if isinstance(w, tuple):
        return jnp.concatenate([jnp.einsum(spec, x, part) for part in w], axis=-1)
    return jnp.einsum(spec, x, w)


def mlp(h, w_gate, w_up, w_down):
    if isinstance(w_down, tuple):  # decoding (no gradient): output column blocks
        act = jax.nn.silu(jnp.einsum("btd,df->btf", h, w_gate)) * jnp.einsum("btd,df->btf", h, w_up)
        return dense("btf,fd->btd", act, w_down)
    return swiglu_mlp(h, w_gate, w_up, w_down)


@jax.custom_vjp
def swiglu_mlp(h, w_gate, w_up, w_down):
    """`transformer.swiglu` with a written-out backward (see the module docstring)."""
    return _swiglu_fwd(h, w_gate, w_up, w_down)[0]


def _swiglu_fwd(h, w_gate, w_up, w_down):
    gate = jnp.einsum("btd,df->btf", h, w_gate)
    up = jnp.einsum("btd,df->btf", h, w_up)
    out = jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, w_down)
    return out, (h, gate, up, w_gate, w_up, w_down)


def _swiglu_bwd(res, d_out):
    h, gate, up, w_gate, w_up, w_down = res
    sig = jax.nn.sigmoid(gate)
    act = gate * sig  # silu(gate)
    d_act = jnp.einsum("btd,fd->btf", d_out, w_down)
    # as (d_out^T @ act)^T: XLA:CPU then transposes d_out (D wide), not act * up (F wide)
    d_w_down = jnp.einsum("btd,btf->df", d_out, act * up).T
    d_gate = d_act * up * (sig * (1 + gate * (1 - sig)))  # silu'(g) = s(g) (1 + g (1 - s(g)))
    d_up = d_act * act
    d_w_gate = jnp.einsum("btd,btf->df", h, d_gate)
    d_w_up = jnp.einsum("btd,btf->df", h, d_up)
    d_h = jnp.einsum("btf,df->btd", d_gate, w_gate) + jnp.einsum("btf,df->btd", d_up, w_up)
    return d_h, d_w_gate, d_w_up, d_w_down


swiglu_mlp.defvjp(_swiglu_fwd, _swiglu_bwd)

def frozen_stack(params):
    """16-bit float weights as their bits (uint16) through the layer scan, turned back
    into floats one layer at a time: XLA:CPU has no bf16 dynamic-slice, so it converts
    the whole stack to fp32 before the loop (a frozen bf16 teacher cost the update 0.33
    GiB of temporaries more than an fp32 one). Integer bits cannot carry a gradient:
    only for weights nobody differentiates."""
    dtypes = {k: v.dtype for k, v in params.items()}
    bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype.itemsize == 2 else a  # noqa: E731
    floats = lambda p: {k: jax.lax.bitcast_convert_type(v, dtypes[k]) if v.dtype != dtypes[k] else v  # noqa: E731
                        for k, v in p.items()}
    return {k: bits(v) for k, v in params.items()}, floats


OPS = T.Ops(dense=dense, mlp=mlp, frozen_stack=frozen_stack)


def layer_weights(model, split_outputs: int = 1) -> list[dict]:
    """Each layer's weights as separate arrays (copies of the stacked slices); with
    split_outputs > 1, `wo` and `w_down` as that many column blocks (output features)."""
    names = T.layer_param_specs(model.config)
    layers = [{name: getattr(model.layers, name)[...][i] for name in names} for i in range(model.config.num_layers)]
    if split_outputs > 1:
        for p in layers:
            p["wo"], p["w_down"] = (tuple(jnp.array_split(p[n], split_outputs, axis=-1)) for n in ("wo", "w_down"))
    return layers


def forward_layers(model, layers: list[dict], tokens, positions, attn_mask, cache: T.KVCache, cache_index):
    """`Decoder.__call__` with a per-layer cache, unrolled over `layer_weights()`: same
    arguments and math; `cache` holds per-layer lists (`KVCache.zeros(..., per_layer=True)`)."""
    cfg = model.config
    x, mask, cos, sin = model._inputs(tokens, positions, attn_mask, cache, cache_index)
    new_k, new_v = [], []
    for p, ck, cv in zip(layers, cache.k, cache.v):

        def attend(q, k, v, ck=ck, cv=cv):
            ck, cv = T._write_slots(ck, k, cache_index, keys=True), T._write_slots(cv, v, cache_index)
            return T._cache_attention(q, k, v, mask, ck, cv, cache_index, attn_mask[:, :q.shape[1]],
                                      cfg.attention), (ck, cv)

        x, (ck, cv) = T._layer(cfg, x, p, cos, sin, attend, OPS)
        new_k.append(ck)
        new_v.append(cv)
    x = T.rms_norm(x, model.final_norm[...], cfg.rms_norm_eps)
    return x, T.KVCache(new_k, new_v)


def decode_logits(model, hidden: jax.Array) -> jax.Array:
    """fp32 logits [B, V] for a few rows hidden [B, D]; tied embeddings as a
    multiply-reduce over the table (do not use on large batches or accelerators)."""
    if not model.config.tie_word_embeddings or hidden.shape[0] == 1:
        # One row: XLA:CPU runs the [V, 1, D] multiply-reduce ~100x slower than the dot
        # (360 ms vs 2.5 ms per token for SmolLM2, docs/benchmarks.md)
        return model.logits(hidden)
    w = model.embed[...].astype(hidden.dtype)
    prod = w[:, None, :].astype(jnp.float32) * hidden[None].astype(jnp.float32)
    return jnp.sum(prod, axis=-1).T
