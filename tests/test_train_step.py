"""The jitted OPHSD train step: no teacher-gradient leak, sharded == unsharded,
micro-batching, non-finite skipping, compile counts, and a learning test."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tolerances as tol
from ophsd_jax import parallel
from ophsd_jax.distill.batch import build_pair_batch
from ophsd_jax.distill.step import OptimConfig, StepConfig, TrainStep, init_train_state, make_optimizer
from ophsd_jax.models import state as S
from ophsd_jax.models.config import ModelConfig


class IdsTokenizer:
    """Messages whose content is space-separated token ids; a 2-token chat wrapper."""

    pad_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt=True):
        ids = []
        for m in messages:
            ids += [1] + [int(x) for x in m["content"].split()]
        return ids + ([2] if add_generation_prompt else [])


def msgs(ids):
    return [{"role": "user", "content": " ".join(map(str, ids))}]


def make_batch(rng, n=4, teacher_extra=True, batch_size=4, buckets=(8, 16, 32, 64)):
    student, teacher, responses = [], [], []
    for _ in range(n):
        prompt = rng.integers(3, 200, rng.integers(3, 8)).tolist()
        answer = rng.integers(3, 200, rng.integers(4, 9)).tolist()
        student.append(msgs(prompt))
        teacher.append(msgs(prompt + [250] + answer) if teacher_extra else msgs(prompt))  # the answer as a hint
        responses.append(answer)
    return build_pair_batch(IdsTokenizer(), student, teacher, responses, buckets=buckets, batch_size=batch_size)


# For comparing two runs: Adam's g/sqrt(v) turns reduction-order noise in near-zero
# gradients into full-size updates. With eps = 1 the update lr * m/(sqrt(v) + eps) is smooth:
# m and sqrt(v) (bias-corrected averages) move by at most max|dg| when the gradients move
# by dg, so the update by at most lr * (1 + |m|) * max|dg| (at the first step m = g).
SMOOTH_ADAM = OptimConfig(learning_rate=1e-3, weight_decay=0.01, eps=1.0)


def batch_logits(graphdef, params, batch, teacher_params=None):
    """fp32 student and teacher logits at the response positions: the loss's inputs."""
    out = []
    for side, p in ((batch.student, params), (batch.teacher, params if teacher_params is None else teacher_params)):
        h, _ = S.forward(graphdef, p, *(jnp.asarray(x) for x in (side.tokens, side.positions, side.attn_mask)))
        h = jnp.take_along_axis(h, jnp.asarray(side.resp_index)[..., None], axis=1)
        out.append(np.asarray(S.logits(graphdef, p, h)))
    return out


def step_tolerances(graphdef, params, batch, grad_norm, seq_len, cfg=None, teacher_params=None, extra_terms=0):
    """How far two fp32 evaluations of one train step (another batch split, another
    sharding, another formulation) may be apart: (loss atol, gradient atol in the L2 norm),
    from the bounds of `tolerances` for the step's own input logits: the decoder forward's
    error, what it and the divergence's rounding do to the loss and to its cotangent, and
    the backward pass's chain of reductions (the forward's again, plus the sum over tokens).
    `extra_terms`: sums one formulation adds along the path (LoRA's low-rank products)."""
    s, t = batch_logits(graphdef, params, batch, teacher_params)
    m = batch.resp_mask.astype(bool)
    n_fwd = tol.decoder_terms(cfg or CFG, seq_len) + extra_terms
    teacher_scale = tol.model_logit_scale(graphdef, params if teacher_params is None else teacher_params)
    logits_err = tol.prob(n_fwd) * max(tol.model_logit_scale(graphdef, params), teacher_scale)
    loss_atol = tol.pair(tol.divergence_atol(s, t, m, logits_err, weights=batch.row_mask))
    grad_rtol = tol.pair(tol.divergence_grad_rtol(s, t, m, logits_err, weights=batch.row_mask)
                         + tol.prob(2 * n_fwd + int(m.sum())))
    return loss_atol, grad_rtol * grad_norm


CFG = ModelConfig.tiny("llama", vocab_size=256, tie_word_embeddings=False)


