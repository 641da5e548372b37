"""The sharded forward on 8 simulated CPU devices equals the single-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import tolerances as tol
from hf_reference import make_hf_model, ragged_batch, save_hf_model
from ophsd_jax import parallel
from ophsd_jax.models import state as S
from ophsd_jax.models.config import ModelConfig
from ophsd_jax.models.weights import load_hf


def run_forward(graphdef, params, tokens, mask, mesh):
    batch_sh = parallel.named_sharding(mesh, ("batch", "seq"), tokens.shape)
    t = jax.device_put(jnp.asarray(tokens, jnp.int32), batch_sh)
    m = jax.device_put(jnp.asarray(mask, jnp.int32), batch_sh)

    @jax.jit
    def f(params, t, m):
        with parallel.activation_mesh(mesh):
            h, _ = S.forward(graphdef, params, t, S.positions_from_mask(m), m)
            return S.logits(graphdef, params, h)

    return f(params, t, m)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sharded_forward_equals_single_device(family, tmp_path):
    assert jax.device_count() == 8, "conftest must force 8 CPU devices"
    path = save_hf_model(make_hf_model(family, tie_word_embeddings=False), tmp_path / "m")
    tokens, mask = ragged_batch(320, [30, 11, 25, 7], seed=4)

    cfg, g1, p1 = load_hf(path, parallel.single_device_mesh())
    ref = np.asarray(run_forward(g1, p1, tokens, mask, parallel.single_device_mesh()))

    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    _, g8, p8 = load_hf(path, mesh)
    specs = {name: var.get_value().sharding.spec for name, var in S.flat_names(p8).items()}
    assert specs["layers.wq"] == P(None, "fsdp", "tensor", None)
    assert specs["layers.w_down"] == P(None, "tensor", "fsdp")
    assert specs["embed"] == P("tensor", "fsdp")
    assert specs["lm_head"] == P("fsdp", "tensor")
    wq = S.flat_names(p8)["layers.wq"].get_value()
    assert {s.data.shape for s in wq.addressable_shards} == {(cfg.num_layers, 32, 2, cfg.head_dim)}
    out = run_forward(g8, p8, tokens, mask, mesh)
    assert out.sharding.spec[0] == ("data", "fsdp")  # batch really is split over devices
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=tol.logits_atol(cfg, g1, p1, tokens.shape[1]))


def test_random_init_is_born_sharded():
    cfg = ModelConfig.tiny("qwen2")
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    _, params = S.init_params(cfg, mesh, seed=0)
    w_up = S.flat_names(params)["layers.w_up"].get_value()
    assert w_up.sharding.spec == P(None, "fsdp", "tensor")
    assert len(w_up.addressable_shards) == 8
    assert w_up.addressable_shards[0].data.shape == (cfg.num_layers, cfg.hidden_size // 2, cfg.intermediate_size // 2)


def test_non_divisible_dims_are_replicated():
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    # 3 KV heads (SmolLM2) cannot be split over tensor=2: that dim stays whole.
    assert parallel.logical_to_spec(("embed", "kv_heads", "head_dim"), (576, 3, 64), mesh) == P("fsdp", None, None)
    assert parallel.logical_to_spec(("batch", "seq"), (6, 9), mesh) == P(None, None)
    assert parallel.logical_to_spec(("batch", "seq"), (8, 9), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(KeyError, match="no_such_axis"):
        parallel.logical_to_spec(("no_such_axis",))
    with pytest.raises(ValueError, match="needs 12 devices"):
        parallel.make_mesh(data=3, fsdp=2, tensor=2)
