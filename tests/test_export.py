"""Export to a Hugging Face folder: transformers loads it; re-import is identical."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

import tolerances as tol
from hf_reference import hf_logits, make_hf_model, ragged_batch, save_hf_model
from ophsd_jax import parallel
from ophsd_jax.models import state as S
from ophsd_jax.models.config import ModelConfig
from ophsd_jax.models.tokenizer import Tokenizer
from ophsd_jax.models.weights import load_hf, save_hf
from test_model_parity import our_logits

QWEN3_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def small_tokenizer():
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers, decoders, AddedToken

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    tok = HFTok(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]])
    return Tokenizer(tok, QWEN3_LIKE_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.mark.parametrize("family,tied", [("llama", True), ("qwen2", False), ("qwen3", False)])
def test_roundtrip_through_transformers(family, tied, tmp_path):
    cfg = ModelConfig.tiny(family, vocab_size=320, tie_word_embeddings=tied, eos_token_id=2, bos_token_id=1)
    graphdef, params = S.init_params(cfg, parallel.single_device_mesh(), seed=7)
    params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)  # sharper logits than 0.02 init
    out = save_hf(cfg, params, str(tmp_path / "export"), tokenizer=small_tokenizer(), max_shard_bytes=100_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "generation_config.json" in files  # sharded on purpose
    assert len([f for f in files if f.endswith(".safetensors")]) > 1

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    tokens, mask = ragged_batch(cfg.vocab_size, [21, 13], seed=5)
    real = mask.astype(bool)
    ref = hf_logits(hf, tokens, mask)
    ours = our_logits(graphdef, params, tokens, mask)
    assert np.abs(ref[real]).max() > 1.0
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=tol.logits_atol(cfg, graphdef, params, tokens.shape[1]))

    cfg2, _, params2 = load_hf(out, parallel.single_device_mesh())
    assert cfg2.replace(rms_norm_eps=cfg.rms_norm_eps) == cfg
    a, b = S.host_params(params), S.host_params(params2)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_tokenizer_export_loads_in_transformers(tmp_path):
    ours = small_tokenizer()
    ours.save(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    for kw in ({}, {"enable_thinking": False}):
        mine = ours.apply_chat_template(msgs, tokenize=False, **kw)
        theirs = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        assert mine == theirs
    assert "<think>" in ours.apply_chat_template(msgs, tokenize=False, enable_thinking=False)
    assert "<think>" not in ours.apply_chat_template(msgs, tokenize=False)
    text = ours.apply_chat_template(msgs, tokenize=False)
    assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
    assert Tokenizer.from_dir(str(tmp_path)).apply_chat_template(msgs) == ours.apply_chat_template(msgs)


def test_bf16_export_loads(tmp_path):
    hf = make_hf_model("qwen3")
    path = save_hf_model(hf, tmp_path / "src")
    cfg, graphdef, params = load_hf(path, parallel.single_device_mesh(), param_dtype="bfloat16")
    out = save_hf(cfg, params, str(tmp_path / "bf16"))
    meta = json.load(open(os.path.join(out, "config.json")))
    assert meta["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    expected = S.host_params(params)["embed"].astype(np.float32)
    np.testing.assert_array_equal(reloaded.model.embed_tokens.weight.detach().float().numpy(), expected)
