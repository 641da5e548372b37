"""LoRA adapters for the decoder: config, sharded init, merge, and the PEFT layout.

An adapter is a plain pytree beside the (frozen) base weights:
`{param name: {"a": [L, *in, r], "b": [L, r, *out]}}` for each targeted projection
(`wq` ... `w_down`, stacked over layers like the weights). The model applies it on the
fly (`Decoder.__call__(..., lora=adapter, lora_scale=alpha / rank)`: each adapted
projection adds scale * (x @ a) @ b); `merge` folds it into a copy of the weights,
`W + scale * a @ b`, which is the same function of the input.

Why not qwix: qwix (0.1.8, imports fine with flax 0.12.8 / jax 0.10.2) attaches
adapters by intercepting the einsums a Flax module performs and creating LoRA params
on that module, matched by module path. Here one module runs every projection of every
layer inside a `lax.scan` over stacked weights, so the intercepted weight is a scanned
slice: qwix would create one adapter shared by all layers, create variables inside the
scan's trace, and could not tell q from k by path; the XLA:CPU fast paths (custom-VJP
MLP, split projections) also bypass plain einsums. So the adapters live here, stacked
and sharded like the weights (logical axes; the rank axis replicated).

Training with an adapter: the train state's params are the adapter alone (gradients
and Adam moments only for it); the base weights are a separate, never-differentiated
argument of the step, in `model.param_dtype` (bf16 is fine: they never receive a
small update). The frozen teacher ("initial") is the base with the adapter off: no
second copy of the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ophsd_jax import parallel
from ophsd_jax.models.config import ModelConfig, as_dtype
from ophsd_jax.models.transformer import layer_param_specs

# config.lora.targets name -> (our parameter, number of input axes, HF module name)
TARGETS = {
    "q": ("wq", 1, "q_proj"), "k": ("wk", 1, "k_proj"), "v": ("wv", 1, "v_proj"), "o": ("wo", 2, "o_proj"),
    "gate": ("w_gate", 1, "gate_proj"), "up": ("w_up", 1, "up_proj"), "down": ("w_down", 1, "down_proj"),
}
_HF_PARENT = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn",
              "gate": "mlp", "up": "mlp", "down": "mlp"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(TARGETS)
    dtype: str = "float32"  # the adapter's (trained) dtype

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"lora rank must be > 0, got {self.rank}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"lora targets {list(self.targets)}: each must be one of {list(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, c) -> "LoraConfig | None":
        """From a run config's `lora` section; None when LoRA is off (rank 0)."""
        lc = c.get("lora")
        if lc is None or not lc.rank:
            return None
        return cls(rank=int(lc.rank), alpha=float(lc.alpha), targets=tuple(lc.targets), dtype=lc.dtype)


def adapter_specs(cfg: ModelConfig, lcfg: LoraConfig) -> dict[str, dict[str, tuple[tuple, tuple]]]:
    """{param: {"a": (shape, logical axes), "b": (shape, logical axes)}}."""
    specs = layer_param_specs(cfg)
    out = {}
    for t in lcfg.targets:
        name, n_in, _ = TARGETS[t]
        shape, axes = specs[name]
        L, ins, outs = shape[0], shape[1:1 + n_in], shape[1 + n_in:]
        out[name] = {"a": ((L, *ins, lcfg.rank), ("layers", *axes[1:1 + n_in], None)),
                     "b": ((L, lcfg.rank, *outs), ("layers", None, *axes[1 + n_in:]))}
    return out


def adapter_shardings(cfg: ModelConfig, lcfg: LoraConfig, mesh: Mesh):
    return {n: {k: parallel.named_sharding(mesh, axes, shape) for k, (shape, axes) in ab.items()}
            for n, ab in adapter_specs(cfg, lcfg).items()}


def abstract_adapter(cfg: ModelConfig, lcfg: LoraConfig, mesh: Mesh):
    """The adapter as ShapeDtypeStructs with its shardings (restore targets, compile checks)."""
    sh = adapter_shardings(cfg, lcfg, mesh)
    dt = as_dtype(lcfg.dtype)
    return {n: {k: jax.ShapeDtypeStruct(shape, dt, sharding=sh[n][k]) for k, (shape, _) in ab.items()}
            for n, ab in adapter_specs(cfg, lcfg).items()}


