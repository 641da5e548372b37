"""Compile a run's programs for a TPU slice or a GPU node, on a CPU-only machine, and
report whether each one fits in device memory.

    python -m ophsd_jax.compile_check --config configs/qwen3_8b_math.py --target v5p-64
    python -m ophsd_jax.compile_check --config configs/qwen3_8b_math.py --target 8xH100 \\
        --config.distill.micro_batches=4 --programs train,rollout

Needs the compile-only extras (`pip install -r requirements-compile.txt`: libtpu for TPU
targets, the CUDA PJRT plugin for GPU targets; no accelerator, driver or CUDA libraries).
Every program a run of the config compiles, at its largest buckets, is lowered with
abstract arguments (shapes + shardings, nothing allocated) on a mesh over the target's
devices and compiled by the target's own compiler (what MaxText's `train_compile.py`
does). Per program and device it prints XLA's memory analysis (argument, output, alias,
temp and code bytes), the memory other programs keep resident meanwhile (train state,
frozen teacher), the total against the target's memory, FITS / DOES NOT FIT with the
headroom, and the compile time; then one JSON line.

GPU figures are compile-time estimates: without a device, XLA does no autotuning.
TPU figures come from the TPU compiler itself (it also refuses programs that do not fit).
`cost_analysis()` counts loop bodies once, so no FLOP totals are reported.
"""

from __future__ import annotations

import os

# Compile-only: never touch an accelerator (and never query a TPU VM's metadata server).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) meant to stop two processes sharing
# chips; a deviceless compile holds no chips, so two checks (or a check and a test) may run.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib import resources  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from ophsd_jax import parallel  # noqa: E402

GiB = 1 << 30


# ---- targets -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # tpu | cuda
    topology: str  # TPU: "v5:2x4x4"; CUDA: "hosts x 1 x gpus per host"
    memory_bytes: int  # per device, what a program may use
    chip_config: str = "default"  # TPU: "megacore" for v4/v5p (one device per chip)
    chips_per_host: tuple[int, int, int] = (2, 2, 1)
    gpu_memory_bytes: int | None = None  # CUDA: device_memory_size written into the target description
    note: str = ""


# HBM per chip as the TPU compiler counts it; GPU memory as the card reports it.
TARGETS = {t.name: t for t in (
    Target("v5p-8", "tpu", "v5:2x2x1", int(95.74 * GiB), "megacore", note="4 chips, 1 host"),
    Target("v5p-64", "tpu", "v5:2x4x4", int(95.74 * GiB), "megacore", note="32 chips, 8 hosts"),
    Target("v4-8", "tpu", "v4:2x2x1", 32 * GiB, "megacore", note="4 chips, 1 host"),
    Target("v4-32", "tpu", "v4:2x2x4", 32 * GiB, "megacore", note="16 chips, 4 hosts"),
    Target("v5e-256", "tpu", "v5e:16x16", 16 * GiB, note="256 chips, 64 hosts"),
    Target("v6e-256", "tpu", "v6e:16x16", 32 * GiB, note="256 chips, 64 hosts"),
    Target("1xH100", "cuda", "1x1x1", 84929347584, note="H100 SXM 80 GB"),
    Target("8xH100", "cuda", "1x1x8", 84929347584, note="one node of 8 H100 SXM 80 GB"),
    Target("2x8xH100", "cuda", "2x1x8", 84929347584, note="two nodes of 8 H100 SXM 80 GB"),
    Target("8xH200", "cuda", "1x1x8", 143771 << 20, gpu_memory_bytes=143771 << 20,
           note="one node of 8 H200 141 GB (143,771 MiB each)"),
)}


def _gpu_target_config(target: Target) -> str:
    """XLA's GpuTargetConfigProto text for the target (the H100 SXM description, with the
    memory size replaced for other Hopper cards)."""
    text = resources.files("ophsd_jax").joinpath("gpu_targets/h100_sxm.txtpb").read_text()
    if target.gpu_memory_bytes:
        text = text.replace("device_memory_size: 84929347584", f"device_memory_size: {target.gpu_memory_bytes}")
        text = text.replace("NVIDIA H100 80GB HBM3", "NVIDIA H200")
    return text


