"""Our decoder vs transformers on tiny random models of each family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances as tol
from hf_reference import hf_logits, make_hf_model, ragged_batch, save_hf_model
from ophsd_jax import parallel
from ophsd_jax.models import state as S
from ophsd_jax.models.weights import load_hf

CASES = {
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_rope_scaling_untied": ("llama", dict(tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, rope_theta=500000.0)),
    "qwen2_bias": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3_qknorm": ("qwen3", dict(tie_word_embeddings=True)),
}


def our_logits(graphdef, params, tokens, mask, remat=False):
    t, m = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)

    @jax.jit
    def f(params):
        h, _ = S.forward(graphdef, params, t, S.positions_from_mask(m), m)
        return S.logits(graphdef, params, h)

    return np.asarray(f(params))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("left_pad", [False, True])
def test_logits_match_transformers(case, left_pad, tmp_path):
    family, kw = CASES[case]
    hf = make_hf_model(family, **kw)
    path = save_hf_model(hf, tmp_path / case)
    cfg, graphdef, params = load_hf(path, parallel.single_device_mesh())
    assert cfg.family == family
    assert cfg.tie_word_embeddings == kw["tie_word_embeddings"]
    if "rope_scaling" in kw:
        assert cfg.rope_scaling_dict["rope_type"] == "llama3"
    tokens, mask = ragged_batch(cfg.vocab_size, [37, 12, 25], seed=1, left_pad=left_pad)
    ref = hf_logits(hf, tokens, mask)
    ours = our_logits(graphdef, params, tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ref[real]).max() > 1.0, "reference logits are too flat to be a meaningful check"
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=tol.logits_atol(cfg, graphdef, params, tokens.shape[1]))


def test_rope_scaling_changes_logits(tmp_path):
    """Guards the test above: without the llama3 scaling the logits must differ."""
    _, kw = CASES["llama_rope_scaling_untied"]
    hf = make_hf_model("llama", **kw)
    cfg, graphdef, params = load_hf(save_hf_model(hf, tmp_path / "m"), parallel.single_device_mesh())
    tokens, mask = ragged_batch(cfg.vocab_size, [60], seed=2)
    scaled = our_logits(graphdef, params, tokens, mask)
    graphdef2, _ = S.abstract_model(cfg.replace(rope_scaling=None))
    unscaled = our_logits(graphdef2, params, tokens, mask)
    assert np.abs(scaled - unscaled).max() > 1e-3


def test_bf16_and_remat(tmp_path):
    hf = make_hf_model("qwen3")
    path = save_hf_model(hf, tmp_path / "m")
    mesh = parallel.single_device_mesh()
    cfg, g32, p32 = load_hf(path, mesh)
    _, gbf, pbf = load_hf(path, mesh, param_dtype="bfloat16", dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(pbf))
    tokens, mask = ragged_batch(cfg.vocab_size, [20, 9], seed=3)
    ref = our_logits(g32, p32, tokens, mask)
    low = our_logits(gbf, pbf, tokens, mask)
    real = mask.astype(bool)
    err = np.abs(low[real] - ref[real]).max() / np.abs(ref[real]).max()
    assert 0 < err < 0.05  # bf16 is really used (err > 0) and still close

    # Rematerialisation changes memory, not math: same loss and gradient.
    _, grem, prem = load_hf(path, mesh, remat=True)
    t, m = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)

    def loss(g, p):
        h, _ = S.forward(g, p, t, S.positions_from_mask(m), m)
        return jnp.mean(S.logits(g, p, h) ** 2)

    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(g32, p)))(p32)
    l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(grem, p)))(prem)
    # Fusions differ, so the two differ by rounding. Logits z within e = logits_atol of each
    # other move mean(z^2) by at most 2 mean|z| e, plus the mean's own N-term sum.
    z = ref.astype(np.float64)  # the same logits (fp32, no remat), every position
    e = tol.logits_atol(cfg, g32, p32, tokens.shape[1])
    assert abs(float(l1) - float(l2)) <= 2 * np.abs(z).mean() * e + tol.pair(tol.prob(z.size)) * float(l1)
    # Gradients: the cotangent 2z/N is off by at most 2e/N per entry, relative e sqrt(N) / ||z||
    # in the L2 norm; the backward pass keeps that for a generic direction and adds its own
    # chain (the forward's again plus the sum over tokens). Per leaf, relative to its norm.
    n_bwd = 2 * tol.decoder_terms(cfg, tokens.shape[1]) + tokens.size
    rel = e * np.sqrt(z.size) / np.linalg.norm(z) + tol.pair(tol.prob(n_bwd))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert np.linalg.norm(np.asarray(a, np.float64) - b) <= rel * np.linalg.norm(b)


@pytest.mark.parametrize("head", ["different", "copy_of_embedding"])
def test_tied_config_with_stored_head_matches_transformers(head, tmp_path):
    """tie_word_embeddings=true, but the file also stores lm_head.weight: transformers keeps
    a head that differs from the embedding (untied) and ties an exact copy; so do we."""
    import transformers
    from safetensors.numpy import load_file, save_file

    path = save_hf_model(make_hf_model("llama", tie_word_embeddings=True), tmp_path / "m")
    tensors = load_file(f"{path}/model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    stored = embed.copy()
    if head == "different":
        stored = np.random.default_rng(5).normal(0, 0.08, embed.shape).astype(embed.dtype)
    tensors["lm_head.weight"] = stored
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})

    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    cfg, graphdef, params = load_hf(path, parallel.single_device_mesh())
    hf_tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert cfg.tie_word_embeddings == hf_tied == (head == "copy_of_embedding")
    tokens, mask = ragged_batch(cfg.vocab_size, [21, 8], seed=4)
    ref = hf_logits(hf, tokens, mask)
    ours = our_logits(graphdef, params, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=tol.logits_atol(cfg, graphdef, params, tokens.shape[1]))
