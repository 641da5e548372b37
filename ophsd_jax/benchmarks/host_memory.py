"""Peak host memory (RSS) of a training run, by phase.

    python -m ophsd_jax.benchmarks.host_memory --config configs/smollm2_arithmetic.py \
        --workdir /tmp/mem --config.train.steps=4 --config.eval.num_examples=16

Runs the trainer in this process (same flags as `python -m ophsd_jax.train`) while a
thread reads the process's RSS every 50 ms and labels it with the phase the trainer is in
(setup, each evaluation, generate, update, checkpoint save, other); prints the peak of
each phase, the kernel's own high-water mark (VmHWM, what `/usr/bin/time -v` reports as
"Maximum resident set size") and the CPU model. Bytes are comparable across runs on a
shared host; the seconds are not. docs/benchmarks.md has its results.
"""

from __future__ import annotations

import contextlib
import json
import runpy
import sys
import threading
import time
from collections import defaultdict

from ophsd_jax import metrics
from ophsd_jax import run as run_mod
from ophsd_jax.benchmarks.common import cpu_model


def _status_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


class PhaseMemory:
    """Peak RSS per phase label, sampled by a daemon thread."""

    def __init__(self, interval: float = 0.05):
        self.phase = "setup"
        self.peaks: dict[str, float] = defaultdict(float)
        self.order: list[str] = []
        self._interval = interval
        threading.Thread(target=self._sample, daemon=True).start()

    def _record(self, phase: str) -> None:
        rss = _status_gb("VmRSS")
        if phase not in self.peaks:
            self.order.append(phase)
        self.peaks[phase] = max(self.peaks[phase], rss)

    def _sample(self):
        while True:
            self._record(self.phase)
            time.sleep(self._interval)

    @contextlib.contextmanager
    def labelled(self, phase: str):
        self.phase = phase
        self._record(phase)  # also at entry and exit: a phase shorter than the interval still shows
        try:
            yield
        finally:
            self._record(phase)
            self.phase = "other"

    def instrument(self) -> None:
        """Label the trainer's phases: PhaseTimer's (generate, update, ...), evaluations, saves."""
        timer_call, evaluate, save = metrics.PhaseTimer.__call__, run_mod.Run.evaluate, run_mod.Run.save
        mem = self

        @contextlib.contextmanager
        def timed(timer, name):
            with mem.labelled(name), timer_call(timer, name):
                yield

        def labelled_evaluate(run, step):
            with mem.labelled(f"evaluation @ {step}"):
                return evaluate(run, step)

        def labelled_save(run, step, *args, **kwargs):
            with mem.labelled("checkpoint save"):
                return save(run, step, *args, **kwargs)

        metrics.PhaseTimer.__call__ = timed
        run_mod.Run.evaluate = labelled_evaluate
        run_mod.Run.save = labelled_save

    def report(self) -> dict:
        time.sleep(2 * self._interval)
        return {"cpu": cpu_model(), "peak_rss_gb_by_phase": {p: round(self.peaks[p], 3) for p in self.order},
                "peak_rss_gb": round(_status_gb("VmHWM"), 3)}


def main() -> None:
    mem = PhaseMemory()
    mem.instrument()
    sys.argv[0] = "ophsd_jax.train"
    try:
        runpy.run_module("ophsd_jax.train", run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    print(json.dumps(mem.report(), indent=2))


if __name__ == "__main__":
    main()