def target_devices(target: Target) -> list:
    """The target's devices (deviceless: enough to build meshes and compile for them)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        try:
            topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                                chip_config_name=target.chip_config,
                                                chips_per_host_bounds=target.chips_per_host, num_slices=1,
                                                wrap=(False, False, False))
        except Exception as e:  # noqa: BLE001 - libtpu missing or an unknown topology
            raise RuntimeError(f"target {target.name}: cannot describe TPU topology {target.topology} ({e}); "
                               f"is libtpu installed (pip install -r requirements-compile.txt)?") from e
    else:
        try:
            topo = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                                target_config=_gpu_target_config(target))
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"target {target.name}: cannot describe GPU topology {target.topology} ({e}); "
                               f"are jax-cuda12-pjrt and jax-cuda12-plugin installed "
                               f"(pip install --no-deps -r requirements-compile.txt)?") from e
    return list(topo.devices)


# ---- abstract arguments ---------------------------------------------------------------------


def abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    dtype = dtype if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else jnp.dtype(dtype)
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def device_bytes(tree) -> int:
    """Bytes one device holds of the (abstract or real) arrays in `tree` (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def abstract_params(cfg, mesh: Mesh, dtype=None, exclude: tuple[str, ...] = ()):
    """(graphdef, params as ShapeDtypeStructs with their training shardings, or without
    the mesh axes in `exclude`: ("fsdp",) is the sampling layout)."""
    from ophsd_jax.models import state as model_state

    graphdef, params = model_state.abstract_model(cfg)
    shardings = model_state.param_shardings(params, mesh, exclude)
    return graphdef, jax.tree.map(lambda a, sh: abstract(a.shape, dtype or a.dtype, sh), params, shardings)


def model_config(c, preset: str | None = None):
    """The run's ModelConfig without loading weights: a folder's config.json, the bundled
    model, the random test model, or a named preset (for paper configs with no path yet)."""
    from ophsd_jax.models.config import ModelConfig

    m = c.model
    kw = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, remat_policy=m.remat_policy,
              attention=m.attention)
    if preset or (m.source == "hf" and not m.path):
        name = preset or "qwen3-8b"
        presets = {"qwen3-8b": ModelConfig.qwen3_8b, "smollm2-135m": ModelConfig.smollm2_135m}
        if name not in presets:
            raise ValueError(f"unknown --model preset {name!r} (one of {sorted(presets)})")
        return presets[name](**kw)
    if m.source == "hf":
        from ophsd_jax.models.weights import hf_model_config
        return hf_model_config(m.path, **kw)
    if m.source == "bundled":
        return ModelConfig.smollm2_135m(**kw)
    random = m.random.to_dict()
    vocab = random.pop("vocab_size", 49152)
    return ModelConfig(vocab_size=vocab, **random, **kw)


# ---- the programs of a run -----------------------------------------------------------------


@dataclasses.dataclass
class Program:
    name: str
    lower: object  # () -> jax.stages.Lowered
    resident_bytes: int  # memory other parts of the run keep on the device meanwhile


def _generation_calls(c) -> list[tuple[str, int, int, list[tuple[int, float]]]]:
    """(name, prompt length, new tokens, the (top_k, top_p) of its rows) of every
    generation call of a step and of evaluation, at their largest buckets."""
    from ophsd_jax.harnesses.base import SamplingConfig
    from ophsd_jax.sampling import bucket

    pb, nb = tuple(c.sampler.prompt_buckets), tuple(c.sampler.new_token_buckets)
    prompt = max(c.distill.student_buckets[-1] - c.rollout.max_new_tokens, 1)  # room a student prompt has
    prompt = bucket(min(prompt, pb[-1]), pb, "prompt")
    name = c.harness.name or {"math": "plan_solve"}.get(c.task, "draft_verify")
    opts = c.harness.options.to_dict()
    harness = (opts.get("top_k", SamplingConfig.top_k), opts.get("top_p", SamplingConfig.top_p))
    harness_calls = {
        "plan_solve": [("plan", opts.get("plan_max_tokens", 512)), ("solve", opts.get("solve_max_tokens", 1024))],
        "draft_verify": [("draft", opts.get("draft_max_tokens", 256)), ("verify", opts.get("verify_max_tokens", 256))],
        "opsd": [("solve", opts.get("max_tokens", 4096))] if opts.get("generate") else [],
    }[name]
    student = [("rollout", prompt, bucket(c.rollout.max_new_tokens, nb, "rollout tokens"),
                [(c.rollout.top_k, c.rollout.top_p)])]
    if c.eval.num_examples:
        student.append(("eval", prompt, bucket(c.eval.max_new_tokens, nb, "eval tokens"),
                        [(c.eval.top_k, c.eval.top_p)]))
    calls = []
    # Harness prompts carry the problem plus the harness's own material: the largest bucket.
    # The first call runs together with the student's answers (one sampler call; its rows
    # may have either's prompt length, token limit and sampling, so the program takes the
    # larger of each, and both kinds of rows), unless sampler.join_calls is off.
    for j, (call, new) in enumerate(harness_calls):
        new = bucket(min(new, nb[-1]), nb, f"{call} tokens")
        if j == 0 and c.sampler.get("join_calls", True):
            joined = [s for s in student if s[0] == "rollout" or c.eval.harness]
            calls += [(f"{n}+harness_{call}", pb[-1], max(new, m), rows + [harness]) for n, _, m, rows in joined]
            student = [s for s in student if s not in joined]
        else:
            calls.append((f"harness_{call}", pb[-1], new, [harness]))
    return student + calls


