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


def one_line_error(path, match):
    """The CheckpointError's message: one line, matching `match`."""
    with pytest.raises(CheckpointError, match=match) as e:
        load(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_index_not_json(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    open(index, "w").write('{"weight_map": ')
    msg = one_line_error(folder, "model.safetensors.index.json: invalid JSON")
    assert msg.count(index) == 1


@pytest.mark.parametrize("content", ["[1, 2]", '"weights"'])
def test_index_not_an_object(folder, content):
    open(os.path.join(folder, "model.safetensors.index.json"), "w").write(content)
    one_line_error(folder, r"model\.safetensors\.index\.json: expected a JSON object")


def test_index_weight_map_value_not_a_file_name(folder):
    json.dump({"weight_map": {"model.embed_tokens.weight": 1}},
              open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    one_line_error(folder, r"index\.json: weight_map\['model\.embed_tokens\.weight'\] must be a file name")


@pytest.mark.parametrize("content", ["[1, 2]", "null", "4"])
def test_config_not_an_object(folder, content):
    open(os.path.join(folder, "config.json"), "w").write(content)
    one_line_error(folder, r"config\.json: expected a JSON object")


def test_config_not_utf8(folder):
    open(os.path.join(folder, "config.json"), "wb").write(b"\xff\xfe{}")
    one_line_error(folder, r"config\.json: invalid JSON")


@pytest.mark.parametrize("key,value,match", [
    ("num_attention_heads", "4", "'num_attention_heads' must be an integer, got '4'"),
    ("hidden_size", 64.0, "'hidden_size' must be an integer, got 64.0"),
    ("num_hidden_layers", True, "'num_hidden_layers' must be an integer, got True"),
    ("num_key_value_heads", 0, "'num_key_value_heads' must be positive"),
    ("tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false, got 'false'"),
    ("rms_norm_eps", "1e-6", "'rms_norm_eps' must be a number, got '1e-6'"),
    ("eos_token_id", [2, "3"], r"'eos_token_id\[1\]' must be an integer"),
    ("architectures", "LlamaForCausalLM", "'architectures' must be a list"),
    ("rope_scaling", {"rope_type": "linear", "factor": "2"}, "'rope_scaling.factor' must be a number"),
])
def test_config_value_of_wrong_type(folder, key, value, match):
    edit_config(folder, **{key: value})
    msg = one_line_error(folder, r"config\.json: " + match)
    assert msg.count(os.path.join(folder, "config.json")) == 1


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, np.bool_])
def test_integer_tensor_is_refused(folder, dtype):
    def edit(t):
        t["model.norm.weight"] = np.ones(t["model.norm.weight"].shape, dtype)
    rewrite(folder, edit)
    one_line_error(folder, r"model\.safetensors: tensor 'model\.norm\.weight' has dtype \w+; weights must be floating")


def test_path_named_once(folder):
    """Errors re-wrapped by the loader do not repeat the file's path."""
    cfg = os.path.join(folder, "config.json")
    open(cfg, "w").write("{not json")
    assert one_line_error(folder, "invalid JSON").count(cfg) == 1
    edit_path = os.path.join(folder, "..", "nope")
    assert one_line_error(edit_path, "does not exist").count("nope") == 1
