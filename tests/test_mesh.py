"""Device order of `parallel.make_mesh` on TPU slices, described deviceless by libtpu on
this CPU machine (the compile-only extras, installed by `scripts/setup.sh --test`).

On one host the mesh is `mesh_utils.create_device_mesh`'s topology-aware layout. On a
multi-host slice each process's devices are one contiguous block of the mesh (what
`parallel.batch_share` needs), laid out within the block by `create_device_mesh`.
"""

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils

from ophsd_jax import parallel

cc = pytest.importorskip("ophsd_jax.compile_check")  # also sets TPU_SKIP_MDS_QUERY before libtpu starts


@pytest.fixture(autouse=True)
def trainer_imports(monkeypatch):
    # In the trainer nothing imports jax.experimental.mesh_utils (only this test module
    # does): `make_mesh` must not depend on the attribute being there.
    monkeypatch.delattr(jax.experimental, "mesh_utils", raising=False)


def tpu_devices(name):
    try:
        return cc.target_devices(cc.TARGETS[name])
    except RuntimeError as e:
        pytest.fail(f"deviceless {name} topology unavailable: {e}")


def ids(devices) -> list[int]:
    return [d.id for d in np.asarray(devices).flat]


@pytest.mark.parametrize("sizes", [(1, 4, 1), (2, 2, 1), (1, 2, 2), (1, 1, 4)])
def test_one_host_tpu_mesh_is_the_topology_aware_layout(sizes):
    devices = tpu_devices("v5p-8")  # 4 chips, one host
    assert all(d.platform == "tpu" for d in devices)
    ref = mesh_utils.create_device_mesh(sizes, devices)
    assert ids(parallel.make_mesh(*sizes, devices=devices).devices) == ids(ref)


def test_the_topology_aware_layout_is_not_plain_device_order():
    # Otherwise the test above could not tell the two apart.
    devices = tpu_devices("v5p-8")
    assert ids(mesh_utils.create_device_mesh((1, 4, 1), devices)) != ids(devices)


@pytest.mark.parametrize("sizes", [(1, 32, 1), (2, 16, 1), (8, 4, 1), (1, 16, 2), (2, 8, 2), (1, 8, 4)])
def test_multi_host_tpu_mesh_is_one_topology_aware_block_per_process(sizes, monkeypatch):
    devices = tpu_devices("v5p-64")  # 32 chips, 8 hosts of 4
    n = 1 + max(d.process_index for d in devices)
    assert n == 8
    mesh = parallel.make_mesh(*sizes, devices=devices)
    per = len(devices) // n
    flat = list(mesh.devices.flat)
    assert sorted(ids(flat)) == sorted(ids(devices))
    for p in range(n):
        local = [d for d in devices if d.process_index == p]
        # Read in order, the mesh goes process by process...
        assert {d.process_index for d in flat[p * per:(p + 1) * per]} == {p}
        # ...and p's devices fill a box of the mesh, laid out as create_device_mesh lays them out.
        where = np.argwhere(np.vectorize(lambda d: d.process_index == p)(mesh.devices))
        lo, hi = where.min(axis=0), where.max(axis=0) + 1
        box = mesh.devices[tuple(slice(a, b) for a, b in zip(lo, hi))]
        assert box.size == per
        assert ids(box) == ids(mesh_utils.create_device_mesh(box.shape, local))
        # Each process then owns its own block of batch rows.
        monkeypatch.setattr(jax, "process_count", lambda: n)
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        assert parallel.batch_share(mesh) == (p, n)


def test_tensor_axis_across_hosts_keeps_process_blocks_and_replicates_rows(monkeypatch):
    devices = tpu_devices("v5p-64")
    mesh = parallel.make_mesh(1, 2, 16, devices=devices)  # a tensor group spans 4 hosts
    procs = [d.process_index for d in mesh.devices.flat]
    assert procs == sorted(procs)
    monkeypatch.setattr(jax, "process_count", lambda: 8)
    assert parallel.batch_share(mesh) == (0, 1)  # rows are replicated: every process takes them all