def run_programs(c, mesh: Mesh, *, preset: str | None = None, programs: set[str] | None = None,
                 num_layers: int | None = None) -> list[Program]:
    """Lowering thunks for every program a training run of `c` compiles on `mesh`."""
    from ophsd_jax import runtime
    from ophsd_jax.distill.batch import PairBatch, SideBatch
    from ophsd_jax.distill.step import TrainStep, init_train_state, micro_batch_rows_error
    from ophsd_jax.sampling import RowSampling, Sampler, top_k_cap

    cfg = model_config(c, preset)
    if num_layers:
        cfg = cfg.replace(num_layers=num_layers)
    graphdef, params = abstract_params(cfg, mesh)
    optimizer = runtime.optimizer(c)
    # Full fine-tuning: the weights + a frozen copy ("initial"); LoRA: the adapter + the base weights.
    trained, teacher = runtime.trainable_params(c, cfg, params, mesh, abstract=True)
    state = init_train_state(trained, optimizer, mesh)
    resident = device_bytes(state) + device_bytes(teacher)
    lora_on = runtime.lora_config(c) is not None
    out = []

    B = c.train.batch_size
    m = runtime.micro_batches(c, mesh)
    error = micro_batch_rows_error(B, m, mesh)
    if error:
        raise ValueError(f"config.{error} (mesh {dict(mesh.shape)})")
    step = TrainStep(graphdef, runtime.step_config(c, mesh), optimizer, mesh, state, teacher_params=teacher)
    rows = step.batch_sharding
    S, T, R = c.distill.student_buckets[-1], c.distill.teacher_buckets[-1], c.distill.response_buckets[-1]
    R = min(R, c.rollout.max_new_tokens if not c.distill.max_response_tokens else c.distill.max_response_tokens)
    R = next(b for b in c.distill.response_buckets if b >= R)

    def side(L):
        i32 = lambda *s: abstract(s, jnp.int32, rows)  # noqa: E731
        return SideBatch(i32(B, L), i32(B, L), i32(B, L), i32(B, R))

    batch = PairBatch(side(S), side(T), abstract((B, R), jnp.int32, rows), abstract((B, R), jnp.float32, rows),
                      abstract((B,), jnp.float32, rows))
    weights = abstract((B,), jnp.float32, rows)
    # Between steps the train state and teacher are resident; the step's own arguments are them.
    out.append(Program(f"train_step[B={B},S={S},T={T},R={R},micro={m}]",
                       lambda: step.lower(state, teacher, batch, weights), 0))

    sampler = Sampler(cfg, graphdef, mesh, max_batch=c.sampler.max_batch, prompt_buckets=c.sampler.prompt_buckets,
                      new_token_buckets=c.sampler.new_token_buckets, show_progress=False)
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))  # one row's raw key
    replicated = NamedSharding(mesh, P())
    seen = set()
    # sampler.weights="decode": the sampler reads a model.dtype copy, not fsdp-sharded,
    # beside the whole resident train state; "train": the training params themselves.
    decode_layout = c.sampler.get("weights", "train") == "decode"
    sample_params = abstract_params(cfg, mesh, c.model.dtype, ("fsdp",))[1] if decode_layout else params
    sampler_resident = resident if (lora_on or decode_layout) else resident - device_bytes(params)
    for name, prompt_len, new, rows_settings in _generation_calls(c):
        top_ks = [k for k, _ in rows_settings]
        use_top_k, use_top_p = max(top_ks) > 0, min(p for _, p in rows_settings) < 1
        # as the sampler decides it: rows with top-k draw from a pool of `cap` candidates
        cap = top_k_cap(max(top_ks), cfg.vocab_size) if use_top_k else 0
        sig = (prompt_len, new, use_top_k, use_top_p, cap)
        if sig in seen:
            continue
        seen.add(sig)
        Bs = sampler.max_batch
        tok_sh = parallel.named_sharding(mesh, ("batch", "seq"), (Bs, prompt_len))
        row = lambda dtype, *shape: abstract((Bs, *shape), dtype, parallel.named_sharding(  # noqa: E731
            mesh, ("batch",) + (None,) * len(shape), (Bs, *shape)))
        rows_sampling = RowSampling(row(jnp.uint32, *key_data.shape), row(jnp.float32), row(jnp.int32),
                                    row(jnp.float32), row(jnp.int32))
        args = (sample_params, abstract((Bs, prompt_len), jnp.int32, tok_sh), abstract((Bs, prompt_len), jnp.int32, tok_sh),
                rows_sampling, abstract((8,), jnp.int32, replicated), abstract((), jnp.int32, replicated))
        kw = dict(n_new_bucket=new, greedy=False, use_top_k=use_top_k, use_top_p=use_top_p, top_k_cap=cap)
        # The sampler reads the training params; the optimizer state and teacher stay resident.
        # LoRA or the decode layout: it reads a copy (the argument), beside the whole train state.
        # Prefill + decode (`_start`); `_resume` runs the same decode loop on the donated
        # decode state without the prefill, so its peak is no higher.
        out.append(Program(f"generate_{name}[B={Bs},P={prompt_len},new={new}]",
                           lambda args=args, kw=kw: sampler._start.lower(*args, **kw), sampler_resident))
        # The slot path (calls with more prompts than slots, or sampler.batching=continuous):
        # every slot refilled at once at this bucket, and a decode segment over the slots.
        per_call = {k: v for k, v in kw.items() if k != "n_new_bucket"}
        slots = functools.partial(_slot_state, sampler, Bs, prompt_len, new, key_data.shape)
        # A refill takes at most `_refill_rows` rows per device (`sampler.prefill_tokens`).
        local = max(1, sampler.batch_shards // sampler.share[1])
        Bk = local * sampler._refill_rows(sampler.prompt_buckets.index(prompt_len), Bs // local)
        first = lambda x, Bk=Bk: abstract((Bk, *x.shape[1:]), x.dtype, parallel.named_sharding(  # noqa: E731
            mesh, ("batch",) + (None,) * (x.ndim - 1), (Bk, *x.shape[1:])))  # the refill's rows of a batch arg
        refill_args = lambda args=args, slots=slots, first=first: (  # noqa: E731
            args[0], slots(), first(args[1]), first(args[2]), first(row(jnp.int32)), None,  # no shared prefill
            RowSampling(*map(first, args[3])), args[4])
        out.append(Program(f"generate_{name}_refill[B={Bk},P={prompt_len},new={new}]",
                           lambda a=refill_args, kw=per_call: sampler._refill.lower(*a(), **kw), sampler_resident))
        segment_args = lambda args=args, slots=slots: (args[0], slots(), args[4], args[5], row(jnp.bool_),  # noqa: E731
                                                       args[5])
        out.append(Program(f"generate_{name}_segment[B={Bs},P={prompt_len},new={new}]",
                           lambda a=segment_args, kw=per_call: sampler._segment.lower(*a(), **kw), sampler_resident))
    if programs:
        out = [p for p in out if _selected(p.name, programs)]
    return out


def _slot_state(sampler, batch: int, prompt_len: int, n_new: int, key_shape):
    """The continuous-batching slot state as the sampler lays it out on the target (the
    shapes and shardings of its `_slots_init` program's output), abstract."""
    lowered = sampler._slots_init.lower(batch=batch, prompt_len=prompt_len, n_new=n_new, key_shape=key_shape)
    shardings = lowered.compile().output_shardings
    return jax.tree.map(lambda a, sh: abstract(a.shape, a.dtype, sh), lowered.out_info, shardings)


def _selected(name: str, wanted: set[str]) -> bool:
    """`--programs` matching: "train" or "train_step"; "rollout", "harness_plan",
    "rollout+harness_plan" or "generate_rollout+harness_plan"; "solve" or "harness_solve"."""
    base = name.split("[")[0].removesuffix("_refill").removesuffix("_segment")  # a call's slot-path programs
    short = base.removeprefix("generate_")
    parts = {short, base, *short.split("+")}
    parts |= {p.removeprefix("harness_") for p in parts} | {base.split("_")[0]}
    return bool(parts & wanted)


@dataclasses.dataclass
class Result:
    program: str
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    resident: int
    compile_s: float
    memory: int
    error: str = ""

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.code + self.resident

    @property
    def headroom(self) -> float:
        return 1 - self.total / self.memory

    @property
    def fits(self) -> bool:
        return not self.error and self.total <= self.memory


def compile_program(p: Program, memory: int) -> Result:
    t0 = time.perf_counter()
    try:
        compiled = p.lower().compile()
    except Exception as e:  # noqa: BLE001 - e.g. the TPU compiler's RESOURCE_EXHAUSTED
        msg = str(e).strip().splitlines()
        return Result(p.name, 0, 0, 0, 0, 0, p.resident_bytes, time.perf_counter() - t0, memory,
                      error=f"{type(e).__name__}: {msg[0] if msg else ''}"[:400])
    dt = time.perf_counter() - t0
    m = compiled.memory_analysis()
    return Result(p.name, m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                  m.temp_size_in_bytes, m.generated_code_size_in_bytes, p.resident_bytes, dt, memory)


def check(c, target_name: str, *, preset: str | None = None, programs: set[str] | None = None,
          headroom: float = 0.1, num_layers: int | None = None, log=print) -> dict:
    if target_name not in TARGETS:
        raise ValueError(f"unknown --target {target_name!r}; one of {', '.join(TARGETS)}")
    target = TARGETS[target_name]
    devices = target_devices(target)
    mesh = parallel.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    log(f"target {target.name} ({target.note}): {len(devices)} x {devices[0].device_kind}, "
        f"{target.memory_bytes / GiB:.1f} GiB per device; mesh {dict(mesh.shape)}")
    results = []
    for p in run_programs(c, mesh, preset=preset, programs=programs, num_layers=num_layers):
        r = compile_program(p, target.memory_bytes)
        results.append(r)
        log(_row(r, headroom))
    ok = all(r.fits and r.headroom >= headroom for r in results)
    return {"target": target.name, "devices": len(devices), "mesh": dict(mesh.shape),
            "memory_gib": round(target.memory_bytes / GiB, 2), "all_fit": ok, "min_headroom": headroom,
            "programs": [{**{k: v for k, v in dataclasses.asdict(r).items() if k != "memory"},
                          "total": r.total, "headroom": round(r.headroom, 4), "fits": r.fits} for r in results]}


def _gib(n: int) -> str:
    return f"{n / GiB:7.2f}"


HEADER = (f"{'program':58s} {'arg':>7s} {'out':>7s} {'alias':>7s} {'temp':>7s} {'code':>7s} {'resid':>7s} "
          f"{'total':>7s} GiB/device  compile   verdict")


def _row(r: Result, headroom: float) -> str:
    if r.error:
        return f"{r.program:58s} DOES NOT FIT / FAILED after {r.compile_s:.1f}s: {r.error}"
    verdict = "FITS" if r.fits else "DOES NOT FIT"
    if r.fits and r.headroom < headroom:
        verdict = "FITS (below headroom)"
    return (f"{r.program:58s} {_gib(r.argument)} {_gib(r.output)} {_gib(r.alias)} {_gib(r.temp)} {_gib(r.code)} "
            f"{_gib(r.resident)} {_gib(r.total)}            {r.compile_s:6.1f}s  {verdict}, headroom "
            f"{100 * r.headroom:.1f}%")


def main(argv):
    from ophsd_jax.config import validate

    c = FLAGS.config
    probe = c.copy_and_resolve_references()
    if probe.model.source == "hf" and not probe.model.path:  # compiled from a preset: no folder needed
        probe.model.path = "<preset>"
    validate(probe)
    jax.config.update("jax_platforms", "cpu")
    programs = set(FLAGS.programs.split(",")) if FLAGS.programs else None
    print(HEADER)
    report = check(c, FLAGS.target, preset=FLAGS.model, programs=programs, headroom=FLAGS.headroom,
                   num_layers=FLAGS.num_layers)
    report["config"] = FLAGS["config"].config_filename
    print(json.dumps(report))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=1)
    sys.exit(0 if report["all_fit"] else 1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from ophsd_jax.train import parse_flags

    config_flags.DEFINE_config_file("config", None, "a config file under configs/", lock_config=False,
                                    accept_new_attributes=True)
    flags.DEFINE_string("target", "v5p-64", f"one of: {', '.join(TARGETS)}")
    flags.DEFINE_string("model", None, "model preset when config.model.path is empty (qwen3-8b, smollm2-135m)")
    flags.DEFINE_string("programs", "", "comma-separated subset: train_step, generate_rollout+harness_plan, generate_harness_solve, ...")
    flags.DEFINE_integer("num_layers", None, "override the model's depth (quick what-if compiles)")
    flags.DEFINE_float("headroom", 0.1, "required free fraction of device memory")
    flags.DEFINE_string("json", "", "also write the report to this file")
    flags.mark_flags_as_required(["config"])
    FLAGS = flags.FLAGS
    app.run(main, flags_parser=parse_flags)
