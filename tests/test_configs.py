"""Every config file loads and validates; the paper configs build abstractly (shapes,
mesh, shardings) without weights. Memory per device is the compiler's to say
(ophsd_jax.compile_check, tests/test_compile_check.py)."""

import glob
import importlib.util
import math
import os
import types

import jax
import pytest

from ophsd_jax import parallel
from ophsd_jax.config import ConfigValueError, validate
from ophsd_jax.models import state as S
from ophsd_jax.models.config import ModelConfig

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "*.py")))
PAPER = [p for p in CONFIGS if os.path.basename(p).startswith("qwen3_8b") and not p.endswith("_lora.py")]
LORA = [p for p in CONFIGS if p.endswith("qwen3_8b_opsd_math_lora.py")]


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates(path):
    c = load(path)
    if c.model.source == "hf":
        with pytest.raises(ConfigValueError, match="config.model.path"):
            validate(c)  # the user must say where the weights are
        c.model.path = "/models/Qwen3-8B"
    validate(c)


def test_unknown_keys_are_rejected_outside_open_sections():
    c = load([p for p in CONFIGS if p.endswith("tiny.py")][0])
    c.harness.options.some_option = 3  # open: the harness checks its own options
    c.task_options.other = "x"
    c.data.eval = {"kind": "gsm8k_jsonl", "path": "/data/test.jsonl"}
    validate(c)
    c.optim.learnig_rate = 1e-5
    with pytest.raises(ConfigValueError, match=r"config\.optim\.learnig_rate: unknown key; did you mean "
                                               r"optim\.learning_rate\?"):
        validate(c)
    del c.optim.learnig_rate
    c.rollouts = {"max_new_tokens": 3}
    with pytest.raises(ConfigValueError, match=r"config\.rollouts: unknown key; did you mean rollout\?"):
        validate(c)


def test_teacher_overflow_policy_is_validated():
    c = load([p for p in CONFIGS if p.endswith("tiny.py")][0])
    assert c.distill.teacher_overflow == "skip"  # the safe default: nothing is cut
    c.distill.teacher_overflow = "shorten"
    validate(c)
    c.distill.teacher_overflow = "truncate"
    with pytest.raises(ConfigValueError, match=r"config\.distill\.teacher_overflow: must be one of "
                                               r"\['skip', 'shorten'\] \(got 'truncate'\)"):
        validate(c)


def test_paper_settings():
    assert len(PAPER) == 4
    for path in PAPER:
        c = load(path)
        assert (c.optim.learning_rate, c.optim.weight_decay, c.optim.grad_clip, c.optim.warmup_steps) == \
            (1e-6, 0.1, 1.0, 0)
        assert (c.train.batch_size, c.train.steps, c.train.eval_every) == (64, 150, 10)
        assert (c.eval.temperature, c.eval.top_p, c.eval.top_k, c.eval.k) == (0.6, 0.8, 20, 8)
    math_cfg = load([p for p in PAPER if p.endswith("qwen3_8b_math.py")][0])
    assert math_cfg.rollout.max_new_tokens == 8192 and math_cfg.distill.teacher_buckets[-1] == 12288
    assert load([p for p in PAPER if "opsd" in p][0]).harness.name == "opsd"


def test_lora_recipe_config():
    """The OPSD recipe with LoRA: rank 64, alpha 128, the base (adapter off) as the fixed
    teacher; otherwise the OPSD math config's data, lengths and batch."""
    (path,) = LORA
    lora, opsd = load(path), load([p for p in PAPER if "opsd" in p][0])
    assert (lora.lora.rank, lora.lora.alpha, lora.distill.teacher) == (64, 128, "initial")
    assert lora.harness.name == opsd.harness.name == "opsd"
    for key in ("train.batch_size", "rollout.max_new_tokens", "distill.teacher_buckets", "distill.student_buckets"):
        section, name = key.split(".")
        assert lora[section][name] == opsd[section][name], key


def per_device_elements(abstract, mesh):
    """Parameter elements one device holds under the rules table (naive count from the specs)."""
    total = 0
    for var in S.flat_names(abstract).values():
        shape = var.get_value().shape
        spec = parallel.logical_to_spec(var.get_metadata()["axes"], shape, mesh)
        mesh_axes = [a for axes in spec if axes for a in ((axes,) if isinstance(axes, str) else axes)]
        shards = math.prod(mesh.shape[a] for a in mesh_axes)
        total += math.prod(shape) // shards
    return total


@pytest.mark.parametrize("path", PAPER, ids=os.path.basename)
def test_paper_config_builds_abstractly(path):
    c = load(path)
    cfg = ModelConfig.qwen3_8b(param_dtype=c.model.param_dtype, dtype=c.model.dtype, remat=c.model.remat)
    graphdef, abstract = S.abstract_model(cfg)  # shapes only, nothing allocated
    n_params = sum(x.size for x in jax.tree.leaves(abstract))
    assert n_params == cfg.num_params() and 8.1e9 < n_params < 8.3e9
    # The config's mesh (fsdp over all chips) on a v5p-64 slice (32 chips), as abstract axis sizes.
    mesh = types.SimpleNamespace(shape={"data": c.mesh.data, "fsdp": 32 if c.mesh.fsdp == -1 else c.mesh.fsdp,
                                        "tensor": c.mesh.tensor})
    specs = {name: parallel.logical_to_spec(var.get_metadata()["axes"], var.get_value().shape, mesh)
             for name, var in S.flat_names(abstract).items()}
    assert specs["layers.wq"][1] == "fsdp" and specs["embed"][1] == "fsdp"
    # Every weight splits evenly over the 32 chips; only the norms are replicated (exact counts).
    norms = sum(var.get_value().size for name, var in S.flat_names(abstract).items() if name.endswith("norm"))
    assert per_device_elements(abstract, mesh) * 32 == n_params + 31 * norms


def test_replicate_arithmetic_difficulty_levels():
    """configs/replicate_arithmetic.py:<level> (ml_collections' parameter syntax, also through
    the CLIs): each level validates and names its generator settings; an unknown level is a
    one-line error (exit 2) naming it and the choices."""
    import subprocess
    import sys

    path = next(p for p in CONFIGS if p.endswith("replicate_arithmetic.py"))
    spec = importlib.util.spec_from_file_location("replicate_arithmetic", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.get_config().data.train.to_dict()["families"] == ["products", "chain_sum", "gsm_symbolic"]
    for level in mod.LEVELS:
        c = mod.get_config(level)
        validate(c)
        assert c.data.train.to_dict()["options"] == mod.LEVELS[level]["options"]
    proc = subprocess.run([sys.executable, "-m", "ophsd_jax.train", "--config", f"{path}:bogus", "--workdir", "/nonexistent/x"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(lines) == 1 and "'bogus'" in lines[0] and "tiny" in lines[0], proc.stderr[-2000:]
