"""Hugging Face <-> ours weight mapping, safetensors import and export.

`WEIGHT_MAP` is the one table: each row is a Hugging Face tensor name (with `{i}`
for the layer), our parameter name, and how the array is laid out. Import and export
both read it, so they cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ophsd_jax.models import state as model_state
from ophsd_jax.models.config import ModelConfig


log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A model folder or file is missing, corrupt, or does not match the config."""


# layouts: how one HF tensor maps to our (per-layer) array.
#   "same": identical; "T": transpose; "in_heads": [H*Dh, D] -> [D, H, Dh];
#   "out_heads": [D, H*Dh] -> [H, Dh, D]; "bias_heads": [H*Dh] -> [H, Dh]
WEIGHT_MAP: list[tuple[str, str, str]] = [
    ("model.embed_tokens.weight", "embed", "same"),
    ("model.norm.weight", "final_norm", "same"),
    ("lm_head.weight", "lm_head", "T"),
    ("model.layers.{i}.input_layernorm.weight", "layers.attn_norm", "same"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.wq", "in_heads"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.wk", "in_heads"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.wv", "in_heads"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.bq", "bias_heads"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.bk", "bias_heads"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.bv", "bias_heads"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.wo", "out_heads"),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.q_norm", "same"),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.k_norm", "same"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.mlp_norm", "same"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.w_gate", "T"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.w_up", "T"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.w_down", "T"),
]
# Present in some checkpoints, never needed (RoPE tables are recomputed).
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
OURS_TO_HF = {ours: (hf, layout) for hf, ours, layout in WEIGHT_MAP}


def _to_ours(x: np.ndarray, layout: str, shape: tuple) -> np.ndarray:
    if layout == "same":
        return x
    if layout == "T":
        return x.T
    if layout in ("in_heads", "out_heads"):
        return x.T.reshape(shape)
    if layout == "bias_heads":
        return x.reshape(shape)
    raise AssertionError(layout)


def _to_hf(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "same":
        return x
    if layout == "T":
        return x.T
    if layout == "in_heads":  # [D, H, Dh] -> [H*Dh, D]
        return x.reshape(x.shape[0], -1).T
    if layout == "out_heads":  # [H, Dh, D] -> [D, H*Dh]
        return x.reshape(-1, x.shape[-1]).T
    if layout == "bias_heads":
        return x.reshape(-1)
    raise AssertionError(layout)


def _hf_shape(shape: tuple, layout: str) -> tuple:
    """The HF tensor shape for one of our (per-layer) shapes."""
    return _to_hf(np.empty(shape, np.int8), layout).shape


def hf_names(cfg: ModelConfig, ours: str) -> list[str]:
    hf, _ = OURS_TO_HF[ours]
    return [hf.format(i=i) for i in range(cfg.num_layers)] if "{i}" in hf else [hf]


def assemble(cfg: ModelConfig, tensors: Mapping[str, Callable[[], np.ndarray]], source: str):
    """Return `get_array(name, shape, dtype)` for `state.place_params` from HF tensors.

    `tensors` maps HF names to zero-argument loaders. Every expected tensor must be
    present with the right shape; unknown tensors are an error (wrong family or file).
    """
    _, abstract = model_state.abstract_model(cfg)
    expected = {}
    for ours in model_state.flat_names(abstract):
        expected.update({name: ours for name in hf_names(cfg, ours)})
    unknown = sorted(n for n in tensors if n not in expected and not IGNORED.match(n))
    if cfg.tie_word_embeddings:
        # some tied checkpoints store a copy of the embedding (load_hf unties a different one)
        unknown = [n for n in unknown if n != "lm_head.weight"]
    if unknown:
        raise CheckpointError(f"{source}: unexpected tensor(s) for a {cfg.family} model: {unknown[:5]}")
    missing = sorted(n for n in expected if n not in tensors)
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}" + (" ..." if len(missing) > 5 else ""))

    def get_array(ours: str, shape: tuple, dtype) -> np.ndarray:
        _, layout = OURS_TO_HF[ours]
        names = hf_names(cfg, ours)
        per_layer = shape[1:] if len(names) > 1 or ours.startswith("layers.") else shape
        parts = []
        for name in names:
            x = tensors[name]()
            want = _hf_shape(per_layer, layout)
            if tuple(x.shape) != tuple(want):
                raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(x.shape)}, expected {tuple(want)}")
            parts.append(_to_ours(x, layout, per_layer).astype(dtype, copy=False))
        return np.stack(parts) if ours.startswith("layers.") else parts[0]

    return get_array


# ---- Hugging Face folders ---------------------------------------------------------------


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"model folder {path!r} does not exist")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path!r} has no config.json")
    return _read_json_object(cfg_path)