def setup(mesh, step_cfg=StepConfig(), optim=OptimConfig(learning_rate=1e-3, weight_decay=0.01), seed=0,
          family="llama", remat=False, scale=5.0):
    cfg = CFG.replace(family=family, remat=remat)
    graphdef, params = S.init_params(cfg, mesh, seed=seed)
    params = jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, params)  # non-trivial distributions
    opt = make_optimizer(optim)
    teacher = None if step_cfg.teacher == "current" else jax.tree.map(jnp.copy, params)
    state = init_train_state(params, opt, mesh)
    return graphdef, state, teacher, TrainStep(graphdef, step_cfg, opt, mesh, state)


@pytest.mark.parametrize("remat", [True, False])
def test_identical_contexts_give_zero_loss_and_gradient(remat):
    """Teacher = live weights on the student's own context: nothing to learn, and any
    gradient through the teacher path would show up here.

    With per-layer remat both forwards compile to the same primal program, so the
    result is exactly 0. Without it XLA fuses the student forward differently (it also
    emits residuals for the backward pass): hidden states differ in the last bits, so
    the check is a tolerance there (loss ~1e-8, grad norm ~1e-5 vs ~1 with a real signal).
    """
    mesh = parallel.single_device_mesh()
    _, state, teacher, step = setup(mesh, StepConfig(teacher="current"), remat=remat)
    batch = make_batch(np.random.default_rng(0), teacher_extra=False)
    state, metrics = step(state, teacher, batch)
    assert float(metrics["tokens"]) == batch.resp_mask.sum() > 0
    if remat:
        assert float(metrics["loss"]) == 0.0
        assert float(metrics["grad_norm"]) == 0.0
    else:
        assert abs(float(metrics["loss"])) < 1e-6
        assert float(metrics["grad_norm"]) < 1e-4  # vs > 1e-2 with a real signal (below)
    # The same model with the answer in the teacher's context has a real loss and gradient.
    _, state2, _, step2 = setup(mesh, StepConfig(teacher="current"), remat=remat)
    _, m2 = step2(state2, None, make_batch(np.random.default_rng(0)))
    assert float(m2["loss"]) > 1e-2 and float(m2["grad_norm"]) > 1e-2


def assert_same_step(a, b, bounds, lr):
    """Loss, gradient norm and params of two runs of the same steps within the bounds of
    each step (see `step_tolerances`). The params differ by the Adam updates' difference:
    in the L2 norm (so also per element) at most lr * (1 + |m|) times the gradients' (see
    SMOOTH_ADAM; the first moment |m| is at most the largest gradient norm so far), summed
    over steps. That difference reaches the next step's loss as at most |grad| * |dp|; its
    effect on the next gradient is another factor lr smaller (ignored)."""
    (loss_a, gn_a, p_a), (loss_b, gn_b, p_b) = a, b
    params_atol = 0.0
    for i, (la, lb, ga, gb, (loss_atol, grad_atol)) in enumerate(zip(loss_a, loss_b, gn_a, gn_b, bounds)):
        loss_atol += gb * params_atol
        assert abs(la - lb) <= loss_atol, (la, lb, loss_atol)
        assert abs(ga - gb) <= grad_atol, (ga, gb, grad_atol)
        params_atol += lr * (1 + max(gn_b[: i + 1])) * grad_atol
    for x, y in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=params_atol)


def run_steps(mesh, batch, steps, step_cfg=StepConfig(), with_bounds=False):
    """(losses, grad norms, final params[, per-step tolerances]) of `steps` SMOOTH_ADAM steps."""
    # scale 2: at 5x the tiny net is chaotic enough to amplify fp32 reduction-order noise
    # to ~1e-4 in early-layer gradients; at 2x it stays ~1e-6 (no bug either way).
    graphdef, state, teacher, step = setup(mesh, step_cfg, optim=SMOOTH_ADAM, scale=2.0)
    seq = max(batch.student.tokens.shape[1], batch.teacher.tokens.shape[1])
    losses, norms, bounds = [], [], []
    for _ in range(steps):
        params = jax.tree.map(np.asarray, state.params) if with_bounds else None
        state, metrics = step(state, teacher, batch)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
        if with_bounds:
            bounds.append(step_tolerances(graphdef, jax.device_put(params), batch, norms[-1], seq))
    out = (losses, norms, jax.tree.map(np.asarray, state.params))
    return (*out, bounds) if with_bounds else (*out, state)


