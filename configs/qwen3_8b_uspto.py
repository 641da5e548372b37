"""The paper's USPTO-50K setting: Qwen3-8B, Draft–Verify over an online memory bank of
labelled reactions (classes 1-10), reward = exact match of the class.

    python -m ophsd_jax.train --config configs/qwen3_8b_uspto.py --config.model.path=... \
        --config.data.train.path=/path/to/uspto_train.csv

Reaction SMILES are short: prompts up to 1024 tokens, responses up to 2048, teacher
context + response up to 6144.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qwen3_8b_math import DRAFT_VERIFY, paper_config  # noqa: E402


def get_config():
    c = paper_config("uspto", "uspto_csv", prompt_len=1024, response_len=2048, teacher_total=6144)
    c.harness.name = "draft_verify"
    c.harness.options = DRAFT_VERIFY
    return c
