"""Deviceless compiles for a TPU slice and an 8-GPU node keep the training state sharded.

A small Qwen3-shaped model's train step is compiled for a v5p-8-class TPU topology
(4 chips) and a deviceless 8xH100 node (XLA's own compilers, no accelerator here); the
test reads the compiled program's shardings and memory analysis. Needs the compile-only
extras (requirements-compile.txt, installed by `scripts/setup.sh --test`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ophsd_jax import parallel
from ophsd_jax.config import base_config
from ophsd_jax.distill.step import init_train_state, make_optimizer, OptimConfig

cc = pytest.importorskip("ophsd_jax.compile_check")

# Layer weights dominate (as in an 8B model): a replicated fp32 copy of them (moments, the
# gradient accumulator) shows in the compiled memory; short sequences keep activations small.
MODEL = dict(family="qwen3", vocab_size=2048, hidden_size=512, intermediate_size=2048, num_layers=8, num_heads=8,
             num_kv_heads=4, head_dim=64, tie_word_embeddings=False)
SEQ, RESP = 256, 128


def small_config(batch, micro):
    c = base_config()
    c.model.source = "random"
    c.model.random = MODEL
    c.model.param_dtype, c.model.dtype, c.model.remat = "float32", "bfloat16", True
    c.train.batch_size, c.distill.micro_batches = batch, micro
    c.rollout.max_new_tokens = RESP
    c.distill.student_buckets, c.distill.teacher_buckets, c.distill.response_buckets = (SEQ,), (SEQ,), (RESP,)
    c.sampler.max_batch = batch
    c.sampler.prompt_buckets, c.sampler.new_token_buckets = (128,), (RESP,)
    c.eval.max_new_tokens = RESP
    c.distill.tile = 64
    return c


def _devices(name):
    try:
        return cc.target_devices(cc.TARGETS[name])
    except RuntimeError as e:
        pytest.fail(f"deviceless {name} topology unavailable: {e}")


# (target, batch): 2 micro-batches of 3 rows per device (3: no head count or other dim is 3,
# so the activation shapes the tests look for cannot be mistaken for another tensor's).
TARGETS = [("v5p-8", 24), ("8xH100", 48)]


@pytest.fixture(scope="module", params=TARGETS, ids=[t for t, _ in TARGETS])
def compiled_step(request):
    name, batch = request.param
    devices = _devices(name)
    mesh = parallel.make_mesh(1, -1, 1, devices=devices)
    c = small_config(batch, micro=2)
    (train,) = [p for p in cc.run_programs(c, mesh) if p.name.startswith("train_step")]
    compiled = train.lower().compile()
    return name, mesh, c, compiled


LARGE = 1 << 20  # leaves of at least 1 MiB must be split over the mesh


def test_no_large_state_leaf_is_replicated(compiled_step):
    name, mesh, c, compiled = compiled_step
    # The compiled step's own view of its state argument: shapes and the shardings it takes.
    (state_info, *_), _ = compiled.args_info
    (state_sh, *_), _ = compiled.input_shardings
    infos = jax.tree_util.tree_leaves_with_path(state_info, is_leaf=lambda x: isinstance(x, jax.stages.ArgInfo))
    shardings = jax.tree.leaves(state_sh, is_leaf=lambda x: x is None)  # None: an argument XLA pruned
    assert len(infos) == len(shardings) and any("mu" in jax.tree_util.keystr(p) for p, _ in infos)
    checked = 0
    for (path, info), sh in zip(infos, shardings):
        nbytes = math.prod(info.shape) * jnp.dtype(info.dtype).itemsize
        if nbytes >= LARGE and sh is not None:
            key = jax.tree_util.keystr(path)
            assert not sh.is_fully_replicated, f"{name}: {key} {info.shape} is replicated"
            shard = math.prod(sh.shard_shape(info.shape)) * jnp.dtype(info.dtype).itemsize
            assert shard * mesh.size == nbytes, f"{name}: {key} not split evenly"
            checked += 1
    assert checked >= 3 * 2  # embed and lm_head: params, mu and nu each


def _param_bytes(c):
    from ophsd_jax.models import state as model_state

    _, params = model_state.abstract_model(cc.model_config(c))
    return sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(params))  # fp32


def test_temp_memory_is_bounded_by_the_shapes(compiled_step):
    """The gradient and its accumulator are sharded: the step's temporaries stay under a
    bound from the shapes that a replicated fp32 accumulator would exceed (checked by
    forcing one: v5p-8 temp 147 -> 301 MiB against this bound's 226 MiB).

    Bound, per device: every layer's weights gathered in the compute dtype (bf16: half an
    fp32 copy; the compiler may keep them all), the gradient and the accumulator (two
    sharded fp32 copies), the loss's logits tiles (tile x vocab fp32, 4 live) and the
    activations of one micro-batch's rows on this device (one saved [rows, T, width] fp32
    per layer under remat, plus 8 for the layer being recomputed)."""
    name, mesh, c, compiled = compiled_step
    n = mesh.size
    full = _param_bytes(c)
    rows = c.train.batch_size // c.distill.micro_batches // n
    width = max(MODEL["intermediate_size"], MODEL["hidden_size"])
    logits = 4 * c.distill.tile * MODEL["vocab_size"] * 4
    acts = (MODEL["num_layers"] + 8) * rows * SEQ * width * 4
    bound = full / 2 + 2 * full / n + logits + acts
    assert bound < full / 2 + full + 2 * full / n, "the bound must leave no room for a replicated fp32 copy"
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < bound, f"{name}: temp {temp / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"


def test_activations_are_sharded_over_the_batch(compiled_step):
    """Every device computes only its rows: the per-device program holds the hidden states
    of rows/n rows per micro-batch, never the whole micro-batch's."""
    name, mesh, c, compiled = compiled_step
    n = mesh.size
    rows = c.train.batch_size // c.distill.micro_batches
    hlo = compiled.as_text()
    D = MODEL["hidden_size"]
    assert f"[{rows // n},{SEQ},{D}]" in hlo, f"{name}: no per-device [{rows // n},{SEQ},{D}] activations"
    assert f"[{rows},{SEQ},{D}]" not in hlo, f"{name}: a whole micro-batch's activations on one device"