def test_sharded_step_equals_single_device():
    batch = make_batch(np.random.default_rng(1), n=8, batch_size=8)
    *single, bounds = run_steps(parallel.single_device_mesh(), batch, 2, with_bounds=True)
    *sharded, s8 = run_steps(parallel.make_mesh(data=2, fsdp=2, tensor=2), batch, 2)
    wq = S.flat_names(s8.params)["layers.wq"].get_value()
    assert len({tuple(sh.data.shape) for sh in wq.addressable_shards}) == 1 and wq.sharding.spec[1] == "fsdp"
    assert_same_step(sharded, single, bounds, SMOOTH_ADAM.learning_rate)


def test_micro_batches_equal_full_batch():
    mesh = parallel.single_device_mesh()
    batch = make_batch(np.random.default_rng(2), n=4)
    *full, bounds = run_steps(mesh, batch, 1, with_bounds=True)
    for m in (2, 4):
        *micro, _ = run_steps(mesh, batch, 1, StepConfig(micro_batches=m))
        assert_same_step(micro, full, bounds, SMOOTH_ADAM.learning_rate)


def test_non_finite_gradient_skips_update():
    mesh = parallel.single_device_mesh()
    _, state, teacher, step = setup(mesh)
    batch = make_batch(np.random.default_rng(3))
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, teacher, batch, sample_weights=np.array([1.0, np.nan, 1.0, 1.0], np.float32))
    assert int(metrics["skipped_updates"]) == 1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    state, metrics = step(state, teacher, batch)
    assert int(metrics["skipped_updates"]) == 1 and np.isfinite(float(metrics["loss"]))
    assert any(not np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)))


def test_one_compilation_per_bucket():
    mesh = parallel.single_device_mesh()
    _, state, teacher, step = setup(mesh)
    rng = np.random.default_rng(4)
    shapes = set()
    for _ in range(4):
        b = make_batch(rng)
        shapes.add((b.student.tokens.shape, b.teacher.tokens.shape, b.resp_tokens.shape))
        state, _ = step(state, teacher, b)
    assert step.trace_count == len(shapes) == 1
    long_batch = make_batch(rng, buckets=(40, 64))  # another bucket -> exactly one more compile
    state, _ = step(state, teacher, long_batch)
    assert step.trace_count == 2


def test_student_learns_to_match_teacher_with_hint():
    """50 steps cut the divergence by more than half; fails if the gradient is wrong."""
    mesh = parallel.single_device_mesh()
    _, state, teacher, step = setup(mesh, optim=OptimConfig(learning_rate=3e-3, weight_decay=0.0))
    batch = make_batch(np.random.default_rng(5), n=4)
    losses = []
    for _ in range(50):
        state, metrics = step(state, teacher, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_bf16_frozen_teacher_is_the_rounded_weights():
    """distill.teacher_dtype=bfloat16 stores the frozen teacher in bf16; its layers still
    compute in fp32, so the step equals one whose fp32 teacher holds the bf16-rounded weights
    (same math, within the step's own fp32 tolerance), closer than the unrounded teacher's."""
    import ml_collections

    from ophsd_jax import runtime

    mesh = parallel.single_device_mesh()
    graphdef, state, teacher, step = setup(mesh, optim=SMOOTH_ADAM, scale=2.0)
    c = ml_collections.ConfigDict({"lora": {"rank": 0}, "distill": {"teacher": "initial", "teacher_dtype": "bfloat16"}})
    _, bf16 = runtime.trainable_params(c, CFG, state.params, mesh)
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    abstract = runtime.trainable_params(c, CFG, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                                            state.params), mesh, abstract=True)[1]
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(lambda a: (a.shape, a.dtype), bf16)
    rounded = jax.tree.map(lambda x: x.astype(jnp.float32), bf16)
    batch = make_batch(np.random.default_rng(5))
    params = jax.tree.map(np.asarray, state.params)
    _, m_bf16 = step(state, bf16, batch)
    _, state_b, _, step_b = setup(mesh, optim=SMOOTH_ADAM, scale=2.0)
    _, m_round = step_b(state_b, rounded, batch)
    _, state_c, _, step_c = setup(mesh, optim=SMOOTH_ADAM, scale=2.0)
    _, m_exact = step_c(state_c, teacher, batch)
    seq = max(batch.student.tokens.shape[1], batch.teacher.tokens.shape[1])
    loss_atol, grad_atol = step_tolerances(graphdef, jax.device_put(params), batch, float(m_round["grad_norm"]), seq,
                                           teacher_params=rounded)
    assert abs(float(m_bf16["loss"]) - float(m_round["loss"])) <= loss_atol
    assert abs(float(m_bf16["grad_norm"]) - float(m_round["grad_norm"])) <= grad_atol
    # and it is the rounded teacher, not the unrounded one, that the bf16 step matches
    assert abs(float(m_bf16["loss"]) - float(m_round["loss"])) < abs(float(m_exact["loss"]) - float(m_round["loss"]))


