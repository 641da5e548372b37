"""Sharded parameter state: abstract init, per-tensor placement, and the forward call.

The trainer and sampler work with `(graphdef, params)` from `nnx.split`; `params` is
an `nnx.State` pytree. Parameters are never materialised unsharded on one device:
random init is a jitted function with sharded outputs, and loaders place each tensor
shard by shard with `jax.make_array_from_callback`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from ophsd_jax import parallel
from ophsd_jax.models.config import ModelConfig, as_dtype
from ophsd_jax.models.transformer import Decoder, KVCache


def abstract_model(cfg: ModelConfig):
    """(graphdef, abstract params) without allocating anything."""
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def _is_var(x):
    return isinstance(x, nnx.Variable)


def param_shardings(abstract_params, mesh: Mesh, exclude: tuple[str, ...] = ()):
    """A tree like `abstract_params` holding each parameter's NamedSharding (`exclude`:
    mesh axes not to shard over, e.g. ("fsdp",) for the sampling layout)."""

    def one(var):
        axes = var.get_metadata().get("axes", (None,) * var.get_value().ndim)
        return var.replace(parallel.named_sharding(mesh, axes, var.get_value().shape, exclude))

    return jax.tree.map(one, abstract_params, is_leaf=_is_var)


def flat_names(params) -> dict[str, nnx.Variable]:
    """{'layers.wq': Variable, 'embed': Variable, ...}"""
    return {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(params)}


def init_params(cfg: ModelConfig, mesh: Mesh, seed: int = 0):
    """Random params created directly in their sharded layout."""
    graphdef, abstract = abstract_model(cfg)
    shardings = param_shardings(abstract, mesh)

    @jax.jit
    def create(key):
        return nnx.split(Decoder(cfg, rngs=nnx.Rngs(params=key)))[1]

    with jax.set_mesh(mesh):
        params = jax.jit(create, out_shardings=shardings)(jax.random.key(seed))
    return graphdef, params


def place_params(cfg: ModelConfig, mesh: Mesh, get_array: Callable[[str, tuple, np.dtype], np.ndarray]):
    """Build sharded params tensor by tensor.

    `get_array(name, shape, dtype)` returns a host array (numpy or memmap) for one of our
    parameter names; only the slices each local device owns are copied to it.
    """
    graphdef, abstract = abstract_model(cfg)
    shardings = param_shardings(abstract, mesh)
    flat_sh = flat_names(shardings)
    pure = {}
    for name, var in flat_names(abstract).items():
        shape, dtype = tuple(var.get_value().shape), var.get_value().dtype
        host = get_array(name, shape, dtype)
        if tuple(host.shape) != shape:
            raise ValueError(f"parameter {name!r}: expected shape {shape}, got {tuple(host.shape)}")
        host = np.asarray(host, dtype=dtype) if host.dtype != dtype else host
        arr = jax.make_array_from_callback(shape, flat_sh[name].get_value(), lambda idx, h=host: np.ascontiguousarray(h[idx]))
        _set_path(pure, name.split("."), arr)
    nnx.replace_by_pure_dict(abstract, pure)
    return graphdef, abstract


def _set_path(tree: dict, keys: list[str], value):
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def host_params(params) -> dict[str, np.ndarray]:
    """Gather every parameter to host numpy, keyed by flat name (for export)."""
    return {name: parallel.to_host(var.get_value()) for name, var in flat_names(params).items()}


def decode_layout(params, mesh: Mesh, dtype):
    """A function params -> the sampling layout's copy of them: in compute `dtype`, and not
    sharded over fsdp (tensor-axis sharding kept, the rest replicated), so decoding reads
    each weight where it is instead of all-gathering every layer at every token. Jitted;
    the copy's shardings are fixed by `params`' tree (concrete or abstract)."""
    dtype = as_dtype(dtype)
    out = param_shardings(params, mesh, exclude=("fsdp",))
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p), out_shardings=out)


def cast_params(params, dtype):
    dtype = as_dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype), params)


def forward(graphdef, params, tokens, positions, attn_mask, cache: KVCache | None = None, cache_index=0, *,
            lora=None, lora_scale: float = 1.0, frozen: bool = False):
    """Hidden states [B, T, D]; see `Decoder.__call__` (lora: adapters applied on the fly;
    frozen: `params` are not differentiated)."""
    return nnx.merge(graphdef, params)(tokens, positions, attn_mask, cache, cache_index, lora=lora,
                                       lora_scale=lora_scale, frozen=frozen)


def logits(graphdef, params, hidden):
    return nnx.merge(graphdef, params).logits(hidden)


def lm_head(graphdef, params) -> jax.Array:
    return nnx.merge(graphdef, params).lm_head_weight()


def output_head(graphdef, params) -> tuple[jax.Array, bool]:
    """`(head as stored, vocab_major)`: see `Transformer.output_head`."""
    return nnx.merge(graphdef, params).output_head()


def positions_from_mask(attn_mask) -> jnp.ndarray:
    """Position ids counting only real tokens (left or right padding)."""
    m = attn_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)
