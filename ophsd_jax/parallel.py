"""Device mesh, the one logical-axis rules table, and sharding helpers.

Parameters and activations are annotated with *logical* axis names; `RULES` maps
each to a mesh axis (or None = replicated). A dimension that is not divisible by
its mesh axes is replicated instead (e.g. SmolLM2's 3 KV heads on tensor=2), so any
model runs on any mesh; `sharding_report` shows what was actually sharded.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. One table for the whole codebase.
RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "cache_seq": None,
    "act_embed": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """Mesh over `devices` (default: all). One of the sizes may be -1 (= the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh axes {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {len(devices)} are available"
        )
    return Mesh(device_grid(sizes, devices), MESH_AXES)


def device_grid(sizes: Sequence[int], devices: Sequence) -> np.ndarray:
    """`devices` arranged in an array of shape `sizes`, one contiguous block per process.

    Read in order, the array goes process by process (each process's devices then hold
    one contiguous block of batch rows, see `batch_share`); within its block, a process's
    devices are laid out by `mesh_utils.create_device_mesh` (topology-aware on TPU, id
    order on GPU, given order on CPU). Where the processes cannot each take a block of
    that shape, the devices go in process order, plainly reshaped.
    """
    local: dict[int, list] = {}
    for d in devices:
        local.setdefault(d.process_index, []).append(d)
    groups = [local[p] for p in sorted(local)]
    blocks = process_blocks(sizes, len(groups))
    if blocks is None or len({len(g) for g in groups}) > 1:
        log.warning("mesh %s: %d processes cannot each take one block of it; devices in process order",
                    dict(zip(MESH_AXES, sizes)), len(groups))
        return np.asarray([d for g in groups for d in g], object).reshape(sizes)
    inner = [s // b for s, b in zip(sizes, blocks)]
    out = np.empty(sizes, object)
    for p, group in enumerate(groups):
        corner = np.unravel_index(p, blocks)
        out[tuple(slice(c * n, (c + 1) * n) for c, n in zip(corner, inner))] = \
            mesh_utils.create_device_mesh(inner, group, allow_split_physical_axes=True)
    return out


def process_blocks(sizes: Sequence[int], n: int) -> list[int] | None:
    """Processes along each mesh axis such that process p's block of the mesh is the p-th
    contiguous run of devices in row-major order: whole leading axes, then a divisor of
    the next one (e.g. sizes (2, 4, 1), 4 processes -> (2, 2, 1)). None if impossible."""
    out = []
    for s in sizes:
        take = s if n % s == 0 else n if s % n == 0 else None
        if take is None:
            return None
        out.append(take)
        n //= take
    return out if n == 1 else None


def single_device_mesh() -> Mesh:
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    exclude: Sequence[str] = ()) -> P:
    """Map logical axis names to a PartitionSpec; drop mesh axes that don't divide the dim
    (and the mesh axes in `exclude`: e.g. the sampling layout's weights are not fsdp-sharded)."""
    used: set[str] = set(exclude)
    out = []
    for i, name in enumerate(names):
        axes = RULES.get(name) if name is not None else None
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no entry in parallel.RULES")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis may shard only one dim
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None,
                   exclude: Sequence[str] = ()) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, exclude))


# ---- activation constraints -----------------------------------------------------------
# The model calls `constrain(x, names)`; it is a no-op unless a mesh is active, so the
# same model code runs unsharded in tests and sharded in the trainer.
_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("ophsd_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE_MESH.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh set by `activation_mesh` (None outside it)."""
    return _ACTIVE_MESH.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    mesh = _ACTIVE_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape))


def sharding_report(tree, max_lines: int = 40) -> str:
    """One line per array: path, shape, partition spec."""
    lines = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        spec = getattr(getattr(leaf, "sharding", None), "spec", None)
        lines.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {spec}")
    return "\n".join(lines[:max_lines])


# ---- multi-process (multi-host) runtime -----------------------------------------------


