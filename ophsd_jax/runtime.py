"""Build the pieces of a run from its config: mesh, model, tokenizer, sampler, task,
harness, data, optimizer. `train.py` composes them; `evaluate.py` and `export.py`
reuse the same builders so all three read a work dir the same way."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections as mlc

from ophsd_jax import parallel
from ophsd_jax.data.builders import build_dataset
from ophsd_jax.data.tasks import make_task
from ophsd_jax.distill.step import OptimConfig, StepConfig, make_optimizer
from ophsd_jax.harnesses.factory import make_harness
from ophsd_jax.harnesses.memory_bank import MemoryBank
from ophsd_jax.models import bundled
from ophsd_jax.models import state as model_state
from ophsd_jax.models.config import ModelConfig
from ophsd_jax.models.tokenizer import Tokenizer
from ophsd_jax.models.weights import load_hf
from ophsd_jax.sampling import Sampler

log = logging.getLogger(__name__)


def make_mesh(c: mlc.ConfigDict):
    return parallel.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)


def load_model(c: mlc.ConfigDict, mesh):
    """(model config, graphdef, params, tokenizer): the run's *initial* weights."""
    m = c.model
    overrides = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, remat_policy=m.remat_policy,
                     attention=m.attention)
    if m.source == "bundled":
        cfg, graphdef, params, tok = bundled.load_bundled(mesh, **overrides)
    elif m.source == "hf":
        cfg, graphdef, params = load_hf(m.path, mesh, **overrides)
        tok = Tokenizer.from_dir(m.path)
    else:  # random: tiny models for tests, with a real tokenizer
        tok = Tokenizer.from_dir(m.tokenizer) if m.tokenizer else bundled.load_bundled_tokenizer()
        cfg = ModelConfig(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                          **m.random.to_dict(), **overrides)
        graphdef, params = model_state.init_params(cfg, mesh, seed=c.seed)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    return cfg, graphdef, params, tok


def make_sampler(c: mlc.ConfigDict, cfg, graphdef, mesh, tok, max_batch: int | None = None) -> Sampler:
    # The config.json of a run from before these keys existed: the Sampler's defaults.
    newer = {k: c.sampler[k] for k in ("decode_segment", "prefill_tokens", "batching", "join_calls",
                                                       "share_prefill") if k in c.sampler}
    if c.sampler.get("cache_dtype"):
        newer["cache_dtype"] = c.sampler.cache_dtype
    return Sampler(cfg, graphdef, mesh, max_batch=max_batch or c.sampler.max_batch,
                   prompt_buckets=c.sampler.prompt_buckets,
                   new_token_buckets=c.sampler.new_token_buckets, pad_id=tok.pad_token_id,
                   show_progress=jax.process_index() == 0, **newer)


@dataclasses.dataclass
class Data:
    task: object
    train: object  # random-access examples
    eval: object
    report: dict | None


def load_data(c: mlc.ConfigDict, workdir: str) -> Data:
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    task = make_task(c.task, **c.task_options.to_dict())
    data_dir = os.path.join(workdir, "data")
    # Process 0 builds the dataset files; the others open them once they exist.
    if jax.process_index() != 0:
        parallel.sync("data_built")
    try:
        return _load_data(c, task, data_dir)
    finally:
        if jax.process_index() == 0:
            parallel.sync("data_built")


def _load_data(c: mlc.ConfigDict, task, data_dir: str) -> Data:
    split_seed = c.data.get("split_seed", -1)  # (absent in the config.json of older runs)
    split_seed = c.seed if split_seed < 0 else split_seed
    train_spec = {**c.data.train.to_dict(), **({"on_error": c.data.on_error} if "path" in c.data.train else {})}
    if c.data.eval.to_dict():
        splits, report = build_dataset(c.task, train_spec, data_dir=data_dir, validation_size=0, split_seed=split_seed)
        eval_spec = {**c.data.eval.to_dict(), **({"on_error": c.data.on_error} if "path" in c.data.eval else {})}
        eval_splits, _ = build_dataset(c.task, eval_spec, data_dir=data_dir, validation_size=0, split_seed=split_seed)
        train, evals = splits["train"], eval_splits["train"]
    else:
        splits, report = build_dataset(c.task, train_spec, data_dir=data_dir,
                                       validation_size=c.data.validation_size, split_seed=split_seed)
        train, evals = splits["train"], splits.get("validation")
    if len(train) == 0:
        raise ValueError(f"config.data.train: the dataset is empty ({train_spec})")
    if len(train) < c.train.batch_size:
        raise ValueError(f"config.train.batch_size={c.train.batch_size} exceeds the {len(train)} training examples")
    return Data(task, train, evals, report)


def _train_examples(data: Data) -> list[dict]:
    return [data.train[i] for i in range(len(data.train))]


def make_run_harness(c: mlc.ConfigDict, data: Data):
    name = c.harness.name or None
    train_examples = _train_examples(data) if (name or data.task.default_harness) == "draft_verify" else None
    return make_harness(name, data.task, c.harness.options.to_dict(), train_examples=train_examples)


