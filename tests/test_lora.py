"""LoRA (models/lora.py): the adapted model against independent references — the dense
merged formulation W + (alpha/r) a b, transformers on the merged export, peft on the
PEFT export — and the train step's adapter-only updates with the base as teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances as tol
from ophsd_jax import parallel
from ophsd_jax.distill.batch import PairBatch
from ophsd_jax.distill.step import OptimConfig, StepConfig, TrainStep, init_train_state, loss_fn, make_optimizer
from ophsd_jax.models import lora
from ophsd_jax.models import state as S
from ophsd_jax.models.config import ModelConfig
from test_train_step import make_batch, step_tolerances


def lora_terms(cfg, lcfg):
    """Sums the adapter adds along a logit's path (`tol.decoder_terms` counts the base): per
    layer and target, x a (over the projection's input, at most max(D, F) terms) and then
    times b (rank terms); merging W + scale a b instead sums rank terms into each weight."""
    return cfg.num_layers * len(lcfg.targets) * (max(cfg.hidden_size, cfg.intermediate_size) + lcfg.rank)



def tiny(family="qwen3", **kw):
    return ModelConfig.tiny(family, vocab_size=256, tie_word_embeddings=False, **kw)


def base_and_adapter(cfg, mesh, lcfg, b_std=0.0, seed=0):
    graphdef, params = S.init_params(cfg, mesh, seed=seed)
    params = jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x, params)  # non-trivial distributions
    return graphdef, params, lora.init_adapter(cfg, lcfg, mesh, seed=seed + 1, b_std=b_std)


def hidden(graphdef, params, tokens, mask, adapter=None, scale=1.0):
    t, m = jnp.asarray(tokens), jnp.asarray(mask)
    return S.forward(graphdef, params, t, S.positions_from_mask(m), m, lora=adapter, lora_scale=scale)[0]


def batch_tokens(seed=0, B=2, T=12):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (B, T)).astype(np.int32), np.ones((B, T), np.int32)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_zero_adapter_equals_base_exactly(family):
    mesh = parallel.single_device_mesh()
    cfg = tiny(family)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    graphdef, params, adapter = base_and_adapter(cfg, mesh, lcfg)
    assert all(np.all(np.asarray(ab["b"]) == 0) for ab in adapter.values())
    assert all(np.abs(np.asarray(ab["a"])).max() > 0 for ab in adapter.values())
    tokens, mask = batch_tokens()
    base = np.asarray(hidden(graphdef, params, tokens, mask))
    adapted = np.asarray(hidden(graphdef, params, tokens, mask, adapter, lcfg.scale))
    np.testing.assert_array_equal(adapted, base)
    merged = lora.merge(params, adapter, lcfg.scale)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "gate", "up", "down"), ("q", "v"), ("o", "down")])
def test_on_the_fly_equals_merged_and_differs_from_base(targets):
    mesh = parallel.single_device_mesh()
    cfg = tiny("qwen3")
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
    graphdef, params, adapter = base_and_adapter(cfg, mesh, lcfg, b_std=0.3)
    tokens, mask = batch_tokens()
    ours = np.asarray(hidden(graphdef, params, tokens, mask, adapter, lcfg.scale))
    ref = np.asarray(hidden(graphdef, lora.merge(params, adapter, lcfg.scale), tokens, mask))
    base = np.asarray(hidden(graphdef, params, tokens, mask))
    assert np.abs(ours - base).max() > 1e-2  # the adapter does something
    # fp32 rounding only: the merged weights round W + scale a b to fp32, on the fly adds the
    # rank-r term after the matmul. The final norm's output has norm sqrt(D) * max|weight| at
    # most; both chains (the decoder's without the head, plus the adapter's sums) are
    # relative to it.
    final_norm = np.abs(np.asarray(S.flat_names(params)["final_norm"].get_value())).max()
    n = tol.decoder_terms(cfg, tokens.shape[1]) - cfg.hidden_size + lora_terms(cfg, lcfg)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol.pair(tol.prob(n)) * np.sqrt(cfg.hidden_size) * final_norm)


def _pair_batch(seed=0):
    b = make_batch(np.random.default_rng(seed))
    return PairBatch(b.student, b.teacher, b.resp_tokens, b.resp_mask, b.row_mask), b.row_mask


@pytest.mark.parametrize("teacher", ["initial", "current"])
def test_lora_gradient_equals_merged_formulation(teacher):
    """d loss / d(a, b) with the adapter applied on the fly equals the gradient through the
    dense merged weights W + scale a b (the full fine-tuning loss on merged weights), and
    the loss itself matches with the teacher = the base ("initial") or the merged weights
    without gradient ("current")."""
    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = parallel.single_device_mesh()
    cfg = tiny("qwen3")
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    graphdef, params, adapter = base_and_adapter(cfg, mesh, lcfg, b_std=0.3)
    batch, weights = _pair_batch()
    lcfg_step = StepConfig(teacher=teacher, lora_scale=lcfg.scale)
    full_step = StepConfig(teacher=teacher)

    def ours(ad):
        return loss_fn(ad, params, batch, weights, graphdef, lcfg_step)[0]

    def dense(ad):
        merged = lora.merge(params, ad, lcfg.scale)
        if teacher == "initial":
            return loss_fn(merged, params, batch, weights, graphdef, full_step)[0]
        return loss_fn(merged, None, batch, weights, graphdef, full_step)[0]

    l1, g1 = jax.jit(jax.value_and_grad(ours))(adapter)
    l2, g2 = jax.jit(jax.value_and_grad(dense))(adapter)
    assert float(l1) > 1e-3
    flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    scale = max(np.abs(np.asarray(g)).max() for g in flat2)
    assert scale > 1e-4
    # Two fp32 formulations of the same step: the train step's bounds (test_train_step), for
    # the merged student against its teacher, with the adapter's sums on the path.
    grad_norm = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in flat2)))
    seq = max(batch.student.tokens.shape[1], batch.teacher.tokens.shape[1])
    merged = lora.merge(params, adapter, lcfg.scale)
    loss_atol, grad_atol = step_tolerances(graphdef, merged, batch, grad_norm, seq, cfg=cfg,
                                           teacher_params=params if teacher == "initial" else None,
                                           extra_terms=lora_terms(cfg, lcfg))
    assert abs(float(l1) - float(l2)) <= loss_atol
    for a, b in zip(flat1, flat2):  # an L2 bound on the whole gradient bounds every entry
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=grad_atol)
    jax.config.update("jax_default_matmul_precision", None)


def test_step_changes_only_the_adapter_and_the_teacher_stays_the_base():
    """Three LoRA steps on 8 devices (fsdp 4 x tensor 2): the base weights never change, every adapter
    leaf does, optimizer moments exist for the adapter only, and at every step the loss
    equals the loss of the merged student against the *base* as teacher."""
    mesh = parallel.make_mesh(1, 4, 2)
    cfg = tiny("qwen3")
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    graphdef, params, adapter = base_and_adapter(cfg, mesh, lcfg)
    base_before = [np.asarray(x) for x in jax.tree.leaves(params)]
    opt = make_optimizer(OptimConfig(learning_rate=1e-2, weight_decay=0.0))
    state = init_train_state(adapter, opt, mesh)
    n_adapter = len(jax.tree.leaves(adapter))
    assert sum(x.ndim > 0 for x in jax.tree.leaves(state.opt_state)) == 2 * n_adapter  # mu, nu for the adapter only
    step_cfg = StepConfig(teacher="initial", lora_scale=lcfg.scale)
    step = TrainStep(graphdef, step_cfg, opt, mesh, state, teacher_params=params)
    ref_loss = jax.jit(lambda merged, b, w: loss_fn(merged, params, b, w, graphdef, StepConfig())[0])
    prev = jax.tree.map(np.asarray, state.params)
    for i in range(3):
        batch, weights = _pair_batch(seed=i)
        merged = lora.merge(params, state.params, lcfg.scale)
        expected = float(ref_loss(merged, jax.tree.map(jnp.asarray, batch), jnp.asarray(weights)))
        state, metrics = step(state, params, batch)
        seq = max(batch.student.tokens.shape[1], batch.teacher.tokens.shape[1])
        loss_atol, _ = step_tolerances(graphdef, merged, batch, 0.0, seq, cfg=cfg, teacher_params=params,
                                       extra_terms=lora_terms(cfg, lcfg))
        assert abs(float(metrics["loss"]) - expected) <= loss_atol, (float(metrics["loss"]), expected, loss_atol)
        # with b = 0 the gradient of a is exactly zero (x^T (dy b^T)): the first step moves b only
        moved = {f"{n}.{k}": bool(np.abs(np.asarray(v) - prev[n][k]).max() > 0)
                 for n, ab in state.params.items() for k, v in ab.items()}
        assert moved == {key: i > 0 or key.endswith(".b") for key in moved}, moved
        prev = jax.tree.map(np.asarray, state.params)
        for a, b in zip(jax.tree.leaves(params), base_before):
            np.testing.assert_array_equal(np.asarray(a), b)
    assert int(state.step) == 3


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_merged_export_loads_in_transformers_and_peft_adapter_in_peft(family, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from hf_reference import hf_logits, ragged_batch
    from ophsd_jax.models.weights import save_hf
    from test_model_parity import our_logits

    mesh = parallel.single_device_mesh()
    cfg = ModelConfig.tiny(family, vocab_size=320, tie_word_embeddings=family == "llama", eos_token_id=2,
                           bos_token_id=1)
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    graphdef, params, adapter = base_and_adapter(cfg, mesh, lcfg, b_std=0.3)
    tokens, mask = ragged_batch(cfg.vocab_size, [17, 11], seed=3)
    real = mask.astype(bool)
    t, m = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
    h = S.forward(graphdef, params, t, S.positions_from_mask(m), m, lora=adapter, lora_scale=lcfg.scale)[0]
    ours = np.asarray(S.logits(graphdef, params, h))
    assert np.abs(ours - our_logits(graphdef, params, tokens, mask))[real].max() > 1e-2  # adapter matters

    merged_dir = save_hf(cfg, lora.merge(params, adapter, lcfg.scale), str(tmp_path / "merged"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    # the on-the-fly adapter against the merged weights in transformers (and peft's on the fly)
    atol = tol.logits_atol(cfg, graphdef, params, tokens.shape[1], extra_terms=lora_terms(cfg, lcfg))
    np.testing.assert_allclose(hf_logits(hf, tokens, mask)[real], ours[real], rtol=0, atol=atol)

    base_dir = save_hf(cfg, params, str(tmp_path / "base"))
    adapter_dir = lora.save_peft(cfg, lcfg, adapter, str(tmp_path / "adapter"), base_model=base_dir)
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(base_hf, adapter_dir).eval()
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_" in n)
    assert n_lora == 2 * len(lcfg.targets) * cfg.num_layers
    np.testing.assert_allclose(hf_logits(peft_model, tokens, mask)[real], ours[real], rtol=0, atol=atol)


def test_config_validation_names_the_key():
    from ophsd_jax.config import ConfigValueError, base_config, validate

    for key, value, words in [("rank", -1, "lora.rank"), ("alpha", 0.0, "lora.alpha"),
                              ("targets", ("q", "qq"), "lora.targets"), ("dtype", "float16", "lora.dtype")]:
        c = base_config()
        c.lora.rank = 4
        c.lora[key] = value
        with pytest.raises(ConfigValueError, match=words.replace(".", r"\.")):
            validate(c)


@pytest.mark.slow
def test_lora_training_cli_resumes_bitwise_after_sigkill_and_exports(tmp_path):
    """configs/tiny.py with --config.lora.rank=4 end to end: an uninterrupted run and one
    killed with SIGKILL after its second checkpoint, then resumed, end with bitwise equal
    adapters (compared through the merged export); the PEFT export is written."""
    import os
    import signal
    import subprocess
    import sys

    from safetensors.numpy import load_file
    from test_trainer import ROOT, cli, complete_steps, env, read_metrics, train_args, wait_for

    extra = ("--config.lora.rank=4", "--config.lora.alpha=8", "--config.train.save_every=1")
    ref_dir, killed = tmp_path / "ref", tmp_path / "killed"
    cli("ophsd_jax.train", *train_args(ref_dir, *extra))
    assert all(np.isfinite(r["loss"]) for r in read_metrics(ref_dir))
    proc = subprocess.Popen([sys.executable, "-m", "ophsd_jax.train", *train_args(killed, *extra)], cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: complete_steps(killed) and complete_steps(killed)[-1] >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    k = complete_steps(killed)[-1]
    assert k < 4, "the run finished before it could be killed"
    resumed = cli("ophsd_jax.train", *train_args(killed, *extra))
    assert f"resumed from {killed}/checkpoints/{k}" in resumed.stderr

    out = {}
    for d in (ref_dir, killed):
        cli("ophsd_jax.export", "--workdir", str(d), "--out", str(d / "hf"), "--peft_out", str(d / "peft"))
        out[d] = (load_file(str(d / "hf" / "model.safetensors")),
                  load_file(str(d / "peft" / "adapter_model.safetensors")))
        assert os.path.exists(d / "peft" / "adapter_config.json")
    for a, b in zip(out[ref_dir], out[killed]):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert max(np.abs(v).max() for n, v in out[ref_dir][1].items() if "lora_B" in n) > 0  # it trained
