"""sampler.weights="decode": the sampler reads a compute-dtype copy of the current weights,
not fsdp-sharded, made after each update (configs/tiny.py on the 8 test devices, fsdp=8)."""

import importlib.util
import pathlib

import jax
import numpy as np

from ophsd_jax import train
from ophsd_jax.models.state import flat_names
from ophsd_jax.run import Run


def tiny_config():
    spec = importlib.util.spec_from_file_location("tiny", pathlib.Path(__file__).parents[1] / "configs" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny.get_config()


def test_decode_layout_weights_equal_the_training_weights_after_each_update(tmp_path, monkeypatch):
    c = tiny_config()
    c.train.steps, c.train.batch_size, c.train.eval_before = 2, 8, False
    c.model.dtype = "bfloat16"  # the copy is in the compute dtype; the training params stay float32
    c.sampler.weights = "decode"
    seen = []
    original = Run.sample_params

    def checked(self):
        copy = original(self)
        trained, sampled = flat_names(self.state.params), flat_names(copy)
        assert trained.keys() == sampled.keys()
        for name, var in trained.items():
            x, y = var.get_value(), sampled[name].get_value()
            assert y.dtype == jax.numpy.bfloat16 and x.dtype == np.float32
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x.astype(y.dtype)))  # an exact cast
            assert "fsdp" not in jax.tree.leaves(tuple(y.sharding.spec))  # not fsdp-sharded
        # the training layout does shard over fsdp (so the copy really is another layout)
        assert any("fsdp" in jax.tree.leaves(tuple(v.get_value().sharding.spec)) for v in trained.values())
        seen.append((self.step, {k: np.asarray(v.get_value()) for k, v in trained.items()}))
        return copy

    monkeypatch.setattr(Run, "sample_params", checked)
    monkeypatch.setattr(Run, "evaluate", lambda self, step: {})
    train.train(c, str(tmp_path))
    assert [step for step, _ in seen] == [0, 1]  # once per step, after each update
    assert any(not np.array_equal(seen[0][1][k], seen[1][1][k]) for k in seen[0][1])  # the update changed them