def test_a_bf16_frozen_teacher_is_not_upcast_whole_before_the_layer_scan():
    """XLA:CPU has no bf16 dynamic-slice, so a bf16 weight stack scanned as floats is
    converted to fp32 whole, before the layer loop: the bf16 teacher then cost the embedded
    default's update 0.33 GiB more temporaries than an fp32 one. The frozen teacher goes
    through the scan as its bits: the compiled step holds no fp32 copy of a stacked
    teacher weight, only per-layer ones."""
    mesh = parallel.single_device_mesh()
    _, state, teacher, step = setup(mesh)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), teacher)
    batch = make_batch(np.random.default_rng(5))
    text = step._step.lower(state, bf16, jax.tree.map(jnp.asarray, batch),
                            jnp.asarray(batch.row_mask, jnp.float32)).compile().as_text()
    stacked = {"f32[" + ",".join(map(str, x.shape)) + "]" for x in jax.tree.leaves(state.params)
               if x.ndim >= 2 and x.shape[0] == CFG.num_layers}
    per_layer = {f"f32[{lead}" + ",".join(map(str, x.shape[1:])) + "]" for x in jax.tree.leaves(state.params)
                 if x.ndim >= 3 and x.shape[0] == CFG.num_layers for lead in ("", "1,")}
    converts = [line.split("=", 1)[1].split()[0].split("{")[0] for line in text.splitlines() if " convert(" in line]
    assert stacked and not stacked & set(converts), sorted(stacked & set(converts))
    assert per_layer & set(converts)  # the layers are still converted, one at a time


def test_bf16_first_moment_follows_fp32_adam():
    """optim.mu_dtype=bfloat16: Adam's first moment is stored in bf16 (the second in fp32).
    Each step rounds the stored moment (relative error <= 2^-8 with round-to-nearest: 2^-9),
    so after step t it is off by at most sum_s b1^(t-s) 2^-8 |m_s| (m_s: the fp32 run's
    moments, plus that bound's own rounding); the parameters by lr times that over
    (1 - b1^t)(sqrt(v_hat) + eps), summed over steps (the fp32 v is the same in both runs)."""
    mesh = parallel.single_device_mesh()
    _, params = S.init_params(CFG, mesh, seed=1)
    cfg = dict(learning_rate=1e-2, weight_decay=0.0, grad_clip=0.0, eps=1e-8)
    opt16, opt32 = make_optimizer(OptimConfig(mu_dtype="bfloat16", **cfg)), make_optimizer(OptimConfig(**cfg))
    s16, s32 = init_train_state(params, opt16, mesh), init_train_state(params, opt32, mesh)
    mus = [x for x in jax.tree.leaves(s16.opt_state) if x.ndim > 1]
    assert {x.dtype for x in mus} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}  # mu bf16, nu fp32
    update = jax.jit(lambda o, opt_state, p, g: o.update(g, opt_state, p), static_argnums=0)
    rng = np.random.default_rng(0)
    p16, p32, o16, o32 = s16.params, s32.params, s16.opt_state, s32.opt_state
    b1, b2 = OptimConfig.b1, OptimConfig.b2
    m = v = mu_err = None
    param_err = jax.tree.map(lambda x: np.zeros(x.shape), params)
    for t in range(1, 5):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        gn = jax.tree.map(np.asarray, g)
        m = jax.tree.map(lambda gi: (1 - b1) * gi, gn) if m is None else jax.tree.map(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, gn)
        v = jax.tree.map(lambda gi: (1 - b2) * gi**2, gn) if v is None else jax.tree.map(lambda vi, gi: b2 * vi + (1 - b2) * gi**2, v, gn)
        mu_err = jax.tree.map(lambda mi: 2.0**-8 * np.abs(mi), m) if mu_err is None else \
            jax.tree.map(lambda e, mi: b1 * e + 2.0**-8 * (np.abs(mi) + b1 * e), mu_err, m)
        param_err = jax.tree.map(lambda pe, e, vi: pe + cfg["learning_rate"] * e / (1 - b1**t) /
                                 (np.sqrt(vi / (1 - b2**t)) + cfg["eps"]), param_err, mu_err, v)
        u16, o16 = update(opt16, o16, p16, g)
        u32, o32 = update(opt32, o32, p32, g)
        p16 = jax.tree.map(lambda p, u: p + u, p16, u16)
        p32 = jax.tree.map(lambda p, u: p + u, p32, u32)
    fp32_atol = jax.tree.map(lambda p: 8 * 4 * np.finfo(np.float32).eps * (np.abs(np.asarray(p)) + cfg["learning_rate"]), p32)
    diffs = jax.tree.map(lambda a, b: np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), p16, p32)
    for d, e, a in zip(jax.tree.leaves(diffs), jax.tree.leaves(param_err), jax.tree.leaves(fp32_atol)):
        assert np.all(d <= e + a)
    assert max(float(d.max()) for d in jax.tree.leaves(diffs)) > 0  # the bf16 moment did change something


