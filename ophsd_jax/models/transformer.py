"""The decoder LM (Llama / Qwen2 / Qwen3) as a Flax NNX module.

Layer parameters are stored stacked along a leading `layers` axis and the forward
pass is a `lax.scan` over them: one compiled layer instead of N keeps compile time
flat in depth (30 layers for SmolLM2, 36 for Qwen3-8B). The forward returns final
(normed) hidden states; `logits()` is separate so losses can project tile by tile.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

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
    k: jax.Array  # [layers, batch, slots, kv_heads, head_dim]
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, slots: int, dtype=None) -> "KVCache":
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        dtype = as_dtype(dtype or cfg.dtype)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


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

    def __call__(self, tokens, positions, attn_mask, cache: KVCache | None = None, cache_index=0):
        """Final hidden states [B, T, D] (compute dtype) and the updated cache.

        tokens, positions: [B, T] int. attn_mask: [B, T] (no cache) or [B, slots] (with
        cache): 1 where a key position holds a real token. With a cache the T new tokens
        are written at slots [cache_index, cache_index + T) and attend to all valid slots
        up to their own.
        """
        cfg = self.config
        dt = as_dtype(cfg.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
        x = constrain(x, ("batch", "seq", "act_embed"))
        T = tokens.shape[1]
        S = T if cache is None else cache.k.shape[2]
        q_slot = jnp.arange(T) + (0 if cache is None else cache_index)
        causal = q_slot[:, None] >= jnp.arange(S)[None, :]
        mask = causal[None] & attn_mask.astype(bool)[:, None, :]  # [B, T, S]
        cos, sin = rope_tables(cfg, positions)
        params = {name: getattr(self.layers, name)[...] for name in layer_param_specs(cfg)}

        # The cache rides in the scan carry and is updated in place at [layer, :, slot];
        # passing it as scanned xs/ys would copy all of it every layer of every step.
        def block(carry, xs):
            x, kv = carry
            p, layer = xs
            x, kv = _layer(cfg, x, p, cos, sin, mask, kv, layer, cache_index)
            return (x, kv), None

        if cfg.remat:
            block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
        kv_in = None if cache is None else (cache.k, cache.v)
        (x, kv_out), _ = jax.lax.scan(block, (x, kv_in), (params, jnp.arange(cfg.num_layers)))
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        new_cache = None if cache is None else KVCache(*kv_out)
        return x, new_cache

    def lm_head_weight(self) -> jax.Array:
        """[D, V] output projection (the embedding transposed when tied)."""
        return self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits; call on a slice of hidden states to keep [tokens, vocab] small."""
        w = self.lm_head_weight().astype(hidden.dtype)
        return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)


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


def _layer(cfg: ModelConfig, x, p, cos, sin, mask, kv, layer, cache_index):
    dt = x.dtype
    w = lambda name: p[name].astype(dt)  # noqa: E731 - params live in param_dtype, math in compute dtype
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = jnp.einsum("btd,dhk->bthk", h, w("wq"))
    k = jnp.einsum("btd,dhk->bthk", h, w("wk"))
    v = jnp.einsum("btd,dhk->bthk", h, w("wv"))
    if cfg.qkv_bias:
        q, k, v = q + w("bq"), k + w("bk"), v + w("bv")
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv is not None:
        ck, cv = kv
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (layer, 0, cache_index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (layer, 0, cache_index, 0, 0))
        kv = (ck, cv)
        k, v = ck[layer], cv[layer]
    attn = attention(q, k.astype(dt), v.astype(dt), mask)
    x = x + jnp.einsum("bthk,hkd->btd", attn, w("wo"))
    x = constrain(x, ("batch", "seq", "act_embed"))
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate = jnp.einsum("btd,df->btf", h, w("w_gate"))
    up = jnp.einsum("btd,df->btf", h, w("w_up"))
    x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, w("w_down"))
    x = constrain(x, ("batch", "seq", "act_embed"))
    return x, kv


def attention(q, k, v, mask):
    """Grouped-query attention. q: [B,T,H,Dh]; k, v: [B,S,K,Dh]; mask: [B,T,S] bool."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Dh)  # query head h uses kv head h // (H // K), as in HF
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(Dh)
    # A finite fill keeps fully masked (padding) rows NaN-free.
    scores = jnp.where(mask[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, H, Dh)