def init_adapter(cfg: ModelConfig, lcfg: LoraConfig, mesh: Mesh, seed: int = 0, b_std: float = 0.0):
    """A fresh adapter, created in its sharded layout: `a` uniform in +-1/sqrt(fan_in)
    (as PEFT's default), `b` zero, so the adapted model starts equal to the base.
    `b_std` > 0 draws `b` from N(0, b_std) instead (tests)."""
    specs = adapter_specs(cfg, lcfg)
    dt = as_dtype(lcfg.dtype)

    def create(key):
        out = {}
        for i, (n, ab) in enumerate(sorted(specs.items())):
            (a_shape, _), (b_shape, _) = ab["a"], ab["b"]
            fan_in = math.prod(a_shape[1:-1])
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            bound = 1.0 / math.sqrt(fan_in)
            b = b_std * jax.random.normal(kb, b_shape, jnp.float32) if b_std else jnp.zeros(b_shape, jnp.float32)
            out[n] = {"a": jax.random.uniform(ka, a_shape, jnp.float32, -bound, bound).astype(dt), "b": b.astype(dt)}
        return out

    with jax.set_mesh(mesh):
        return jax.jit(create, out_shardings=adapter_shardings(cfg, lcfg, mesh))(jax.random.key(seed))


def delta(ab, scale, n_in: int | None = None) -> jax.Array:
    """scale * a @ b for stacked a [L, *in, r], b [L, r, *out] -> [L, *in, *out] (fp32)."""
    a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
    ins, outs = a.shape[1:-1], b.shape[2:]
    d = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], b.shape[1], -1))
    return scale * d.reshape(a.shape[0], *ins, *outs)


def merge(base, adapter, scale: float):
    """The base params (nnx.State) with each adapted weight replaced by W + scale * a @ b,
    in the weight's dtype."""
    def one(path, w):
        names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        if len(names) >= 2 and names[-2] == "layers" and names[-1] in adapter:
            return (w.astype(jnp.float32) + delta(adapter[names[-1]], scale)).astype(w.dtype)
        return w

    return jax.tree_util.tree_map_with_path(one, base)


def make_merge(base_params):
    """`merge` jitted with the base's shardings for its output (the sampler's weights)."""
    sh = jax.tree.map(lambda x: x.sharding, base_params)
    return jax.jit(merge, static_argnums=2, out_shardings=sh)


# ---- PEFT layout -------------------------------------------------------------------------


def to_peft_tensors(cfg: ModelConfig, lcfg: LoraConfig, adapter) -> dict[str, np.ndarray]:
    """PEFT's tensor names and layouts: for a Linear `y = x W^T` with W [out, in],
    lora_A.weight [r, in] and lora_B.weight [out, r], y += (alpha / r) x A^T B^T. Our
    a [*in, r] flattens to [in, r] and b [r, *out] to [r, out] with the same (heads-major)
    order as the Hugging Face weights (models/weights.py), so A = a^T, B = b^T."""
    out = {}
    for t in lcfg.targets:
        name = TARGETS[t][0]
        a, b = (np.asarray(parallel.to_host(adapter[name][k]), np.float32) for k in ("a", "b"))
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{_HF_PARENT[t]}.{TARGETS[t][2]}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, lcfg.rank).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(lcfg.rank, -1).T)
    return out


def save_peft(cfg: ModelConfig, lcfg: LoraConfig, adapter, out_dir: str, base_model: str = "") -> str:
    """Write `adapter_config.json` + `adapter_model.safetensors`, which
    `peft.PeftModel.from_pretrained(base, out_dir)` loads."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = to_peft_tensors(cfg, lcfg, adapter)
    tmp = os.path.join(out_dir, "adapter_model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank, "lora_alpha": lcfg.alpha,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "target_modules": sorted(TARGETS[t][2] for t in lcfg.targets), "base_model_name_or_path": base_model,
              "inference_mode": True, "init_lora_weights": True}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir
