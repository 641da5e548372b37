"""Corrupt or mismatched model folders fail with a message naming the problem."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_reference import make_hf_model, save_hf_model
from ophsd_jax import parallel
from ophsd_jax.models.weights import CheckpointError, load_hf


@pytest.fixture()
def folder(tmp_path):
    return save_hf_model(make_hf_model("llama", tie_word_embeddings=False), tmp_path / "m")


def load(path):
    return load_hf(path, parallel.single_device_mesh())


def rewrite(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder, **kw):
    p = os.path.join(folder, "config.json")
    cfg = json.load(open(p))
    cfg.update(kw)
    json.dump(cfg, open(p, "w"))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(str(tmp_path / "nope"))


def test_missing_config(folder):
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load(folder)


def test_invalid_config_json(folder):
    open(os.path.join(folder, "config.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load(folder)


def test_unknown_architecture(folder):
    edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(CheckpointError, match="unsupported architecture.*GPT2LMHeadModel"):
        load(folder)


def test_missing_config_key(folder):
    p = os.path.join(folder, "config.json")
    cfg = json.load(open(p)); del cfg["hidden_size"]; json.dump(cfg, open(p, "w"))
    with pytest.raises(CheckpointError, match="hidden_size"):
        load(folder)


def test_missing_tensor(folder):
    rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load(folder)


def test_shape_mismatch(folder):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
    rewrite(folder, edit)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape \(8, 64\), expected \(32, 64\)"):
        load(folder)


def test_config_does_not_match_weights(folder):
    edit_config(folder, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight.*expected"):
        load(folder)


def test_unexpected_tensor_means_wrong_family(folder):
    edit_config(folder, architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    with pytest.raises(CheckpointError, match="missing tensor.*q_norm"):
        load(folder)

    def edit(t):
        t["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    edit_config(folder, architectures=["LlamaForCausalLM"], model_type="llama")
    rewrite(folder, edit)
    with pytest.raises(CheckpointError, match="unexpected tensor.*q_norm"):
        load(folder)


def test_truncated_safetensors(folder):
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load(folder)


def test_index_points_to_missing_shard(folder):
    json.dump({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}},
              open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*does not exist"):
        load(folder)
