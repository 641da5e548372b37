"""The reproduction experiment, task 2: USPTO reaction classes with Draft–Verify on the
bundled SmolLM2-135M-Instruct (CPU), every condition of `ophsd_jax.experiments.replicate`.

    python -m ophsd_jax.experiments.replicate --config configs/replicate_uspto.py --out runs/replicate_uspto

`smollm2_uspto.py`'s settings, with 200 of the file's 683 reactions held out (the same
split for every run: `data.split_seed`) and the other 483 for training (the Draft–Verify
bank at evaluation holds the training split only), avg@4 at temperature 0.6, the student
evaluated alone every 8 steps, only tagged answers scored (`task_options.tagged_only`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from smollm2_uspto import get_config as uspto  # noqa: E402


def get_config():
    c = uspto()
    c.data.validation_size = 200
    c.data.split_seed = 0
    # Only a tagged [class]N<eoa> answer counts: the base model recites the class list and
    # the task's bare-number fallback reads the cut-off "9." as an answer (docs/results.md).
    c.task_options.tagged_only = True
    c.eval.num_examples = 200
    c.eval.k = 4
    c.eval.temperature = 0.6
    c.train.eval_every = 8
    c.train.save_every = 8
    return c