def test_micro_batch_rows_that_cannot_be_split_are_an_error():
    mesh = parallel.make_mesh(1, -1, 1, devices=_devices("v5p-8"))
    with pytest.raises(ValueError, match=r"micro_batches=4 .* use micro_batches in \[1, 2\]"):
        cc.run_programs(small_config(8, micro=4), mesh)


def test_optimizer_moments_take_the_params_shardings():
    """On the 8 CPU devices of the test process: real arrays, the path a run takes."""
    from ophsd_jax.models import state as model_state
    from ophsd_jax.models.config import ModelConfig

    mesh = parallel.make_mesh(1, -1, 1)
    cfg = ModelConfig(**{**MODEL, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "head_dim": 16})
    _, params = model_state.init_params(cfg, mesh)
    state = init_train_state(params, make_optimizer(OptimConfig()), mesh)
    params_specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(params)}
    checked = 0
    for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):
        key = jax.tree_util.keystr(path)
        match = [k for k in params_specs if key.endswith(k)]
        if match and x.ndim:
            assert x.sharding.spec == params_specs[match[0]], key
            checked += 1
        else:
            assert x.sharding.is_fully_replicated, key
    assert checked == 2 * len(params_specs)  # Adam's mu and nu for every parameter
    assert any(s != jax.sharding.PartitionSpec() for s in params_specs.values())
    np.testing.assert_array_equal(np.asarray(state.step), 0)


def test_bad_hf_config_is_a_one_line_error_naming_the_file(tmp_path):
    """The deviceless check reads a folder's config.json through the loader's checks."""
    from ophsd_jax.models.weights import CheckpointError

    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_size": 320, '
                                          '"hidden_size": 64, "intermediate_size": 128, '
                                          '"num_hidden_layers": 2, "num_attention_heads": "4"}')
    c = base_config()
    c.model.source, c.model.path = "hf", str(tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.json: 'num_attention_heads' must be an integer, got '4'$"):
        cc.model_config(c)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got list$"):
        cc.model_config(c)


@pytest.mark.parametrize("name,batch", TARGETS, ids=[t for t, _ in TARGETS])
def test_the_slot_path_programs_are_compiled_with_the_cache_sharded_over_the_batch(name, batch):
    """Continuous batching (and calls whose prompts span buckets) runs `_refill` and
    `_segment` on a slot state, not `_start`: the check compiles both for every
    generation call (the segment's per-row cache write once failed XLA:GPU's verifier on a
    sharded batch), and their arguments hold the slot state's KV cache split over the
    batch shards. The refill writes each device's rows into its own slots: on the GPU
    node its temporaries stay within twice those of the static program that prefills the
    same rows at the same bucket (a scatter across devices made them 3.6x)."""
    devices = _devices(name)
    mesh = parallel.make_mesh(1, -1, 1, devices=devices)
    c = small_config(batch, micro=2)
    c.sampler.prompt_buckets = (1024,)  # the cache, not the weights, dominates the slot programs
    programs = {p.name.split("[")[0].removeprefix("generate_rollout+harness_plan"): p
                for p in cc.run_programs(c, mesh, programs={"rollout"})
                if p.name.startswith("generate_rollout")}  # the rollout joined with the harness's first call
    assert {"", "_refill", "_segment"} <= set(programs)
    P, new, B = 1024, RESP, c.sampler.max_batch
    m = MODEL
    dtype_bytes = jnp.dtype(c.model.dtype).itemsize
    cache = B * (P + new) * m["num_layers"] * 2 * m["num_kv_heads"] * m["head_dim"] * dtype_bytes
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    weights = cc.device_bytes(cc.abstract_params(cc.model_config(c), mesh)[1])  # the sampler reads the train layout
    # Besides the cache, the slot state's per-row arrays and the refill's prompts: a few bytes per slot and token.
    rows = B * (P + new) * 4 + B * new * 8 + B * P * 12
    memory = cc.TARGETS[name].memory_bytes
    results = {kind: cc.compile_program(programs[kind], memory) for kind in ("", "_refill", "_segment")}
    for kind in ("_refill", "_segment"):
        r = results[kind]
        assert not r.error, r.error
        assert cache / shards <= r.argument - weights <= (cache + rows) / shards + (1 << 16), (kind, r.argument, cache)
    if name == "8xH100":
        assert results["_refill"].temp < 2 * results[""].temp, (results["_refill"].temp, results[""].temp)


@pytest.mark.parametrize("join_calls", [True, False])
def test_the_generation_calls_follow_sampler_join_calls(join_calls):
    """The rollout joined with the harness's first call is one program, or two without."""
    c = small_config(8, micro=1)
    c.harness.name, c.sampler.join_calls = "plan_solve", join_calls
    names = [name for name, *_ in cc._generation_calls(c)]
    if join_calls:
        assert names == ["rollout+harness_plan", "eval+harness_plan", "harness_solve"]
    else:
        assert names == ["rollout", "eval", "harness_plan", "harness_solve"]
