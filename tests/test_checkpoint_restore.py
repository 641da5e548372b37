"""CheckpointManager: a train state saved on one mesh restores bit for bit onto another
(1 device -> 8 devices, 8 -> 1, fsdp -> data x fsdp); a checkpoint saved for other shapes,
dtypes or another model is an IncompatibleCheckpoint error (never skipped for an older
one); an unreadable newest checkpoint falls back to the previous one."""

import glob
import os
import sys

import jax
import numpy as np
import pytest

from ophsd_jax import parallel, runtime
from ophsd_jax.checkpointing import CheckpointManager, IncompatibleCheckpoint, abstract_like
from ophsd_jax.distill.step import init_train_state

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
from tiny import get_config  # noqa: E402

MODEL = {"source": "random", "family": "llama"}


def train_state(mesh, **random):
    """configs/tiny.py's train state on `mesh`, every leaf filled with distinct random values
    (so a restore that mixed up shards or leaves could not pass by chance)."""
    c = get_config()
    c.model.random.update(random)
    _, _, params, _ = runtime.load_model(c, mesh)
    state = init_train_state(params, runtime.optimizer(c), mesh)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(0)
    filled = [jax.device_put((rng.standard_normal(x.shape) * 100).astype(x.dtype), x.sharding) for x in leaves]
    return jax.tree.unflatten(treedef, filled)


def mesh_of(devices, data=1):
    return parallel.make_mesh(data, -1, 1, devices=jax.devices()[:devices])


def host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("saved_on,restored_on", [((1, 1), (8, 1)), ((8, 1), (1, 1)), ((8, 1), (8, 2))],
                         ids=["1_to_8", "8_to_1", "fsdp8_to_data2xfsdp4"])
def test_restore_onto_another_mesh_is_bitwise(tmp_path, saved_on, restored_on):
    saved = train_state(mesh_of(*saved_on))
    ckpt = CheckpointManager(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(3, saved, {"model": MODEL}, {})
    ckpt.close()

    target_mesh = mesh_of(*restored_on)
    target = abstract_like(train_state(target_mesh))
    step, state, host_state, _ = CheckpointManager(str(tmp_path / "ckpt")).restore_latest(target, model=MODEL)
    assert step == 3 and host_state["model"] == MODEL
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim) and got.sharding.mesh == target_mesh
    for got, want in zip(host(state), host(saved)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """Checkpoints 1 and 2 of a tiny train state on 8 devices."""
    directory = str(tmp_path_factory.mktemp("ckpt"))
    ckpt = CheckpointManager(directory, async_save=False)
    state = train_state(mesh_of(8))
    for step in (1, 2):
        ckpt.save(step, state, {"model": MODEL}, {})
    ckpt.close()
    return directory, state


def test_a_changed_shape_names_the_leaf_and_both_shapes(saved_run):
    directory, _ = saved_run
    target = abstract_like(train_state(mesh_of(8), intermediate_size=96))
    with pytest.raises(IncompatibleCheckpoint) as e:
        CheckpointManager(directory).restore_latest(target, model=MODEL)
    msg = str(e.value)
    assert "\n" not in msg and f"checkpoint {directory}/2 does not fit" in msg
    # The first mismatching leaf in name order, with both shapes and dtypes.
    assert "opt_state.inner_state.1.0.mu.layers.w_down is (2, 128, 64) float32 in the checkpoint, " \
           "(2, 96, 64) float32 in this run" in msg
    assert "more)" in msg  # the other changed leaves are counted


def test_a_changed_dtype_names_it(saved_run):
    directory, state = saved_run
    target = abstract_like(state)
    target = target._replace(params=jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, np.dtype("float16"), sharding=a.sharding), target.params))
    with pytest.raises(IncompatibleCheckpoint, match=r"params\.embed is \(49152, 64\) float32 in the checkpoint, "
                                                     r"\(49152, 64\) float16 in this run"):
        CheckpointManager(directory).restore_latest(target, model=MODEL)


def test_another_model_with_the_same_shapes_is_named(saved_run):
    directory, state = saved_run
    other = {**MODEL, "family": "qwen2-like", "rope_theta": 1e6}
    with pytest.raises(IncompatibleCheckpoint, match=r"model family='llama' in the checkpoint, 'qwen2-like' in "
                                                     r"this run; rope_theta=None in the checkpoint, 1000000.0"):
        CheckpointManager(directory).restore_latest(abstract_like(state), model=other)


def test_an_unreadable_newest_checkpoint_falls_back(saved_run, tmp_path, caplog):
    import shutil

    directory = str(tmp_path / "ckpt")
    shutil.copytree(saved_run[0], directory)
    for path in glob.glob(os.path.join(directory, "2", "state", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(max(os.path.getsize(path) // 2, 1))
    step, state, _, _ = CheckpointManager(directory).restore_latest(abstract_like(saved_run[1]), model=MODEL)
    assert step == 1 and "checkpoint %s/2 is unreadable" % directory in caplog.text
    for got, want in zip(host(state), host(saved_run[1])):
        np.testing.assert_array_equal(got, want)


def test_the_temp_dir_cleanup_is_done_when_the_manager_exists(tmp_path, monkeypatch):
    """Orbax cleans up unfinished saves in a background thread; left running when a run
    fails early, it died at interpreter exit with a traceback under the one-line error.
    A slow cleanup must have finished (and removed the unfinished save) by the time the
    manager is made."""
    import asyncio

    from orbax.checkpoint._src.path import temporary_paths

    real = temporary_paths.cleanup_temporary_paths
    done = []

    async def slow_cleanup(*args, **kwargs):
        await asyncio.sleep(1.0)
        await real(*args, **kwargs)
        done.append(True)

    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_cleanup)
    unfinished = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
    unfinished.mkdir(parents=True)
    manager = CheckpointManager(str(tmp_path / "checkpoints"))
    try:
        assert done == [True]
        assert not unfinished.exists()
    finally:
        manager.close()


def test_the_state_is_written_uncompressed(tmp_path):
    """Compression's buffers held ~0.8x the state in RSS during a save, for 8% of disk on
    trained weights: the state is written as its raw bytes. Zeros, which any
    compressor would shrink to nearly nothing, must take their full size on disk."""
    mesh = mesh_of(1)
    state = jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding), train_state(mesh))
    raw = sum(x.nbytes for x in jax.tree.leaves(state))
    ckpt = CheckpointManager(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(1, state, {"model": MODEL}, {})
    ckpt.close()
    on_disk = sum(os.path.getsize(p) for p in glob.glob(str(tmp_path / "ckpt" / "1" / "state" / "**"), recursive=True)
                  if os.path.isfile(p))
    assert on_disk >= raw, (on_disk, raw)
    _, restored, _, _ = CheckpointManager(str(tmp_path / "ckpt")).restore_latest(abstract_like(state), model=MODEL)
    for got in host(restored):
        assert not got.any()
