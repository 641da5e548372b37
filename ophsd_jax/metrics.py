"""Run logging: per-step metrics as JSONL and TensorBoard events, a progress bar, and
phase timers. Only process 0 writes (multi-host safe)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict

import jax
import numpy as np


def _scalar(v):
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, float, np.integer, np.floating)) or (hasattr(v, "shape") and np.ndim(v) == 0):
        return float(v)
    return None


def scalars(metrics: dict) -> dict[str, float]:
    """The scalar entries of `metrics` as floats (what a metrics row holds)."""
    return {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}


def logged_steps(workdir: str) -> set[int]:
    """Steps that have a row in `<workdir>/metrics.jsonl` (none if it does not exist)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return set()
    steps = set()
    with open(path) as f:
        for line in f:
            try:
                steps.add(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError, TypeError):  # e.g. a line cut short by a kill
                continue
    return steps


def _import_tensorboardx():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch, when
    installed, only to recognise torch tensors (we log floats), and torch adds ~0.2 GB to
    the trainer's resident memory. Blocked only while tensorboardX loads, and only if
    nothing has imported torch already."""
    import sys

    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            try:
                SummaryWriter = _import_tensorboardx()
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional; JSONL always works
                self._tb = None

    def write(self, step: int, metrics: dict) -> dict:
        """Write the scalar metrics of one step; returns them as floats."""
        flat = scalars(metrics)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in flat.items()}})
                        + "\n")
            if self._tb is not None:
                for k, v in flat.items():
                    self._tb.add_scalar(k.replace("@", "_at_"), v, step)  # TensorBoard forbids "@"
                self._tb.flush()
        return flat

    def close(self):
        if self._tb is not None:
            self._tb.close()


class PhaseTimer:
    """Wall time per phase (rollout / harness / update / eval ...) for the current step."""

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    def report(self) -> dict:
        total = sum(self.seconds.values()) or 1.0
        out = {f"time/{k}_s": v for k, v in self.seconds.items()}
        out.update({f"time/{k}_share": v / total for k, v in self.seconds.items()})
        out["time/step_s"] = total
        return out

    def reset(self):
        self.seconds.clear()


def progress_bar(total: int, initial: int = 0, desc: str = "train"):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0)
