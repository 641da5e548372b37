"""Orbax checkpoints of a training run: train state + host-side state (JSON + arrays).

One directory per step under `<workdir>/checkpoints/`. Orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save never looks
like a checkpoint. `restore_latest` walks back from the newest step when a checkpoint
cannot be read (truncated or corrupt files), reporting each one it skips; a checkpoint
that reads but does not fit the run (the config changed a shape, a dtype or the model) is
an error instead (`IncompatibleCheckpoint`), checked before anything is restored. The
mesh is not part of a checkpoint: Orbax reshards each array onto the target's sharding.

Saved per step:
  state  - TrainState (params, optimizer state, step) with its shardings
  host   - JSON: data-iterator position, RNG seed/key data, harness state (texts,
           labels), anything the trainer needs to continue exactly
  arrays - numpy arrays of host state (e.g. memory-bank embeddings), never pickled
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class IncompatibleCheckpoint(ValueError):
    """A readable checkpoint that this run cannot continue: its config changed a leaf's
    shape or dtype, the state's tree, or the model the weights belong to."""


def _state_handler() -> ocp.StandardCheckpointHandler:
    """Orbax's standard handler, writing without compression: zstd's buffers held ~0.8x
    the state in RSS during a save (1.06 GB for 1.27 GB of fp32 weights, which compress by
    ~8%; docs/benchmarks.md). Reads any checkpoint as before. The handler's
    type stays Orbax's own, which its save/restore args are registered with."""
    handler = ocp.StandardCheckpointHandler()
    handler._impl = ocp.PyTreeCheckpointHandler(use_compression=False)  # what the handler delegates to
    return handler


class CheckpointManager:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        # Handlers named up front, so that a checkpoint's metadata can be read before any restore.
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": _state_handler(), "host": ocp.JsonCheckpointHandler(),
            "arrays": ocp.PyTreeCheckpointHandler()})
        # Orbax removes unfinished saves' temp dirs in a background thread. Waited for here:
        # a run that fails early would otherwise leave it running, and at interpreter exit it
        # dies with a traceback under the run's one-line error.
        await_cleanup = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state, host: dict, arrays: dict[str, np.ndarray] | None = None,
             force: bool = True) -> None:
        """Start an (async) save; `wait()` or the next save finishes it."""
        # Orbax cannot save an empty tree or zero-size arrays: keep a 1-element placeholder.
        arrays = {k: np.asarray(v) for k, v in (arrays or {}).items() if np.size(v)} or \
            {"_empty": np.zeros((1,), np.float32)}
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            host=ocp.args.JsonSave(host),
            arrays=ocp.args.PyTreeSave(arrays),
        ), force=force)

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict[str, np.ndarray]]:
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            host=ocp.args.JsonRestore(),
            arrays=ocp.args.PyTreeRestore(),
        ))
        arrays = {k: np.asarray(v) for k, v in dict(out["arrays"]).items() if k != "_empty"}
        return out["state"], dict(out["host"]), arrays

    def restore_latest(self, abstract_state, *, max_step: int | None = None, model: dict | None = None):
        """(step, state, host, arrays) from the newest readable checkpoint, or None.

        An unreadable checkpoint (truncated, corrupt, partly written) is reported and the
        previous one tried. A readable one that does not fit `abstract_state` (leaf names,
        shapes, dtypes) or whose host state names another `model` raises
        IncompatibleCheckpoint: that is a changed config, and the older checkpoints of the
        same run would not fit either.
        """
        for step in reversed(self.steps()):
            if max_step is not None and step > max_step:
                continue
            try:  # metadata and host JSON only: cheap, and enough to tell a changed config
                saved = _array_leaves(self._mngr.item_metadata(step)["state"].tree)
                host = dict(self._mngr.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))["host"])
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to an older one
                self._skip(step, e)
                continue
            problem = _model_mismatch(host.get("model"), model) or \
                _leaf_mismatch(saved, _array_leaves(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True)))
            if problem:
                raise IncompatibleCheckpoint(f"checkpoint {self.directory}/{step} does not fit this config: {problem} "
                                             "(resume with the config it was saved with, or use another work dir)")
            try:
                state, host, arrays = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - e.g. truncated array files
                self._skip(step, e)
                continue
            return step, state, host, arrays
        return None

    def _skip(self, step: int, e: Exception) -> None:
        log.warning("checkpoint %s/%d is unreadable (%s: %s); trying the previous one",
                    self.directory, step, type(e).__name__, (str(e).splitlines() or [""])[0][:200])

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def _array_leaves(tree) -> dict[str, tuple[tuple, str]]:
    """{"params.layers.wq": (shape, dtype)} for the arrays of a (serialized) state tree."""
    flat = ocp.tree.to_flat_dict(tree, sep=".")
    return {k.removesuffix(".value"): (tuple(v.shape), str(np.dtype(v.dtype))) for k, v in flat.items()
            if hasattr(v, "shape") and hasattr(v, "dtype")}


def _leaf_mismatch(saved: dict, expected: dict, most: int = 3) -> str | None:
    def show(leaf):
        return f"{leaf[0]} {leaf[1]}"

    problems = [f"{k} is {show(saved[k])} in the checkpoint, {show(expected[k])} in this run"
                for k in sorted(saved.keys() & expected.keys()) if saved[k] != expected[k]]
    problems += [f"{k} is only in the checkpoint" for k in sorted(saved.keys() - expected.keys())]
    problems += [f"{k} is not in the checkpoint" for k in sorted(expected.keys() - saved.keys())]
    if not problems:
        return None
    more = f" (and {len(problems) - most} more)" if len(problems) > most else ""
    return "; ".join(problems[:most]) + more


def _model_mismatch(saved: dict | None, expected: dict | None) -> str | None:
    if saved is None or expected is None:  # checkpoints from before the model was recorded
        return None
    diff = [f"{k}={saved.get(k)!r} in the checkpoint, {expected.get(k)!r} in this run"
            for k in sorted(saved.keys() | expected.keys()) if saved.get(k) != expected.get(k)]
    return "model " + "; ".join(diff) if diff else None


def abstract_like(tree):
    """ShapeDtypeStructs with the shardings of `tree` (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


_ARRAY_REF = "__array__"


def split_arrays(tree, prefix: str = ""):
    """Nested dict/list state -> (JSON-able tree with array references, {key: ndarray})."""
    arrays: dict[str, np.ndarray] = {}

    def walk(x, path):
        if isinstance(x, np.ndarray):
            arrays[path] = x
            return {_ARRAY_REF: path}
        if isinstance(x, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        return x

    return walk(tree, prefix), arrays


def join_arrays(tree, arrays: dict[str, np.ndarray]):
    """Inverse of `split_arrays`."""
    if isinstance(tree, dict):
        if set(tree) == {_ARRAY_REF}:
            return arrays[tree[_ARRAY_REF]]
        return {k: join_arrays(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_arrays(v, arrays) for v in tree]
    return tree
