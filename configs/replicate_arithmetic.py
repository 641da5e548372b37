"""The reproduction experiment, task 1: arithmetic problems with Plan–Solve on the bundled
SmolLM2-135M-Instruct (CPU), every condition of `ophsd_jax.experiments.replicate`.

    python -m ophsd_jax.experiments.replicate --config configs/replicate_arithmetic.py --out runs/replicate_arithmetic

The embedded default's training settings, with a held-out set of 200 problems (never
trained on; the same for every run and seed: `data.split_seed`), avg@4 at temperature 0.6,
and the student evaluated alone every 8 steps. docs/results.md says what was measured.

The problems' difficulty is the config's parameter (`--config configs/replicate_arithmetic.py:mixed`):
  mixed  the embedded default's families at reasoning-gym's default sizes (chain sums of
         2-6 terms up to 4 digits, products up to 5 digits, GSM-style word problems);
  small  chain sums of 2-3 terms and products, each number of 1-2 digits;
  tiny   chain sums of 2 terms of 1-2 digits (sums and differences only).
It was chosen on a development set, not on the held-out one: the same generator with
`--config.data.train.seed=1` and 64 held-out problems (docs/results.md, "Difficulty").
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from smollm2_arithmetic import get_config as embedded  # noqa: E402

LEVELS = {
    "mixed": {"families": ["products", "chain_sum", "gsm_symbolic"], "options": {}},
    "small": {"families": ["chain_sum", "products"],
              "options": {"chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
                          "products": {"min_digits": 1, "max_digits": 2}}},
    "tiny": {"families": ["chain_sum"],
             "options": {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}}},
}


def get_config(level: str = "mixed"):
    if level not in LEVELS:
        raise ValueError(f"configs/replicate_arithmetic.py: unknown difficulty {level!r}; choose from {list(LEVELS)}")
    c = embedded()
    c.data.train = {"kind": "reasoning_gym", "size": 1000, "seed": 0, **LEVELS[level]}
    c.data.validation_size = 200
    c.data.split_seed = 0
    c.eval.num_examples = 200
    c.eval.k = 4
    c.eval.temperature = 0.6
    c.train.eval_every = 8
    c.train.save_every = 8
    return c
