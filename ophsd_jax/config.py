"""The run configuration: every key with its default and meaning, plus validation.

Config files under `configs/` start from `base_config()` and change what their task
needs; `--config.key=value` overrides any key from the command line, and may add keys
under the OPEN_SECTIONS (options of the chosen task, harness and data sources, which are
checked where they are used). `validate()` runs once at start-up and names the key of
any bad value, or of any key that `base_config()` does not have (a typo).
"""

from __future__ import annotations

import difflib

import ml_collections as mlc

# Sections whose keys depend on what else is chosen (task, harness, data source kind,
# model family for source=random), so any key may be set there.
OPEN_SECTIONS = ("task_options", "harness.options", "data.train", "data.eval", "model.random",
                 "model.chat_template_kwargs")


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0

    # ---- model ------------------------------------------------------------------------
    c.model = mlc.ConfigDict()
    c.model.source = "bundled"  # bundled (SmolLM2-135M-Instruct GGUF) | hf (a folder) | random (tests)
    c.model.path = ""  # Hugging Face folder for source=hf
    c.model.tokenizer = ""  # tokenizer folder for source=random ("" = the bundled SmolLM2 tokenizer)
    c.model.param_dtype = "float32"  # float32 | bfloat16
    c.model.dtype = "float32"  # compute dtype
    c.model.remat = False  # rematerialise each layer in the backward pass
    # with remat, what a layer keeps for the backward: nothing (least memory) | dots (matmul
    # outputs) | attn_out (the attention output: skips re-running attention) | qkv_attn_out
    c.model.remat_policy = "nothing"
    # self-attention: auto (splash on TPU, Pallas flash on GPU, dense query blocks on CPU up
    # to 4k tokens, blockwise beyond) | dense | blockwise | splash | pallas_gpu
    c.model.attention = "auto"
    c.model.random = mlc.ConfigDict()  # ModelConfig fields for source=random
    c.model.random.family = "llama"
    c.model.random.hidden_size = 64
    c.model.random.intermediate_size = 128
    c.model.random.num_layers = 2
    c.model.random.num_heads = 4
    c.model.random.num_kv_heads = 2
    c.model.random.head_dim = 16
    c.model.random.tie_word_embeddings = True
    c.model.chat_template_kwargs = mlc.ConfigDict()  # e.g. enable_thinking=False for Qwen3
    c.model.chat_template_kwargs.enable_thinking = False

    # ---- LoRA (models/lora.py) ----------------------------------------------------------
    # rank > 0: train low-rank adapters only (gradients and Adam moments for them alone);
    # the base weights stay frozen in model.param_dtype. distill.teacher="initial" is then
    # the base with the adapter off (no second copy), "current" base + adapter (no grad).
    c.lora = mlc.ConfigDict()
    c.lora.rank = 0  # 0 = full fine-tuning
    c.lora.alpha = 16.0  # the adapter's output is scaled by alpha / rank
    c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # projections that get an adapter
    c.lora.dtype = "float32"  # the adapter's dtype (float32 | bfloat16)

    # ---- devices ----------------------------------------------------------------------
    c.mesh = mlc.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all remaining devices
    c.mesh.tensor = 1

    # ---- task and data ---------------------------------------------------------------
    c.task = "math"  # math | lawbench | uspto
    c.task_options = mlc.ConfigDict()  # keyword options of the task (see ophsd_jax/data/tasks.py)
    c.data = mlc.ConfigDict()
    # A source spec: {"kind": ..., "path": ...} (see ophsd_jax/data/sources.py).
    c.data.train = mlc.ConfigDict({"kind": "reasoning_gym", "size": 2000, "seed": 0})
    c.data.eval = mlc.ConfigDict()  # empty: hold out `validation_size` examples from train
    c.data.validation_size = 64
    # The seed of the train/held-out split (-1 = `seed`): pin it to compare runs of several
    # seeds on one held-out set.
    c.data.split_seed = -1
    c.data.on_error = "raise"  # raise | skip: bad rows in data files

    # ---- harness (teacher context) ------------------------------------------------------
    c.harness = mlc.ConfigDict()
    c.harness.name = ""  # plan_solve | draft_verify | opsd ("" = the task's default)
    c.harness.options = mlc.ConfigDict()  # the harness's own options (sampling, use_gt, k's ...)
    # Training: the share of each batch whose final harness call (Plan-Solve's solve, Draft-
    # Verify's verify) is generated, for the harness/reward metric only: the teacher scores
    # the student's answer after that call's prompt and never reads the harness's answer.
    # Reward weighting (distill.reward_weight_beta > 0) generates it for every row.
    # Evaluation always generates it.
    c.harness.reward_fraction = 0.125

    # ---- rollouts (the student answering bare prompts, on-policy) ------------------------
    c.rollout = mlc.ConfigDict()
    c.rollout.max_new_tokens = 256
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0

    # ---- distillation step ----------------------------------------------------------------
    c.distill = mlc.ConfigDict()
    c.distill.kind = "reverse_kl"  # reverse_kl | forward_kl | jsd
    c.distill.beta = 0.5  # jsd only: 0 = forward KL, 1 = reverse KL
    c.distill.clip = 0.0  # per-token divergence cap (0 = off)
    c.distill.teacher = "initial"  # initial (frozen starting weights) | current (live weights, no grad)
    c.distill.micro_batches = 1  # gradient accumulation slices; 0 = one row per batch shard each (least memory)
    c.distill.remat_teacher = False
    # The frozen teacher's copy of the weights (distill.teacher="initial", full fine-tuning):
    # "" = model.dtype; bfloat16 halves it (its layers still compute in model.dtype).
    c.distill.teacher_dtype = ""
    c.distill.tile = 256
    c.distill.keep_fraction = 1.0  # < 1: entropy-weighted token subsampling
    c.distill.reward_weight_beta = 0.0  # > 0: per-sample weights softmax(harness reward / beta) * n
    c.distill.max_response_tokens = 0  # cap on response tokens in the loss (0 = all)
    # A teacher context + response longer than the largest teacher bucket: skip (the pair
    # is skipped and counted, batch/skipped_teacher_too_long) | shorten (cut only the
    # harness's inserted material - plan, reference solution, retrieved examples - each
    # piece ending in a " […]" marker; counted in batch/teacher_shortened). The problem and
    # the chat template are never cut.
    c.distill.teacher_overflow = "skip"
    c.distill.student_buckets = (256, 512, 1024, 2048, 4096)
    c.distill.teacher_buckets = (512, 1024, 2048, 4096, 8192, 12288)
    c.distill.response_buckets = (64, 128, 256, 512, 1024, 2048, 4096, 8192)

    # ---- optimizer ---------------------------------------------------------------------
    c.optim = mlc.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "constant"  # constant | warmup_cosine
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.mu_dtype = "float32"  # Adam's first moment; bfloat16 halves it (the second stays float32)

    # ---- loop --------------------------------------------------------------------------
    c.train = mlc.ConfigDict()
    c.train.steps = 150
    c.train.batch_size = 64  # prompts per step (one rollout each)
    c.train.eval_every = 10
    c.train.eval_before = True
    c.train.save_every = 10
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    c.train.compilation_cache_dir = "xla_cache"  # XLA's persistent cache (relative: in the work dir; "" = off)
    c.train.profile_steps = ()  # e.g. (5, 6): jax.profiler trace of these steps into workdir/profile

    # ---- sampler -----------------------------------------------------------------------
    c.sampler = mlc.ConfigDict()
    c.sampler.max_batch = 64  # rows per generation call; larger batches are chunked
    c.sampler.prompt_buckets = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
    c.sampler.new_token_buckets = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    # decode steps per jitted call; a stop request (SIGTERM) is noticed between calls
    c.sampler.decode_segment = 128
    # Prompt tokens per prefill pass (rows are prefilled in groups up to this; on the slot
    # path a refill takes at most this many tokens of rows); 0 = auto: 32768 on CPU, one
    # pass on accelerators. Needs unsharded batch rows when set.
    c.sampler.prefill_tokens = 0
    # auto: continuous batching (decode slots refilled as rows finish) for calls with more
    # prompts than sampler.max_batch, with prompts of more than one prefill size (each
    # size prefilled at its own bucket) or with repeated prompts (sampler.share_prefill),
    # static chunks otherwise; static | continuous: always.
    c.sampler.batching = "auto"
    # The rollout and the harness's first call (independent) as one sampler call. False:
    # separate calls, the same outputs (each row draws with its own key). The joined call
    # (on the slot path, its prompt sizes prefilled apart) was the faster on the embedded
    # default: 0.43x the three-call design's harness seconds against 0.49x for separate
    # calls (docs/benchmarks.md, "The harness's generation per training step").
    c.sampler.join_calls = True
    # Rows with the same prompt (an evaluation's eval.k samples of each example) share one
    # prefill (on the slot path, which such calls take under batching=auto); each row still
    # draws with its own key, so the samples are the same. False: a prefill per row.
    c.sampler.share_prefill = True
    # The weights the sampler reads: "train" = the training params as they are (fsdp-
    # sharded: every decode step all-gathers each layer); "decode" = a model.dtype copy
    # made once per step, not fsdp-sharded (more memory, no per-token weight gathers).
    c.sampler.weights = "train"
    c.sampler.cache_dtype = ""  # the KV cache's dtype: "" = model.dtype; bfloat16 halves it

    # ---- evaluation ---------------------------------------------------------------------
    c.eval = mlc.ConfigDict()
    c.eval.num_examples = 64  # 0 = all held-out examples
    c.eval.k = 1  # samples per problem: avg@k and pass@k
    c.eval.temperature = 0.6
    c.eval.top_p = 0.8
    c.eval.top_k = 20
    c.eval.max_new_tokens = 256
    c.eval.harness = True  # also measure accuracy with the harness re-attached
    c.eval.batch_size = 0  # rows per generation call at evaluation (0 = sampler.max_batch)
    return c