def _auto_multiprocess() -> bool:
    """True under a multi-task SLURM job or on a multi-host TPU slice."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start `jax.distributed` when running multi-process; returns True if it did.

    Explicit arguments (or OPHSD_COORDINATOR / OPHSD_NUM_PROCESSES / OPHSD_PROCESS_ID)
    win; otherwise SLURM jobs and multi-host TPU slices are detected and JAX reads the
    coordinator from their environment. One process per host (TPU) or per node/GPU (SLURM).
    """
    coordinator = coordinator or os.environ.get("OPHSD_COORDINATOR")
    num_processes = num_processes or int(os.environ.get("OPHSD_NUM_PROCESSES", "0")) or None
    if process_id is None and "OPHSD_PROCESS_ID" in os.environ:
        process_id = int(os.environ["OPHSD_PROCESS_ID"])
    if coordinator:
        if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU multi-process needs gloo
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif _auto_multiprocess():
        jax.distributed.initialize()
    else:
        return False
    log.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value every process holds (each places its own shards).
    An array already placed with `sharding` (e.g. built by `from_process_rows`) passes through."""
    if isinstance(host, jax.Array) and host.sharding.is_equivalent_to(sharding, host.ndim):
        return host
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def to_host(x: jax.Array) -> np.ndarray:
    """The full value on every process, also for arrays sharded across processes."""
    if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync(name: str) -> None:
    """Barrier across processes (no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---- process shares of the batch ------------------------------------------------------
# With several processes, each one handles only its own contiguous block of each batch's
# rows (its "share", `(index, count)`): it samples, runs the harness and builds the paired
# batch for those rows, and global arrays are assembled from the blocks. Small host values
# (shapes, metrics, memory-bank entries) travel with the `allgather_*` helpers. One share
# `(0, 1)` means every process handles every row (one process, or a fallback layout).


def batch_share(mesh: Mesh) -> tuple[int, int]:
    """(index, count) of this process's share of batch rows (sharded over ("data", "fsdp")).

    (process_index, process_count) when process i's devices hold exactly rows block i of
    count (`make_mesh` orders devices so they do whenever each process holds whole tensor
    groups); otherwise (0, 1): batch rows are replicated across processes (e.g. a tensor
    axis spanning processes) and every process handles every row, as with one process.
    """
    n = jax.process_count()
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if n == 1 or rows % n:
        return 0, 1
    per = rows // n
    owned: dict[int, set[int]] = {}
    for d, idx in NamedSharding(mesh, P(("data", "fsdp"))).devices_indices_map((rows,)).items():
        owned.setdefault(d.process_index, set()).update(range(rows)[idx[0]])
    if all(owned.get(p) == set(range(p * per, (p + 1) * per)) for p in range(n)):
        return jax.process_index(), n
    log.warning("batch rows are not split into one block per process on mesh %s: every process "
                "handles the whole batch", dict(mesh.shape))
    return 0, 1


def share_slice(n: int, share: tuple[int, int]) -> slice:
    """The contiguous block of `n` items that `share` takes (block sizes differ by at most 1)."""
    i, count = share
    return slice(i * n // count, (i + 1) * n // count)


def from_process_rows(local: np.ndarray, sharding: NamedSharding, share: tuple[int, int]) -> jax.Array:
    """Global array whose rows are every share's equal-sized `local` block, in share order."""
    local = np.asarray(local)
    if share[1] == 1:
        return global_array(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, (local.shape[0] * share[1], *local.shape[1:]))


def process_rows(x: jax.Array, share: tuple[int, int]) -> np.ndarray:
    """This share's block of rows of the global `x`, read from this process's own shards
    (no communication; `x`'s rows must be sharded like the batch)."""
    if share[1] == 1:
        return to_host(x)
    rows = share_slice(x.shape[0], share)
    out = np.zeros((rows.stop - rows.start, *x.shape[1:]), x.dtype)
    seen = np.zeros(out.shape, bool)
    for shard in x.addressable_shards:
        r = range(x.shape[0])[shard.index[0]]
        lo, hi = max(r.start, rows.start), min(r.stop, rows.stop)
        if lo < hi:
            dst = (slice(lo - rows.start, hi - rows.start), *shard.index[1:])
            out[dst] = np.asarray(shard.data)[lo - r.start:hi - r.start]
            seen[dst] = True
    if not seen.all():
        raise RuntimeError(f"rows {rows} of an array with sharding {x.sharding} are not on this process")
    return out


def _allgather(x: np.ndarray) -> np.ndarray:
    """[process_count, *x.shape]: every process's `x` (same shape and dtype everywhere)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def allgather_rows(x: np.ndarray) -> list[np.ndarray]:
    """Every process's `x`, in process order; the shapes may differ (same ndim >= 1 and dtype)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return [x]
    shapes = _allgather(np.asarray(x.shape, np.int32))  # agree on a padded shape first
    padded = np.zeros(shapes.max(axis=0), x.dtype)
    if padded.size == 0:
        return [np.zeros(tuple(s), x.dtype) for s in shapes]
    padded[tuple(slice(0, s) for s in x.shape)] = x
    return [g[tuple(slice(0, s) for s in shape)] for g, shape in zip(_allgather(padded), shapes)]


def allgather_json(value) -> list:
    """Every process's JSON-able `value` (small host data: metrics, texts), in process order."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    return [json.loads(part.tobytes()) for part in allgather_rows(data)]


def agree_max(values: Sequence[int]) -> list[int]:
    """Element-wise maximum over processes of an int vector of the same length everywhere."""
    values = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return values.tolist()
    return _allgather(values).max(axis=0).tolist()
