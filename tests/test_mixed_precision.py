"""bf16 compute with fp32 student params and a frozen bf16 teacher copy: both loss heads
must run in the same (compute) dtype, so identical contexts give exactly zero."""

import jax
import numpy as np

from ophsd_jax import parallel, runtime
from ophsd_jax.config import base_config
from ophsd_jax.distill.batch import build_pair_batch
from ophsd_jax.distill.step import TrainStep, init_train_state
from ophsd_jax.models import state as S
from ophsd_jax.models.config import ModelConfig


class IdsTokenizer:
    """Message content is space-separated token ids; a 2-token chat wrapper."""

    pad_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt=True):
        ids = []
        for m in messages:
            ids += [1] + [int(x) for x in m["content"].split()]
        return ids + ([2] if add_generation_prompt else [])


def test_bf16_frozen_teacher_on_identical_contexts_gives_exactly_zero():
    c = base_config()
    c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
    c.distill.teacher, c.train.batch_size = "initial", 4
    mesh = parallel.single_device_mesh()
    # Per-layer remat: both forwards compile to the same primal program (see
    # test_train_step.test_identical_contexts_give_zero_loss_and_gradient), so any
    # difference left is the heads' precision.
    # Untied head: on XLA:CPU the train step of a tied bf16 head does not run (the head
    # gradient's bf16 x bf16 -> f32 dot, transposed into the embedding, is unsupported).
    cfg = ModelConfig.tiny("llama", vocab_size=256, tie_word_embeddings=False, remat=True,
                           param_dtype=c.model.param_dtype, dtype=c.model.dtype)
    graphdef, params = S.init_params(cfg, mesh, seed=0)
    params = jax.tree.map(lambda x: x * 5.0 if x.ndim > 1 else x, params)  # non-trivial distributions
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
    # The frozen initial teacher, as Run.create keeps it: a copy in the compute dtype.
    teacher = jax.tree.map(lambda x: x.astype(cfg.dtype) + 0, params)
    optimizer = runtime.optimizer(c)
    state = init_train_state(params, optimizer, mesh)
    step = TrainStep(graphdef, runtime.step_config(c, mesh), optimizer, mesh, state)

    rng = np.random.default_rng(0)
    prompts = [[{"role": "user", "content": " ".join(map(str, rng.integers(3, 250, 5)))}] for _ in range(4)]
    responses = [rng.integers(3, 250, int(n)).tolist() for n in rng.integers(4, 9, 4)]
    batch = build_pair_batch(IdsTokenizer(), prompts, prompts, responses, buckets=(8, 16, 32), batch_size=4)
    _, metrics = step(state, teacher, batch)
    assert float(metrics["tokens"]) == batch.resp_mask.sum() > 0
    assert float(metrics["student_entropy"]) > 0.1  # the heads do produce spread-out distributions
    assert float(metrics["loss"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0
