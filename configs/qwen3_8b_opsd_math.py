"""The OPSD baseline on the paper's math setting: same trainer and hyper-parameters as
`qwen3_8b_math.py`; the teacher context is problem + reference solution + an
instruction to understand it and solve in its own way (no model call).

    python -m ophsd_jax.train --config configs/qwen3_8b_opsd_math.py --config.model.path=... \
        --config.data.train.path=...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qwen3_8b_math import paper_config  # noqa: E402


def get_config():
    c = paper_config("math", "math_json", prompt_len=4096, response_len=8192, teacher_total=12288)
    c.harness.name = "opsd"
    c.harness.options = {"generate": False}
    return c
