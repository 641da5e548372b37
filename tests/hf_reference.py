"""Tiny random Hugging Face models (transformers + CPU torch): the independent reference."""

from __future__ import annotations

import numpy as np
import torch
import transformers

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)


def make_hf_model(family: str, seed: int = 0, init_std: float = 0.08, **overrides):
    """A random model with larger-than-default init so logits are far from uniform."""
    cfg_cls, model_cls = FAMILIES[family]
    kw = {**BASE, **overrides}
    if family == "qwen3":
        kw.setdefault("head_dim", 16)
    cfg = cfg_cls(**kw)
    cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # random norms / biases so those code paths are exercised too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def ragged_batch(vocab: int, lengths, seed: int = 0, left_pad: bool = False):
    """tokens, mask [B, max(lengths)] with padding on the right (or left)."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    tokens = np.zeros((len(lengths), T), np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        sl = slice(T - n, T) if left_pad else slice(0, n)
        tokens[b, sl] = rng.integers(3, vocab, n)
        mask[b, sl] = 1
    return tokens, mask
