"""The OPSD baseline's own recipe: LoRA adapters (rank 64, alpha 128) on every attention
and MLP projection of Qwen3-8B, the base model with the adapter switched off as the fixed
teacher. Otherwise the settings of `qwen3_8b_opsd_math.py`.

    python -m ophsd_jax.train --config configs/qwen3_8b_opsd_math_lora.py --config.model.path=... \
        --config.data.train.path=...

Only the adapter (~175M parameters) gets gradients and Adam moments; the frozen base is
kept in bf16 (it never receives an update, so no fp32 master copy) and is also the
teacher: no second copy of the weights. The learning rate (1e-5, 10x the full
fine-tuning one) is this project's choice for adapters, not taken from the recipe.
Memory per device: docs/scaling.md (compile_check).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qwen3_8b_opsd_math import get_config as opsd_config  # noqa: E402


def get_config():
    c = opsd_config()
    c.lora.rank = 64
    c.lora.alpha = 128.0
    c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
    c.model.param_dtype = "bfloat16"  # the frozen base; the adapter is float32 (lora.dtype)
    c.distill.teacher = "initial"  # = the base with the adapter off
    c.optim.learning_rate = 1e-5
    return c