def micro_batches(c: mlc.ConfigDict, mesh) -> int:
    """config.distill.micro_batches, with 0 resolved to one row per batch shard per slice."""
    if c.distill.micro_batches:
        return c.distill.micro_batches
    return max(c.train.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"]), 1)


def step_config(c: mlc.ConfigDict, mesh) -> StepConfig:
    d = c.distill
    return StepConfig(kind=d.kind, beta=float(d.beta), clip=d.clip or None, teacher=d.teacher,
                      micro_batches=micro_batches(c, mesh), remat_teacher=d.remat_teacher, tile=d.tile,
                      keep_fraction=d.keep_fraction if d.keep_fraction < 1 else None, compute_dtype=c.model.dtype,
                      lora_scale=lora_config(c).scale if lora_config(c) else None)


def lora_config(c: mlc.ConfigDict):
    """The run's LoraConfig, or None for full fine-tuning."""
    from ophsd_jax.models.lora import LoraConfig

    return LoraConfig.from_config(c)


def trainable_params(c: mlc.ConfigDict, cfg, params, mesh, *, abstract: bool = False):
    """(what the train state trains, the step's second argument) for the run's initial
    weights `params`: (params, frozen copy or None) for full fine-tuning; with LoRA
    (adapter, base weights). `abstract`: `params` are ShapeDtypeStructs; so is the result."""
    from ophsd_jax.models import lora

    lcfg = lora_config(c)
    if lcfg is not None:
        adapter = (lora.abstract_adapter(cfg, lcfg, mesh) if abstract else
                   lora.init_adapter(cfg, lcfg, mesh, seed=c.seed))
        return adapter, params
    if c.distill.teacher != "initial":
        return params, None
    # "initial": a frozen copy of the starting weights, only read by forward passes: in the
    # compute dtype, or distill.teacher_dtype (bfloat16 halves it; layers compute in model.dtype).
    dtype = c.distill.get("teacher_dtype") or cfg.dtype
    if abstract:
        return params, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding), params)
    return params, jax.tree.map(lambda x: x.astype(dtype) + 0, params)


def optimizer(c: mlc.ConfigDict):
    o = c.optim
    return make_optimizer(OptimConfig(learning_rate=o.learning_rate, schedule=o.schedule,
                                      warmup_steps=o.warmup_steps, total_steps=c.train.steps,
                                      weight_decay=o.weight_decay, grad_clip=o.grad_clip, b1=o.b1, b2=o.b2, eps=o.eps,
                                      mu_dtype=o.get("mu_dtype", "float32")))


def use_compilation_cache(c: mlc.ConfigDict, workdir: str, *, write: bool = True) -> None:
    """Turn on XLA's persistent compilation cache, so a resumed run (after preemption)
    or a repeated one loads its compiled programs instead of compiling them again. Takes
    effect only before the process's first compilation (JAX fixes the cache then).
    `write=False` only reads it (nothing is added to the work dir); call again to write."""
    path = c.train.compilation_cache_dir
    if not path:
        return
    path = os.path.join(workdir, path) if not os.path.isabs(path) else path
    jax.config.update("jax_compilation_cache_dir", path)
    # 1 s: skip the many tiny programs; read-only: no program is slow enough to be written.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0 if write else float("inf"))


def save_config(c: mlc.ConfigDict, workdir: str) -> None:
    """The resolved config beside the run, so evaluate/export need only the work dir."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(c.to_json(indent=2))
    os.replace(tmp, path)


def load_config(workdir: str) -> mlc.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a training work dir?")
    with open(path) as f:
        return mlc.ConfigDict(json.load(f))


def make_eval_harness(c: mlc.ConfigDict, data: Data, train_harness):
    """The harness re-attached at evaluation: never shown reference answers (use_gt off).

    Draft–Verify retrieves from its own bank holding the whole labelled *training*
    split (never an evaluation example), not from the training run's online bank: that
    one is empty at step 0 and partial later, so evaluating with it would measure the
    zero-shot cold start instead of the harness. The run's embedder (fitted on the
    training texts) embeds it, so retrieval matches training."""
    name = c.harness.name or data.task.default_harness
    if name == "opsd":  # defined by the reference solution: not a test-time harness
        return None
    options = c.harness.options.to_dict()
    if name == "plan_solve":
        options["use_gt"] = False
        return make_harness(name, data.task, options)
    train_bank = getattr(train_harness, "bank", None)
    bank = MemoryBank(train_bank.embedder) if train_bank is not None else None
    options["seed_bank_from_train"] = True
    return make_harness(name, data.task, options, bank=bank, train_examples=_train_examples(data))


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS between phases. glibc keeps what a phase
    freed (XLA:CPU's buffers, the checkpoint's host copies) for reuse, so without this
    a CPU run's RSS is the high-water mark of every phase stacked, not of the largest.
    A no-op where glibc's `malloc_trim` is missing."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


# JAX records this event when a backend compilation (or a persistent-cache load) ends,
# before the program's first run; tests/test_cli_robustness.py checks that it still fires.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_trim_hook_registered = False


def release_host_memory_after_compiles() -> None:
    """From now on, hand the heap the compiler freed back to the OS after each compilation.
    XLA frees its working memory when it finishes, but glibc keeps it, so a new program's
    first run stacked its buffers on top of the compiler's: on the embedded default the
    first update and the first generation peaked ~0.3-0.5 GB above the later ones
    (docs/benchmarks.md, "Host memory, tenth session"). Registered once per process; a
    trim took 1-160 ms there, and a compiled program's later runs trigger none."""
    global _trim_hook_registered
    if _trim_hook_registered:
        return

    def after_compile(event: str, duration: float, **_) -> None:
        if event == _COMPILE_EVENT:
            release_host_memory()

    jax.monitoring.register_event_duration_secs_listener(after_compile)
    _trim_hook_registered = True


def release_compiled_programs() -> None:
    """On CPU, drop every compiled program (they are reloaded from the compilation cache,
    or recompiled, when next called). XLA:CPU's programs are machine code in host memory:
    an evaluation's set (its own buckets, the unrolled layer loop) held ~0.5 GB of the
    embedded default's RSS through the whole run. Elsewhere a no-op: there the code is
    small next to host memory, and reloading a paper-scale step costs real time."""
    if jax.default_backend() == "cpu":
        jax.clear_caches()
    release_host_memory()
