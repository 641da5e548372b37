"""A tiny random model for tests: every part of the loop runs in seconds on a CPU.

    python -m ophsd_jax.train --config configs/tiny.py --workdir /tmp/tiny
"""

from ophsd_jax.config import base_config


def get_config():
    c = base_config()
    c.model.source = "random"  # 2 layers, width 64, with the bundled SmolLM2 tokenizer
    c.data.train = {"kind": "reasoning_gym", "size": 40, "seed": 0, "families": ["chain_sum"]}
    c.data.validation_size = 8
    c.harness.name = "plan_solve"
    c.harness.options = {"use_gt": True, "plan_max_tokens": 8, "solve_max_tokens": 8}
    c.rollout.max_new_tokens = 8
    c.distill.student_buckets = (128, 256)
    c.distill.teacher_buckets = (256, 512, 1024)
    c.distill.response_buckets = (16,)
    c.sampler.max_batch = 8
    c.sampler.prompt_buckets = (128, 256, 512, 1024)
    c.sampler.new_token_buckets = (8, 16)
    c.optim.learning_rate = 1e-3
    c.train.steps = 4
    c.train.batch_size = 2
    c.train.eval_every = 2
    c.train.save_every = 2
    c.eval.num_examples = 2
    c.eval.max_new_tokens = 8
    c.eval.k = 2
    return c
