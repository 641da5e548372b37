"""The paper's LawBench setting: Qwen3-8B, Draft–Verify over an online memory bank of
labelled cases, reward = set-F1 over accusations.

    python -m ophsd_jax.train --config configs/qwen3_8b_lawbench.py --config.model.path=... \
        --config.data.train.path=/path/to/cail_train.json

Case facts are long and the verify prompt carries up to 10 retrieved cases (clipped to
400 characters each): prompts up to 4096 tokens, responses up to 2048, teacher context +
response up to 8192.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qwen3_8b_math import DRAFT_VERIFY, paper_config  # noqa: E402


def get_config():
    c = paper_config("lawbench", "lawbench_json", prompt_len=4096, response_len=2048, teacher_total=8192)
    c.harness.name = "draft_verify"
    c.harness.options = DRAFT_VERIFY
    return c
