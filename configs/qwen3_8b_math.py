"""The paper's math setting: Qwen3-8B, Plan–Solve harness with reference solutions.

    python -m ophsd_jax.train --config configs/qwen3_8b_math.py \
        --config.model.path=/path/to/Qwen3-8B \
        --config.data.train.path=/path/to/math_train.json --workdir /mnt/disks/runs/math

(the work dir is a local or mounted file system path: metrics and evals are plain files)

Paper (released code): lr 1e-6, no warmup, weight decay 0.1, grad clip 1.0, 64 prompts
per step with one rollout each, 150 steps, eval every 10; prompts up to 4096 tokens,
responses up to 8192, teacher context + response <= 12288; validation avg@8 at T=0.6,
top-p 0.8, top-k 20.

Mesh: FSDP over every chip (fsdp=-1) fits Qwen3-8B on a v4-32 / v5p-64 slice or one
8-GPU host: `python -m ophsd_jax.compile_check --config configs/qwen3_8b_math.py --target
v5p-64` (or 8xH100) compiles it for that hardware and prints memory per device;
docs/scaling.md has the table and when to add tensor parallelism.
"""

from ophsd_jax.config import base_config


def paper_config(task: str, train_kind: str, prompt_len: int, response_len: int, teacher_total: int):
    c = base_config()
    c.model.source = "hf"
    c.model.path = ""  # a local Hugging Face folder: --config.model.path=...
    c.model.param_dtype = "float32"  # fp32 master weights: a 1e-6 step is below bf16's resolution
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.chat_template_kwargs.enable_thinking = False
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.task = task
    c.data.train = {"kind": train_kind, "path": ""}
    c.data.validation_size = 256
    c.rollout.max_new_tokens = response_len
    c.distill.student_buckets = tuple(b for b in (1024, 2048, 4096, 8192, 12288) if b <= prompt_len + response_len) \
        + ((prompt_len + response_len,) if prompt_len + response_len not in (1024, 2048, 4096, 8192, 12288) else ())
    c.distill.teacher_buckets = tuple(b for b in (2048, 4096, 8192, 12288, 16384) if b < teacher_total) + \
        (teacher_total,)
    c.distill.response_buckets = tuple(b for b in (512, 1024, 2048, 4096, 8192) if b < response_len) + \
        (response_len,)
    c.distill.micro_batches = 0  # one row per device per micro-batch: 2 on v5p-64, 8 on 8 GPUs
    c.sampler.max_batch = 64
    c.sampler.prompt_buckets = tuple(b for b in (256, 512, 1024, 2048, 4096, 8192, 12288) if b <= teacher_total)
    c.sampler.new_token_buckets = tuple(b for b in (512, 1024, 2048, 4096, 8192) if b <= response_len)
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.train.steps = 150
    c.train.batch_size = 64
    c.train.eval_every = 10
    c.train.save_every = 10
    c.eval.num_examples = 0  # all held-out examples
    c.eval.k = 8
    c.eval.temperature = 0.6
    c.eval.top_p = 0.8
    c.eval.top_k = 20
    c.eval.max_new_tokens = response_len
    return c


# Draft–Verify as in the paper's classification runs (LawBench, USPTO).
DRAFT_VERIFY = {"cold_start_threshold": 10, "draft_k": 5, "confirm_k": 5, "challenge_k": 5,
                "draft_max_tokens": 1024, "verify_max_tokens": 2048, "embedder": "tfidf"}


def get_config():
    c = paper_config("math", "math_json", prompt_len=4096, response_len=8192, teacher_total=12288)
    c.harness.name = "plan_solve"
    c.harness.options = {"use_gt": True, "plan_max_tokens": 2048, "solve_max_tokens": 8192}
    return c
