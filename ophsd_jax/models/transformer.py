"""The decoder LM (Llama / Qwen2 / Qwen3) as a Flax NNX module.

Layer parameters are stored stacked along a leading `layers` axis and the forward
pass is a `lax.scan` over them: one compiled layer instead of N keeps compile time
flat in depth (30 layers for SmolLM2, 36 for Qwen3-8B). The forward returns final
(normed) hidden states; `logits()` is separate so losses can project tile by tile.

This module is the math. Backend fast paths live elsewhere behind small interfaces:
attention implementations in `models/attention.py`, XLA:CPU's layer pieces and its
unrolled decode in `models/cpu.py` (chosen by `backend_ops()` and by the sampler).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ophsd_jax.models import attention as attn_lib
from ophsd_jax.models.config import ModelConfig, as_dtype
from ophsd_jax.parallel import constrain

# Our parameter name -> (shape builder, logical axes). Leading "layers" axis on per-layer params.
def layer_param_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    L, D, F, H, K, Dh = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    specs = {
        "attn_norm": ((L, D), ("layers", "norm")),
        "wq": ((L, D, H, Dh), ("layers", "embed", "heads", "head_dim")),
        "wk": ((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
        "wv": ((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
        "wo": ((L, H, Dh, D), ("layers", "heads", "head_dim", "embed")),
        "mlp_norm": ((L, D), ("layers", "norm")),
        "w_gate": ((L, D, F), ("layers", "embed", "mlp")),
        "w_up": ((L, D, F), ("layers", "embed", "mlp")),
        "w_down": ((L, F, D), ("layers", "mlp", "embed")),
    }
    if cfg.qkv_bias:
        specs["bq"] = ((L, H, Dh), ("layers", "heads", "head_dim"))
        specs["bk"] = ((L, K, Dh), ("layers", "kv_heads", "head_dim"))
        specs["bv"] = ((L, K, Dh), ("layers", "kv_heads", "head_dim"))
    if cfg.qk_norm:
        specs["q_norm"] = ((L, Dh), ("layers", "norm"))
        specs["k_norm"] = ((L, Dh), ("layers", "norm"))
    return specs


def _init_value(name: str, shape, dtype, key):
    if name.endswith("norm"):
        return jnp.ones(shape, dtype)
    if name.startswith("b"):
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class KVCache(NamedTuple):
    """Keys and values of the cached slots.

    One kv head's values are a contiguous [slots, head_dim] block and its keys a
    contiguous [head_dim, slots] block: both decode products (q @ K^T, probs @ V) then
    read the cache in place as plain matmul operands, with no per-step transposes (a
    [slots, head_dim] key block made XLA:CPU repack it every step, ~1/3 of the decode
    attention time). Stacked: `[layers, batch, kv_heads, ...]` arrays (the scanned
    forward). Per layer: lists of `[batch, kv_heads, ...]` arrays (`forward_layers`), so
    each layer's buffer is updated in place and read without copying it out of a stack.
    """

    k: jax.Array | list[jax.Array]
    v: jax.Array | list[jax.Array]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype=None, per_layer: bool = False) -> "KVCache":
        dtype = as_dtype(dtype or cfg.dtype)
        shapes = ((batch, cfg.num_kv_heads, cfg.head_dim, slots), (batch, cfg.num_kv_heads, slots, cfg.head_dim))
        if per_layer:
            return cls(*([jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)] for shape in shapes))
        return cls(*(jnp.zeros((cfg.num_layers, *shape), dtype) for shape in shapes))

    # Logical axes of the stacked k and v arrays; per-layer arrays drop the first.
    AXES = (("layers", "batch", "kv_heads", "head_dim", "cache_seq"),
            ("layers", "batch", "kv_heads", "cache_seq", "head_dim"))


class Layers(nnx.Module):
    """All decoder layers' weights, stacked on a leading axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = as_dtype(cfg.param_dtype)
        for name, (shape, axes) in layer_param_specs(cfg).items():
            setattr(self, name, nnx.Param(_init_value(name, shape, pdt, rngs.params()), axes=axes))


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = as_dtype(cfg.param_dtype)
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed = nnx.Param(_init_value("embed", (V, D), pdt, rngs.params()), axes=("vocab", "embed"))
        self.layers = Layers(cfg, rngs)
        self.final_norm = nnx.Param(jnp.ones((D,), pdt), axes=("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(_init_value("lm_head", (D, V), pdt, rngs.params()), axes=("embed", "vocab"))

    def __call__(self, tokens, positions, attn_mask, cache: KVCache | None = None, cache_index=0, *,
                 lora: dict | None = None, lora_scale: float = 1.0, frozen: bool = False):
        """Final hidden states [B, T, D] (compute dtype) and the updated cache.

        lora: optional low-rank adapters {param name: {"a": [L, *in, r], "b": [L, r, *out]}}
        (models/lora.py), applied on the fly: each adapted projection adds
        lora_scale * (x @ a) @ b to x @ W.

        tokens, positions: [B, T] int. attn_mask: [B, T] (no cache) or [B, slots] (with
        cache): 1 where a key position holds a real token. With a (stacked) cache the T
        new tokens are written at slots [cache_index, cache_index + T) and attend to all
        valid slots up to their own.

        frozen: no gradient flows to these weights (a frozen teacher), so the backend may
        pass them through the layer scan in another form (`Ops.frozen_stack`).
        """
        cfg = self.config
        x, mask, cos, sin = self._inputs(tokens, positions, attn_mask, cache, cache_index)
        params = {name: getattr(self.layers, name)[...] for name in layer_param_specs(cfg)}
        params, unpack = backend_ops().frozen_stack(params) if frozen else _as_is(params)

        # The cache rides in the scan carry and is updated in place at [layer, ..., slot];
        # passing it as scanned xs/ys would copy all of it every layer of every step.
        def block(carry, xs):
            x, kv = carry
            p, adapter, layer = xs
            p = unpack(p)

            def attend(q, k, v):
                if kv is None:
                    return attn_lib.attention(q, k, v, attn_mask, impl=cfg.attention), None
                # Write first, then read the layer back: reading the old buffer while the
                # write updates it in place would make XLA copy the whole cache.
                ck = _write_slots(kv[0], k[None], cache_index, layer, keys=True)
                cv = _write_slots(kv[1], v[None], cache_index, layer)
                return _cache_attention(q, k, v, mask, ck[layer], cv[layer], cache_index, attn_mask[:, :q.shape[1]],
                                        cfg.attention), (ck, cv)

            x, kv = _layer(cfg, x, p, cos, sin, attend, lora=None if adapter is None else (adapter, lora_scale))
            return (x, kv), None

        if cfg.remat:
            block = jax.checkpoint(block, policy=REMAT_POLICIES[cfg.remat_policy])
        kv_in = None if cache is None else (cache.k, cache.v)
        (x, kv_out), _ = jax.lax.scan(block, (x, kv_in), (params, lora, jnp.arange(cfg.num_layers)))
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        return x, None if cache is None else KVCache(*kv_out)

    def _inputs(self, tokens, positions, attn_mask, cache, cache_index):
        """Embedded tokens, the attention mask, and RoPE tables."""
        cfg = self.config
        x = jnp.take(self.embed[...], tokens, axis=0).astype(as_dtype(cfg.dtype))
        x = constrain(x, ("batch", "seq", "act_embed"))
        T = tokens.shape[1]
        if cache is None or _is_static_zero(cache_index):
            # no cached tokens before these: attend among the T new tokens only
            valid = attn_mask if cache is None else attn_mask[:, :T]
            k_slot = jnp.arange(T)
        else:
            valid = attn_mask
            k_slot = jnp.arange(attn_mask.shape[1])
        # cache_index: one slot for every row, or one per row ([B]: rows at different steps)
        q_slot = jnp.arange(T)[None] + (0 if cache is None else jnp.reshape(cache_index, (-1, 1)))  # [1 or B, T]
        mask = (q_slot[:, :, None] >= k_slot[None, None, :]) & valid.astype(bool)[:, None, :]  # [B, T, keys]
        cos, sin = rope_tables(cfg, positions)
        return x, mask, cos, sin

    def lm_head_weight(self) -> jax.Array:
        """[D, V] output projection (the embedding transposed when tied)."""
        return self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def output_head(self) -> tuple[jax.Array, bool]:
        """The output projection as stored, and whether it is vocab-major: `([V, D], True)`
        for a tied embedding, `([D, V], False)` otherwise. For callers that can contract
        either layout (the distillation loss), so a tied head is never transposed: on XLA:CPU
        that is a [D, V] copy of the embedding, plus one for its gradient."""
        if self.config.tie_word_embeddings:
            return self.embed[...], True
        return self.lm_head[...], False

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits; call on a slice of hidden states to keep [tokens, vocab] small."""
        w = self.lm_head_weight().astype(hidden.dtype)
        return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)


def _is_static_zero(index) -> bool:
    return isinstance(index, int) and index == 0


def _write_slots(buf, new, cache_index, layer=None, keys: bool = False):
    """Write new values [.., B, T, K, Dh] at slot `cache_index` of a cache buffer
    [.., B, K, S, Dh], or new keys into a key buffer [.., B, K, Dh, S] (keys=True);
    stacked buffers: at `layer`. `cache_index`: a scalar, or one slot per row [B]."""
    if jnp.ndim(cache_index) == 0:
        new = jnp.swapaxes(new, -3, -2).astype(buf.dtype)  # [.., B, K, T, Dh]
        if keys:
            new = jnp.swapaxes(new, -2, -1)  # [.., B, K, Dh, T]
        start = (0, 0, 0, cache_index) if keys else (0, 0, cache_index, 0)
        return jax.lax.dynamic_update_slice(buf, new, start if layer is None else (layer, *start))

    # Per row (continuous batching): a scatter at each row's own slots, indexed by (row,
    # slot) pairs. Not a vmapped dynamic_update_slice: its scatter with a batching dimension
    # fails XLA:GPU's verifier once the batch is sharded (compile_check, 8xH100). The row
    # and slot indices are split by the head (and head_dim) slices, so numpy puts their
    # broadcast [B, T] axes first: the update is `new` as given, [B, T, K, Dh].
    update = new.reshape(new.shape[-4:]).astype(buf.dtype)  # without a stacked-layer axis
    B, T = update.shape[:2]
    rows = jnp.arange(B)[:, None]
    slots = jnp.reshape(cache_index, (B, 1)) + jnp.arange(T)[None]  # [B, T]
    lead = () if layer is None else (layer,)
    if keys:
        return buf.at[(*lead, rows, slice(None), slice(None), slots)].set(update)
    return buf.at[(*lead, rows, slice(None), slots)].set(update)


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
    dh = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    sc = cfg.rope_scaling_dict
    if sc is None:
        return inv
    if sc["rope_type"] == "linear":
        return inv / sc["factor"]
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate between.
    factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * inv / factor + smooth * inv
    out = jnp.where(wavelen > old_len / lo, inv / factor, inv)
    is_mid = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return jnp.where(is_mid, mid, out)


def rope_tables(cfg: ModelConfig, positions):
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """HF 'rotate half' layout. x: [B, T, heads, Dh]; cos/sin: [B, T, Dh]."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rot * sin[:, :, None]).astype(x.dtype)


def _lora_delta(x, ab, scale, n_in: int):
    """scale * (x @ a) @ b for x [..., *in], a [*in, r], b [r, *out] (one layer's adapter)."""
    xa = jnp.tensordot(x, ab["a"].astype(x.dtype), axes=n_in)
    return scale * jnp.tensordot(xa, ab["b"].astype(x.dtype), axes=1)


def _layer(cfg: ModelConfig, x, p, cos, sin, attend, ops=None, lora=None):
    """One decoder layer. `attend(q, k, v) -> (out, state)` does attention (and any
    cache update); q: [B,T,H,Dh], k, v: [B,T,K,Dh]. `ops` supplies the output
    projections and the MLP (default: the backend's, `backend_ops()`). `lora`:
    (this layer's adapters by param name, scale) or None."""
    ops = ops or backend_ops()
    dt = x.dtype
    w = lambda name: jax.tree.map(lambda a: a.astype(dt), p[name])  # noqa: E731 - params in param_dtype, math in dt
    adapters, scale = lora if lora is not None else ({}, 1.0)

    def plus_lora(y, name, inp, n_in=1):
        return y + _lora_delta(inp, adapters[name], scale, n_in) if name in adapters else y

    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = plus_lora(jnp.einsum("btd,dhk->bthk", h, w("wq")), "wq", h)
    k = plus_lora(jnp.einsum("btd,dhk->bthk", h, w("wk")), "wk", h)
    v = plus_lora(jnp.einsum("btd,dhk->bthk", h, w("wv")), "wv", h)
    if cfg.qkv_bias:
        q, k, v = q + w("bq"), k + w("bk"), v + w("bv")
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value")
    attn, state = attend(q, k, v)
    attn = checkpoint_name(attn, "attn_out")
    x = x + plus_lora(ops.dense("bthk,hkd->btd", attn, w("wo")), "wo", attn, 2)
    x = constrain(x, ("batch", "seq", "act_embed"))
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    if any(n in adapters for n in ("w_gate", "w_up", "w_down")):  # the plain SwiGLU math, plus the adapters
        gate = plus_lora(jnp.einsum("btd,df->btf", h, w("w_gate")), "w_gate", h)
        act = jax.nn.silu(gate) * plus_lora(jnp.einsum("btd,df->btf", h, w("w_up")), "w_up", h)
        act = checkpoint_name(act, "mlp_act")
        x = x + plus_lora(jnp.einsum("btf,fd->btd", act, w("w_down")), "w_down", act)
    else:
        x = x + ops.mlp(h, w("w_gate"), w("w_up"), w("w_down"))
    x = constrain(x, ("batch", "seq", "act_embed"))
    return x, state


def swiglu(h, w_gate, w_up, w_down):
    """(silu(h @ w_gate) * (h @ w_up)) @ w_down for h: [B,T,D]."""
    act = jax.nn.silu(jnp.einsum("btd,df->btf", h, w_gate)) * jnp.einsum("btd,df->btf", h, w_up)
    return jnp.einsum("btf,fd->btd", checkpoint_name(act, "mlp_act"), w_down)


class Ops(NamedTuple):
    """Backend-specific pieces of a layer: `dense(spec, x, w)` (an einsum), `mlp`, and
    `frozen_stack(params) -> (xs, unpack)`: how weights that are not differentiated ride
    through the layer scan (`unpack` turns one layer's slice of `xs` back into weights)."""

    dense: object
    mlp: object
    frozen_stack: object


def _as_is(params):
    return params, lambda p: p


CORE_OPS = Ops(dense=jnp.einsum, mlp=swiglu, frozen_stack=_as_is)


def backend_ops() -> Ops:
    """XLA:CPU gets its own (models/cpu.py: a written-out MLP backward, projections in
    column blocks for decoding); every other backend the plain math, which named remat
    policies can see into."""
    from ophsd_jax.parallel import active_mesh

    mesh = active_mesh()
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if platform == "cpu":
        from ophsd_jax.models import cpu

        return cpu.OPS
    return CORE_OPS


# model.remat_policy: what a rematerialised layer keeps from its forward pass.
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the matmul outputs
    "attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    "qkv_attn_out": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attn_out"),
}


def _grouped_attention(q, k, v, mask, keys_transposed: bool = False):
    return attn_lib.grouped_attention(q, k, v, mask, keys_transposed)


def _cache_attention(q, k, v, mask, ck, cv, cache_index, valid=None, impl="auto"):
    """Attention for new tokens q, k, v ([B,T,*,Dh]) whose keys/values are already written
    into the cache ck [B,K,Dh,S], cv [B,K,S,Dh]. With nothing cached before them (static index 0)
    only the new tokens are attended (mask: [B,T,T]); else all slots (mask: [B,T,S])."""
    if _is_static_zero(cache_index):  # prefill: causal self-attention among the new tokens
        return attn_lib.attention(q, k.astype(q.dtype), v.astype(q.dtype), valid, impl=impl)
    return _grouped_attention(q, ck, cv, mask, keys_transposed=True)