_CHOICES = {
    "model.source": ("bundled", "hf", "random"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.dtype": ("float32", "bfloat16"),
    "model.attention": ("auto", "dense", "blockwise", "splash", "pallas_gpu"),
    "lora.dtype": ("float32", "bfloat16"),
    "model.remat_policy": ("nothing", "dots", "attn_out", "qkv_attn_out"),
    "task": ("math", "lawbench", "uspto"),
    "data.on_error": ("raise", "skip"),
    "harness.name": ("", "plan_solve", "draft_verify", "opsd"),
    "sampler.batching": ("auto", "static", "continuous"),
    "sampler.weights": ("train", "decode"),
    "sampler.cache_dtype": ("", "float32", "bfloat16"),
    "distill.teacher_dtype": ("", "float32", "bfloat16"),
    "optim.mu_dtype": ("float32", "bfloat16"),
    "distill.kind": ("reverse_kl", "forward_kl", "jsd"),
    "distill.teacher": ("initial", "current"),
    "distill.teacher_overflow": ("skip", "shorten"),
    "optim.schedule": ("constant", "warmup_cosine"),
}
_POSITIVE = ("train.steps", "train.batch_size", "train.eval_every", "train.save_every", "train.keep_checkpoints",
             "rollout.max_new_tokens", "eval.k", "eval.max_new_tokens", "sampler.max_batch", "sampler.decode_segment",
             "distill.tile")
_NON_NEGATIVE = ("optim.learning_rate", "optim.weight_decay", "optim.grad_clip", "optim.warmup_steps",
                 "distill.clip", "distill.reward_weight_beta", "distill.max_response_tokens", "eval.num_examples",
                 "sampler.prefill_tokens",
                 "rollout.temperature", "eval.temperature", "eval.batch_size")


class ConfigValueError(ValueError):
    pass


def _get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c


def _unknown_keys(c, ref, prefix=""):
    """Dotted keys of `c` that `ref` does not have, outside OPEN_SECTIONS."""
    for k in c.keys():
        key = prefix + k
        if key in OPEN_SECTIONS:
            continue
        if k not in ref:
            yield key, list(ref.keys())
        elif isinstance(c[k], mlc.ConfigDict) and isinstance(ref[k], mlc.ConfigDict):
            yield from _unknown_keys(c[k], ref[k], key + ".")


def validate(c: mlc.ConfigDict) -> None:
    """Raise ConfigValueError naming the first bad key."""
    def bad(key, why):
        raise ConfigValueError(f"config.{key}: {why} (got {_get(c, key)!r})")

    for key, siblings in _unknown_keys(c, base_config()):
        near = difflib.get_close_matches(key.rsplit(".", 1)[-1], siblings, n=1)
        hint = f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{near[0]}?" if near else ""
        raise ConfigValueError(f"config.{key}: unknown key{hint} (open sections, where any key may be "
                               f"set: {', '.join(OPEN_SECTIONS)})")

    for key, choices in _CHOICES.items():
        if _get(c, key) not in choices:
            bad(key, f"must be one of {list(choices)}")
    for key in _POSITIVE:
        if not _get(c, key) > 0:
            bad(key, "must be > 0")
    for key in _NON_NEGATIVE:
        if not _get(c, key) >= 0:
            bad(key, "must be >= 0")
    if not 0 < c.distill.keep_fraction <= 1:
        bad("distill.keep_fraction", "must be in (0, 1]")
    if not 0 <= c.harness.reward_fraction <= 1:
        bad("harness.reward_fraction", "must be in [0, 1]")
    if not 0 <= c.distill.beta <= 1:
        bad("distill.beta", "must be in [0, 1]")
    for key in ("rollout.top_p", "eval.top_p"):
        if not 0 < _get(c, key) <= 1:
            bad(key, "must be in (0, 1]")
    if c.model.source == "hf" and not c.model.path:
        bad("model.path", "is required when model.source='hf'")
    if c.distill.micro_batches < 0:
        bad("distill.micro_batches", "must be >= 0 (0 = one row per batch shard per micro-batch)")
    if c.distill.micro_batches and c.train.batch_size % c.distill.micro_batches:
        bad("distill.micro_batches", f"must divide train.batch_size={c.train.batch_size}")
    for key in ("distill.student_buckets", "distill.teacher_buckets", "distill.response_buckets",
                "sampler.prompt_buckets", "sampler.new_token_buckets"):
        v = tuple(_get(c, key))
        if not v or list(v) != sorted(v) or min(v) <= 0:
            bad(key, "must be a non-empty increasing tuple of positive lengths")
    if c.rollout.max_new_tokens > c.distill.response_buckets[-1]:
        bad("rollout.max_new_tokens", f"exceeds the largest response bucket {c.distill.response_buckets[-1]}")
    if not isinstance(c.lora.rank, int) or c.lora.rank < 0:
        bad("lora.rank", "must be an integer >= 0 (0 = full fine-tuning)")
    if c.lora.rank and not c.lora.alpha > 0:
        bad("lora.alpha", "must be > 0")
    lora_targets = ("q", "k", "v", "o", "gate", "up", "down")
    if c.lora.rank and (isinstance(c.lora.targets, str) or not c.lora.targets
                        or any(t not in lora_targets for t in c.lora.targets)):
        bad("lora.targets", f"must be a non-empty tuple of {list(lora_targets)}")
    if c.data.train.get("kind") is None:
        bad("data.train", "needs a 'kind'")