def _reference_optimizer(cfg: OptimConfig):
    """The optimizer as Optax writes it: clip, AdamW with the step's decay mask, skip non-finite."""
    from ophsd_jax.distill.step import decay_mask, learning_rate_schedule

    inner = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                    weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.apply_if_finite(inner, max_consecutive_errors=1_000_000)


def _optimizer_tree(seed):
    k = jax.random.split(jax.random.key(seed), 3)
    return {"embed": jax.random.normal(k[0], (512, 64)), "layers": {
        "w_up": jax.random.normal(k[1], (4, 64, 128)), "attn_norm": 1 + 0.1 * jax.random.normal(k[2], (4, 64))}}


@pytest.mark.parametrize("grad_scale", [1e-3, 1.0])  # global norm below / far above the clip
def test_apply_gradients_is_optax_clip_adamw_apply_if_finite(grad_scale):
    """`apply_gradients` (the parameter update inside the skip conditional, the clip as one
    multiply) against Optax's own clip_by_global_norm + adamw + apply_if_finite + apply_updates,
    one step at a time from the same state (three steps), then a non-finite gradient.
    Bound: the clip rounds each gradient twice in
    either form (<= 4u relative apart); Adam's first moment adds a rounding, its second two
    (g^2), the update m_hat / (sqrt(v_hat) + eps) the sum of those plus three: 16u relative in
    the update, times the learning rate in the parameters, plus the rounding of each side's
    parameter sum (2u relative apart)."""
    from ophsd_jax.distill.step import apply_gradients

    cfg = OptimConfig(learning_rate=1e-2, weight_decay=0.1, grad_clip=1.0)
    ours, ref = make_optimizer(cfg), _reference_optimizer(cfg)
    p_ref = _optimizer_tree(0)
    s_ref = ref.init(p_ref)
    step_ours = jax.jit(lambda g, s, p: apply_gradients(ours, g, s, p))

    @jax.jit
    def step_ref(g, s, p):
        u, s = ref.update(g, s, p)
        return optax.apply_updates(p, u), s, u

    u32 = tol.U32
    for t in range(3):
        # One direction, growing: the moments never cancel, so their errors stay relative.
        grads = jax.tree.map(lambda x: (1 + t) * grad_scale * x, _optimizer_tree(10))
        clipped = float(optax.tree.norm(grads)) > cfg.grad_clip
        assert clipped == (grad_scale > 0.1)  # the two cases are what they say
        p_ours, s_ours = step_ours(grads, s_ref, p_ref)
        p_ref, s_ref, u_ref = step_ref(grads, s_ref, p_ref)
        for a, b, u in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref), jax.tree.leaves(u_ref)):
            bound = 16 * u32 * np.abs(np.asarray(u)) + 2 * u32 * np.abs(np.asarray(b))
            assert np.all(np.abs(np.asarray(a) - np.asarray(b)) <= bound)
        for a, b in zip(jax.tree.leaves(s_ours), jax.tree.leaves(s_ref)):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype == np.float32:
                assert np.all(np.abs(a - b) <= 16 * u32 * np.abs(b))
            else:
                np.testing.assert_array_equal(a, b)
    # A non-finite gradient: parameters and moments unchanged, the same counters as Optax's.
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.ndim > 1 else x, _optimizer_tree(20))
    p_skip, s_skip = step_ours(bad, s_ref, p_ref)
    _, s_ref_skip, _ = step_ref(bad, s_ref, p_ref)
    for a, b in zip(jax.tree.leaves((p_skip, s_skip.inner_state)), jax.tree.leaves((p_ref, s_ref.inner_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in ("notfinite_count", "last_finite", "total_notfinite"):
        assert getattr(s_skip, name) == getattr(s_ref_skip, name), name
    assert int(s_skip.total_notfinite) == 1


def test_apply_gradients_keeps_no_tree_of_updates_in_scratch_memory():
    """The compiler's own memory analysis: applying the gradients to donated params and
    moments takes less scratch than the largest parameter; `optax.apply_updates` after
    `apply_if_finite`'s update (the old step) kept the whole tree of updates (>= every
    parameter's bytes), the conditional's output."""
    from ophsd_jax.distill.step import apply_gradients

    opt = make_optimizer(OptimConfig(learning_rate=1e-3, weight_decay=0.1, grad_clip=1.0))
    params = _optimizer_tree(0)
    grads, state = jax.tree.map(lambda x: 0.01 * x, params), opt.init(params)

    def old(g, s, p):
        u, s = opt.update(g, s, p)
        return s, optax.apply_updates(p, u)

    def new(g, s, p):
        p, s = apply_gradients(opt, g, s, p)
        return s, p

    def temp(f):
        # Outputs in the donated inputs' order, as in the step's TrainState: JAX pairs each
        # output with the first unused donated buffer of its shape.
        jitted = jax.jit(f, donate_argnums=(1, 2))
        return jitted.lower(grads, state, params).compile().memory_analysis().temp_size_in_bytes

    total = sum(x.nbytes for x in jax.tree.leaves(params))
    largest = max(x.nbytes for x in jax.tree.leaves(params))
    assert temp(old) >= total
    assert temp(new) < largest


def test_a_tied_head_enters_the_loss_as_stored_with_the_transposed_heads_loss_and_gradient(monkeypatch):
    """A tied model's head goes into the loss as the embedding itself ([V, D], vocab-major);
    the loss and every parameter's gradient (the embedding's sums the head's and the
    lookup's) are those of the transposed head ([D, V], the layout checked against the
    naive loss in test_losses), within `step_tolerances` of two fp32 evaluations."""
    from ophsd_jax.distill.step import loss_fn

    cfg = CFG.replace(tie_word_embeddings=True)
    mesh = parallel.single_device_mesh()
    graphdef, params = S.init_params(cfg, mesh, seed=4)
    params = jax.tree.map(lambda x: 2.0 * x if x.ndim > 1 else x, params)
    teacher = jax.tree.map(lambda x: x * 1.1 if x.ndim > 1 else x, params)  # a frozen teacher that differs
    batch = make_batch(np.random.default_rng(5))
    assert S.output_head(graphdef, params)[1]  # the tied head is passed vocab-major

    def value_and_grad():
        f = lambda p: loss_fn(p, teacher, batch, batch.row_mask, graphdef, StepConfig())[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(params)

    loss, grads = value_and_grad()
    monkeypatch.setattr(S, "output_head", lambda g, p: (S.lm_head(g, p), False))  # embed.T, [D, V]
    ref_loss, ref_grads = value_and_grad()
    grad_norm = float(optax.tree.norm(ref_grads))
    seq = max(batch.student.tokens.shape[1], batch.teacher.tokens.shape[1])
    loss_atol, grad_atol = step_tolerances(graphdef, params, batch, grad_norm, seq, cfg=cfg, teacher_params=teacher)
    assert float(ref_loss) > 1e-2 and grad_norm > 1e-2  # a real signal
    assert abs(float(loss) - float(ref_loss)) <= loss_atol
    diff = optax.tree.norm(jax.tree.map(lambda a, b: a - b, grads, ref_grads))
    assert float(diff) <= grad_atol, (float(diff), grad_atol)
