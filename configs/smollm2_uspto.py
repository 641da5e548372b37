"""USPTO reaction classes with Draft–Verify on the bundled SmolLM2-135M-Instruct (CPU).

Data: the Schneider data set A CSV (683 reactions, classes 1-10) from the project's
shared data; point `--config.data.train.path` at your own file of the same schema.
The last 100 reactions of a seeded shuffle are held out; the training split (583) is
the Draft–Verify memory bank at evaluation. Outputs are a few tokens (`[class]N<eoa>`),
so generation is cheap; the draft/verify prompts carry 5-10 retrieved reactions.

    python -m ophsd_jax.train --config configs/smollm2_uspto.py
    python -m ophsd_jax.evaluate --config configs/smollm2_uspto.py --workdir runs/uspto_base   # base model
"""

from ophsd_jax.config import base_config

DATA = "../shared/data/uspto/schneider_dataSetA.csv"


def get_config():
    c = base_config()
    c.model.source = "bundled"
    c.task = "uspto"
    c.data.train = {"kind": "uspto_csv", "path": DATA}
    c.data.validation_size = 100
    c.harness.name = "draft_verify"
    c.harness.options = {"cold_start_threshold": 10, "draft_k": 5, "confirm_k": 5, "challenge_k": 5,
                         "draft_max_tokens": 64, "verify_max_tokens": 64, "embedder": "tfidf",
                         "temperature": 0.6, "top_p": 0.95, "top_k": 20}
    c.rollout.max_new_tokens = 64
    c.distill.student_buckets = (256, 512)
    c.distill.teacher_buckets = (512, 1024, 2048, 4096)
    c.distill.response_buckets = (32, 64)
    c.sampler.max_batch = 32
    c.sampler.prompt_buckets = (256, 512, 1024, 2048, 4096)
    c.sampler.new_token_buckets = (32, 64)
    c.optim.learning_rate = 1e-5
    c.optim.weight_decay = 0.0
    c.train.steps = 16
    c.train.batch_size = 8
    c.train.eval_every = 16
    c.train.save_every = 8
    c.eval.num_examples = 100
    c.eval.k = 1
    c.eval.max_new_tokens = 64
    return c
