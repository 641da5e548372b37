"""The sampler benchmark's own inputs: the bytes it counts per decode step (the numerator
of bandwidth_fraction) and its prompts. Timings themselves are not tested."""

import jax
import pytest

from ophsd_jax import parallel
from ophsd_jax.benchmarks.sampler import decode_bytes, make_prompts
from ophsd_jax.models import bundled
from ophsd_jax.models import state as S
from ophsd_jax.models.config import ModelConfig
from ophsd_jax.models.transformer import KVCache


@pytest.mark.parametrize("family,tied,param_dtype", [("llama", True, "float32"), ("qwen2", False, "bfloat16"),
                                                     ("qwen3", False, "float32")])
def test_decode_bytes_are_every_weight_once_plus_the_live_cache(family, tied, param_dtype):
    cfg = ModelConfig(family=family, vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=8, tie_word_embeddings=tied, param_dtype=param_dtype)
    _, params = S.init_params(cfg, parallel.single_device_mesh())
    weights = sum(x.nbytes for x in jax.tree.leaves(params))  # the real arrays (a tied head is the embedding)
    B, P, N = 3, 5, 4
    slots = P + N
    cache = KVCache.zeros(cfg, B, slots, "float32")
    per_slot = (cache.k.nbytes + cache.v.nbytes) / slots
    live = sum(P + step for step in range(1, N)) / (N - 1)  # decode step i attends over P + i slots
    assert decode_bytes(cfg, B, P, N, param_dtype, "float32") == pytest.approx(weights + per_slot * live)


@pytest.mark.parametrize("batch,length", [(8, 128), (4, 2000)])
def test_prompts_have_the_asked_length_and_differ(batch, length):
    prompts = make_prompts(bundled.load_bundled_tokenizer(), batch, length)
    assert len(prompts) == batch and {len(p) for p in prompts} == {length}
    assert len({tuple(p) for p in prompts}) == batch


def test_host_memory_reports_every_phase_under_the_kernels_high_water_mark(tmp_path):
    """The host-memory benchmark runs the trainer and labels its RSS samples by phase: every
    phase of a run appears, in order, and no sampled peak exceeds the kernel's VmHWM."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "ophsd_jax.benchmarks.host_memory", "--config",
                           os.path.join(root, "configs", "tiny.py"), "--workdir", str(tmp_path / "run"),
                           "--config.train.steps=1"], cwd=root, env={**env, "PYTHONPATH": root},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    phases = [p for p in out["peak_rss_gb_by_phase"] if p != "other"]  # (between phases: may be missed)
    assert phases[:2] == ["setup", "evaluation @ 0"] and phases[-1] == "evaluation @ 1", phases
    assert {"generate", "update", "checkpoint save"} <= set(phases), phases
    assert all(0 < v <= out["peak_rss_gb"] + 1e-3 for v in out["peak_rss_gb_by_phase"].values()), out
