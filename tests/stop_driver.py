"""`python -m ophsd_jax.train` for the SIGTERM tests in tests/test_trainer.py, with a slow phase.

With OPHSD_TEST_SLOW=<phase>:<step> (phase: rollout or eval), that phase of that step
(1-based; for eval, the evaluation after that many updates) becomes long: it writes the
file OPHSD_TEST_MARKER, then repeats the phase's real work (the same call, which gives
the same result every time) OPHSD_TEST_SLOW_REPEATS times (default: practically forever).
A stand-in for the minutes a rollout or an evaluation takes at the paper's lengths; like
a long generation, every repetition goes through the sampler. The result is that of one
call, so a run through this driver trains exactly like the plain CLI. A fixed count, not
a duration, so that processes of a multi-process run repeat the collective calls alike.
"""

import os
import runpy

from ophsd_jax.run import Run
from ophsd_jax.sampling import Sampler

PHASE, STEP = os.environ["OPHSD_TEST_SLOW"].split(":")
STEP = int(STEP)
REPEATS = int(os.environ.get("OPHSD_TEST_SLOW_REPEATS", "1000000"))
_next_examples, _generate, _evaluate = Run.next_examples, Sampler.generate, Run.evaluate
state = {}


def slow(fn, *args, **kwargs):
    with open(os.environ["OPHSD_TEST_MARKER"], "w") as f:
        f.write(f"{PHASE} {STEP}\n")
    out = fn(*args, **kwargs)
    for _ in range(REPEATS):
        out = fn(*args, **kwargs)
    return out


def next_examples(self):
    state["rollout_of_step"] = self.step + 1  # the next generation is this step's rollout
    return _next_examples(self)


def generate(self, *args, **kwargs):
    step = state.pop("rollout_of_step", None)
    if PHASE == "rollout" and step == STEP:
        return slow(_generate, self, *args, **kwargs)
    return _generate(self, *args, **kwargs)


def evaluate(self, step):
    if PHASE == "eval" and step == STEP:
        return slow(_evaluate, self, step)
    return _evaluate(self, step)


Run.next_examples, Sampler.generate, Run.evaluate = next_examples, generate, evaluate

if __name__ == "__main__":
    runpy.run_module("ophsd_jax.train", run_name="__main__", alter_sys=True)