def hf_model_config(path: str, **config_overrides) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder; errors name config.json and the key."""
    hf = read_hf_config(path)  # its errors already name the file
    try:
        return ModelConfig.from_hf(hf, **config_overrides)
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(path, 'config.json')}: {e}") from e


def _read_json_object(fpath: str) -> dict:
    try:
        with open(fpath, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise CheckpointError(f"{fpath}: invalid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{fpath}: expected a JSON object, got {type(obj).__name__}")
    return obj


def safetensors_index(path: str) -> dict[str, Callable[[], np.ndarray]]:
    """HF tensor name -> lazy loader, from model.safetensors or a sharded index."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        weight_map = _read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no 'weight_map' object")
        bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise CheckpointError(f"{index_path}: weight_map[{bad!r}] must be a file name, got {weight_map[bad]!r}")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path!r} has no *.safetensors files")
    loaders: dict[str, Callable[[], np.ndarray]] = {}
    for fname in files:
        fpath = os.path.join(path, fname)
        if not os.path.exists(fpath):
            raise CheckpointError(f"{index_path}: lists {fname!r}, which does not exist")
        try:
            with safe_open(fpath, framework="numpy") as f:
                names = list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{fpath}: not a readable safetensors file ({e})") from e
        for name in names:
            loaders[name] = lambda fpath=fpath, name=name: _read_tensor(fpath, name)
    return loaders


def _read_tensor(fpath: str, name: str) -> np.ndarray:
    try:
        with safe_open(fpath, framework="numpy") as f:
            x = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{fpath}: cannot read tensor {name!r} ({e})") from e
    # An integer tensor is a quantized or foreign checkpoint: casting it would load garbage.
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise CheckpointError(f"{fpath}: tensor {name!r} has dtype {x.dtype}; weights must be floating point "
                              "(quantized checkpoints are not supported)")
    return x


def untie_if_stored_head_differs(cfg: ModelConfig, tensors: Mapping[str, Callable[[], np.ndarray]],
                                 source: str) -> ModelConfig:
    """`cfg` with an untied head when a tied config comes with its own, different lm_head.weight.

    transformers (5.x) does the same: it ties only when the stored head equals the
    embedding exactly, else it keeps both and warns. Equal tensors stay tied (the
    stored copy is redundant).
    """
    if not cfg.tie_word_embeddings or "lm_head.weight" not in tensors or "model.embed_tokens.weight" not in tensors:
        return cfg
    head, embed = tensors["lm_head.weight"](), tensors["model.embed_tokens.weight"]()
    if head.shape == embed.shape and np.array_equal(head, embed):
        return cfg
    log.warning("%s: config.json says tie_word_embeddings=true, but lm_head.weight differs from the embedding; "
                "keeping the stored head untied, as transformers does", source)
    return cfg.replace(tie_word_embeddings=False)


def load_hf(path: str, mesh: Mesh, **config_overrides):
    """(cfg, graphdef, params) from a Hugging Face folder, placed on `mesh`."""
    cfg = hf_model_config(path, **config_overrides)
    tensors = safetensors_index(path)
    cfg = untie_if_stored_head_differs(cfg, tensors, source=path)
    get_array = assemble(cfg, tensors, source=path)
    graphdef, params = model_state.place_params(cfg, mesh, get_array)
    return cfg, graphdef, params


# ---- export ------------------------------------------------------------------------------


def to_hf_tensors(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    out = {}
    for ours, arr in model_state.host_params(params).items():
        _, layout = OURS_TO_HF[ours]
        names = hf_names(cfg, ours)
        if ours.startswith("layers."):
            for i, name in enumerate(names):
                out[name] = np.ascontiguousarray(_to_hf(arr[i], layout))
        else:
            out[names[0]] = np.ascontiguousarray(_to_hf(arr, layout))
    return out


def save_hf(cfg: ModelConfig, params, out_dir: str, tokenizer=None, *, max_shard_bytes: int = 4 << 30,
            generation_config: dict | None = None) -> str:
    """Write a folder `transformers.AutoModelForCausalLM.from_pretrained` loads as is."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = to_hf_tensors(cfg, params)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):  # greedy packing into shards of at most max_shard_bytes
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    meta = {"format": "pt"}  # transformers expects this marker
    if len(shards) == 1:
        _atomic_save(shards[0], os.path.join(out_dir, "model.safetensors"), meta)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, os.path.join(out_dir, fname), meta)
            weight_map.update({name: fname for name in shard})
        total = sum(t.nbytes for t in tensors.values())
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(out_dir, "config.json"), cfg.to_hf())
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.to_hf()["eos_token_id"]}
    gen.update(generation_config or {})
    _write_json(os.path.join(out_dir, "generation_config.json"), gen)
    if tokenizer is not None:
        tokenizer.save(out_dir)
    return out_dir


def _atomic_save(tensors: dict, path: str, meta: dict):
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def _write_json(path: str, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)

