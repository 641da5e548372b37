"""Frozen model configuration for the decoder LM, with named constructors.

One config covers the three supported Hugging Face families; a family is just a
set of switches (q/k/v bias for Qwen2, per-head q/k RMSNorm for Qwen3).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax.numpy as jnp

# Hugging Face `architectures` / `model_type` -> our family name.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
FAMILY_TO_ARCHITECTURE = {v: k for k, v in HF_ARCHITECTURES.items()}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A model config (ours or a Hugging Face config.json) is invalid or unsupported."""


# Sizes that must be positive; every other integer key may be any integer (token ids).
_POSITIVE = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings"}
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
               dict: "an object"}


def _check(key: str, value, kind):
    """`value` if it is of JSON type `kind` (bool is not an integer, an integer is a number)."""
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(f"{key!r} must be {_KIND_NAMES[kind]}, got {value!r}")
    if kind is int and key in _POSITIVE and value <= 0:
        raise ConfigError(f"{key!r} must be positive, got {value!r}")
    return int(value) if kind is int else float(value) if kind is float else value


def _get(hf: dict, key: str, kind, default=None):
    """hf[key] checked against `kind`; `default` when the key is absent or null."""
    value = hf.get(key)
    return default if value is None else _check(key, value, kind)


def as_dtype(name_or_dtype) -> jnp.dtype:
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype {name_or_dtype!r}; expected one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[name_or_dtype])
    return jnp.dtype(name_or_dtype)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # Llama-3 style scaling: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} or {"rope_type": "linear", "factor"}.
    rope_scaling: tuple | None = None  # stored as sorted tuple of items so the config stays hashable
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    remat: bool = False  # rematerialise each layer in the backward pass
    attention: str = "auto"  # self-attention implementation (models/attention.py)
    remat_policy: str = "nothing"  # with remat: what a layer keeps (transformer.REMAT_POLICIES)

    def __post_init__(self):
        if self.family not in FAMILY_TO_ARCHITECTURE:
            raise ConfigError(f"unknown model family {self.family!r}; supported: {sorted(FAMILY_TO_ARCHITECTURE)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        as_dtype(self.param_dtype), as_dtype(self.dtype)
        from ophsd_jax.models.attention import IMPLS
        if self.attention not in IMPLS:
            raise ConfigError(f"attention must be one of {IMPLS}, got {self.attention!r}")
        if self.remat_policy not in ("nothing", "dots", "attn_out", "qkv_attn_out"):
            raise ConfigError(f"remat_policy must be nothing | dots | attn_out | qkv_attn_out, got {self.remat_policy!r}")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type", "default")
            if kind not in ("default", "llama3", "linear"):
                raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd * 2 + d * kv * hd * 2 + (h * hd + 2 * kv * hd if self.qkv_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_layers * layer + self.vocab_size * d + d + head

    # ---- Hugging Face config.json <-> ours -------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict (transformers 4.x or 5.x layout).

        Messages name the key but not the file: the caller (`weights.hf_model_config`)
        prefixes the path.
        """
        if not isinstance(hf, dict):
            raise ConfigError(f"expected a JSON object, got {type(hf).__name__}")
        archs = _get(hf, "architectures", list) or []
        family = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
        if family is None:
            family = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(_get(hf, "model_type", str) or "")
        if family is None:
            raise ConfigError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {sorted(HF_ARCHITECTURES)}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if hf.get(key) is None:
                raise ConfigError(f"missing required key {key!r}")
        if (_get(hf, "hidden_act", str) or "silu") != "silu":
            raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu)")
        if _get(hf, "mlp_bias", bool) or (family == "llama" and _get(hf, "attention_bias", bool)):
            raise ConfigError("attention_bias/mlp_bias on Llama are not supported")
        if _get(hf, "use_sliding_window", bool):
            raise ConfigError("use_sliding_window=true is not supported")
        # transformers 5 nests RoPE settings in `rope_parameters`; 4.x uses rope_theta + rope_scaling.
        rope = dict(_get(hf, "rope_parameters", dict) or {})
        theta = _get(rope, "rope_theta", float) or _get(hf, "rope_theta", float, 10000.0)
        rope.pop("rope_theta", None)
        scaling = _get(hf, "rope_scaling", dict) or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.pop("type", "default"))
            scaling.pop("rope_theta", None)
            if scaling["rope_type"] == "default":
                scaling = None
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if scaling is not None and key in scaling:
                    _check(f"rope_scaling.{key}", scaling[key], float)
        heads = _get(hf, "num_attention_heads", int)
        hidden = _get(hf, "hidden_size", int)
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(_check(f"eos_token_id[{i}]", e, int) for i, e in enumerate(eos))
        else:
            eos = _get(hf, "eos_token_id", int)
        kw = dict(
            family=family,
            vocab_size=_get(hf, "vocab_size", int),
            hidden_size=hidden,
            intermediate_size=_get(hf, "intermediate_size", int),
            num_layers=_get(hf, "num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=_get(hf, "num_key_value_heads", int) or heads,
            head_dim=_get(hf, "head_dim", int) or hidden // heads,
            rope_theta=float(theta),
            rope_scaling=None if scaling is None else tuple(sorted(scaling.items())),
            rms_norm_eps=_get(hf, "rms_norm_eps", float, 1e-6),
            tie_word_embeddings=_get(hf, "tie_word_embeddings", bool, False),
            max_position_embeddings=_get(hf, "max_position_embeddings", int, 4096),
            bos_token_id=_get(hf, "bos_token_id", int),
            eos_token_id=eos,
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers loads without custom code."""
        rope_params = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_params = {**self.rope_scaling_dict, "rope_theta": self.rope_theta}
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        hf = {
            "architectures": [FAMILY_TO_ARCHITECTURE[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "attention_bias": self.qkv_bias,
            "rope_theta": self.rope_theta,  # read by transformers 4.x
            "rope_parameters": rope_params,  # read by transformers 5.x
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = self.rope_scaling_dict
        if self.family in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = False
        return hf

    # ---- named constructors -----------------------------------------------------------

    @classmethod
    def smollm2_135m(cls, **kw) -> "ModelConfig":
        base = dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
        return cls(**{**base, **kw})

    @classmethod
    def qwen3_8b(cls, **kw) -> "ModelConfig":
        base = dict(family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
                    num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, max_position_embeddings=40960, bos_token_id=151643,
                    eos_token_id=151645, param_dtype="bfloat16", dtype="bfloat16")
        return cls(**{**base, **kw})

    @classmethod
    def tiny(cls, family: str = "llama", **kw) -> "ModelConfig":
        """A few-layer random model for tests."""
        base = dict(family=family, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512)
        return cls(**{**base, **kw})
