"""The reproduction experiment, task 1: arithmetic word problems with Plan–Solve on the
bundled SmolLM2-135M-Instruct (CPU), every condition of `ophsd_jax.experiments.replicate`.

    python -m ophsd_jax.experiments.replicate --config configs/replicate_arithmetic.py --out runs/replicate_arithmetic

The embedded default's training settings, with a held-out set of 200 problems (never
trained on; the same for every run and seed: `data.split_seed`), avg@4 at temperature 0.6,
and the student evaluated alone every 8 steps. docs/results.md says what was measured.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from smollm2_arithmetic import get_config as embedded  # noqa: E402


def get_config():
    c = embedded()
    c.data.train = {"kind": "reasoning_gym", "size": 1000, "seed": 0,
                    "families": ["products", "chain_sum", "gsm_symbolic"]}
    c.data.validation_size = 200
    c.data.split_seed = 0
    c.eval.num_examples = 200
    c.eval.k = 4
    c.eval.temperature = 0.6
    c.train.eval_every = 8
    c.train.save_every = 8
    return c
