"""The OPHSD train step: teacher forward, student forward, divergence, gradient and
Optax update in one jitted function with explicit shardings and donated state.

The math is the pure `loss_fn`; `make_train_step` only wires shardings, micro-batch
accumulation and the optimizer around it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ophsd_jax import parallel
from ophsd_jax.distill.batch import PairBatch
from ophsd_jax.distill.losses import divergence
from ophsd_jax.models import state as model_state


@dataclasses.dataclass(frozen=True)
class StepConfig:
    kind: str = "reverse_kl"  # reverse_kl | forward_kl | jsd
    beta: float = 0.5  # JSD beta (0 = forward KL, 1 = reverse KL)
    clip: float | None = None  # per-token divergence cap
    teacher: str = "initial"  # "initial": frozen copy of the starting weights; "current": live weights, no grad
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many slices
    remat_teacher: bool = False  # recompute the teacher forward instead of keeping it (memory)
    tile: int = 256  # tokens whose [tile, V] logits exist at once in the loss
    vocab_tile: int = 4096
    keep_fraction: float | None = None  # entropy-weighted token subsampling
    alpha: float = 1.0
    gamma: float = 0.0
    teacher_top_k: int | None = None
    compute_dtype: str | None = None  # the model's compute dtype: both heads' matmuls run in it
    # LoRA (models/lora.py): alpha / rank, or None for full fine-tuning. With it the state's
    # params are the adapter and the step's second argument is the frozen base weights.
    lora_scale: float | None = None

    def __post_init__(self):
        if self.teacher not in ("initial", "current"):
            raise ValueError(f"teacher must be 'initial' or 'current', got {self.teacher!r}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-6
    schedule: str = "constant"  # constant | warmup_cosine
    warmup_steps: int = 0
    total_steps: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    mu_dtype: str = "float32"  # Adam's first moment (bfloat16 halves it; the second moment stays float32)


class TrainState(NamedTuple):
    step: jax.Array
    params: Any  # nnx.State
    opt_state: Any


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    if cfg.schedule == "constant":
        if cfg.warmup_steps:
            return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
        return optax.constant_schedule(cfg.learning_rate)
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 0),
                                                  max(cfg.total_steps, cfg.warmup_steps + 1))
    raise ValueError(f"unknown schedule {cfg.schedule!r} (constant | warmup_cosine)")


def decay_mask(params):
    """True for weight matrices; False for norms and biases (by parameter name, since
    stacked per-layer norms are 2-D)."""

    def decays(path, _):
        name = next(str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
        return not (name.endswith("norm") or name in ("bq", "bk", "bv"))

    return jax.tree_util.tree_map_with_path(decays, params)


# `optax.apply_if_finite` gives up skipping after this many non-finite steps in a row: never.
_MAX_SKIPS = 1_000_000


class Optimizer(NamedTuple):
    """An Optax transformation (`init`, `update`) and the `inner` clip + AdamW chain that
    `apply_gradients` runs, together with the parameter update, in one conditional."""

    init: Any
    update: Any
    inner: optax.GradientTransformation


def make_optimizer(cfg: OptimConfig) -> Optimizer:
    """Global-norm clip, then AdamW with `decay_mask`. A non-finite gradient skips the
    update (params and moments unchanged); `skipped_updates` counts them."""
    inner = optax.chain(
        clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask, mu_dtype=jnp.dtype(cfg.mu_dtype)),
    )
    outer = optax.apply_if_finite(inner, max_consecutive_errors=_MAX_SKIPS)
    return Optimizer(outer.init, outer.update, inner)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (same empty state) as one multiply by a scalar. Optax
    divides every gradient by the norm, and XLA does not copy a divide into each of its
    consumers (Adam's two moments), so it kept a clipped copy of every gradient beside the
    gradients (docs/benchmarks.md, "Update scratch memory")."""

    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.minimum(1.0, max_norm / norm)  # exactly 1 below the threshold
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def apply_gradients(optimizer: Optimizer, grads, opt_state: optax.ApplyIfFiniteState, params):
    """`optax.apply_updates(params, updates)` after `optimizer.update`: the same values and
    state, but the parameter update runs inside `apply_if_finite`'s conditional. Outside it,
    the conditional's output, a full tree of updates (the size of the model), sat in XLA's
    scratch memory beside the gradients; inside it, each update is used once, fused into its
    parameter's (docs/benchmarks.md, "Update scratch memory")."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    failures = jnp.where(finite, 0, optax.safe_increment(opt_state.notfinite_count))

    def apply(_):
        updates, inner = optimizer.inner.update(grads, opt_state.inner_state, params)
        return optax.apply_updates(params, updates), inner

    def skip(_):
        return params, opt_state.inner_state

    params, inner = jax.lax.cond(finite | (failures > _MAX_SKIPS), apply, skip, None)
    total = jnp.where(finite, opt_state.total_notfinite, optax.safe_increment(opt_state.total_notfinite))
    return params, optax.ApplyIfFiniteState(notfinite_count=failures, last_finite=finite, total_notfinite=total,
                                            inner_state=inner)


def optimizer_state_shardings(optimizer, params, mesh: Mesh):
    """Shardings of `optimizer.init(params)`: every params-shaped leaf (Adam moments)
    takes its parameter's sharding, everything else (counts, flags) is replicated.

    Without this, `jit(optimizer.init)` lets XLA choose, and it replicates the moments:
    two fp32 copies of the model on every device.
    """
    replicated = NamedSharding(mesh, P())
    abstract = jax.eval_shape(optimizer.init, params)
    params_sh = jax.tree.map(lambda x: x.sharding, params)
    return optax.tree_map_params(optimizer, lambda _, sh: sh, abstract, params_sh,
                                 transform_non_params=lambda _: replicated)


def init_train_state(params, optimizer, mesh: Mesh) -> TrainState:
    """Optimizer moments take the params' shardings; scalars are replicated on `mesh`.
    `params` may be abstract (`jax.ShapeDtypeStruct`s with shardings): then so is the state."""
    replicated = NamedSharding(mesh, P())
    opt_sh = optimizer_state_shardings(optimizer, params, mesh)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
        opt_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                 jax.eval_shape(optimizer.init, params), opt_sh)
        return TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params, opt_state)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
    step = parallel.global_array(np.zeros((), np.int32), replicated)
    return TrainState(step, params, opt_state)


def initial_state(params, mesh: Mesh) -> TrainState:
    """Step 0 without optimizer moments: what an evaluation reads."""
    return TrainState(parallel.global_array(np.zeros((), np.int32), NamedSharding(mesh, P())), params, None)


def micro_batch_rows_error(batch_size: int, micro_batches: int, mesh: Mesh) -> str | None:
    """Why `batch_size` rows cannot go in `micro_batches` slices sharded over the batch
    axes of `mesh`, or None. Each slice must split evenly over data x fsdp: otherwise XLA
    replicates its rows and every device computes the whole slice."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (shards * micro_batches) == 0:
        return None
    ok = [m for m in range(1, batch_size + 1) if batch_size % (shards * m) == 0]
    return (f"distill.micro_batches={micro_batches} gives {batch_size}/{micro_batches} rows per micro-batch, which "
            f"do not split over the {shards} batch shards (data x fsdp); with train.batch_size={batch_size} use "
            f"micro_batches in {ok}" if ok else
            f"train.batch_size={batch_size} does not split over the {shards} batch shards (data x fsdp): use a "
            f"multiple of {shards}")


def _gather(hidden, index):
    return jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B, R, D]


def loss_fn(params, teacher_params, batch: PairBatch, sample_weights, graphdef, cfg: StepConfig):
    """OPHSD loss on one (micro-)batch: the student sees the bare prompt, the teacher the
    harness context; both score the same response tokens.

    Full fine-tuning: `params` are the weights; `teacher_params` the frozen initial ones, or
    None ("current": the live weights, with no gradient path). LoRA (`cfg.lora_scale`):
    `params` is the adapter and `teacher_params` the frozen base weights; the student is
    base + adapter, the teacher the base alone ("initial") or base + adapter under
    stop_gradient ("current")."""
    if cfg.lora_scale is not None:
        student, teacher = (teacher_params, params), (teacher_params, None)
        if cfg.teacher == "current":
            teacher = (teacher_params, jax.lax.stop_gradient(params))
    else:
        student = (params, None)
        teacher = (jax.lax.stop_gradient(params) if teacher_params is None else teacher_params, None)

    def forward(weights, side, frozen):  # frozen: no gradient reaches the weights (the adapter may train)
        p, adapter = weights
        return model_state.forward(graphdef, p, side.tokens, side.positions, side.attn_mask, lora=adapter,
                                   lora_scale=cfg.lora_scale or 1.0, frozen=frozen)[0]

    t = batch.teacher
    teacher_forward = lambda w: forward(w, t, True)  # noqa: E731
    if cfg.remat_teacher:
        teacher_forward = jax.checkpoint(teacher_forward)
    h_teacher = jax.lax.stop_gradient(_gather(teacher_forward(teacher), t.resp_index))
    s = batch.student
    h_student = _gather(forward(student, s, cfg.lora_scale is not None), s.resp_index)
    # The heads as stored (a tied embedding stays [V, D]: no transposed copies).
    head, vocab_major = model_state.output_head(graphdef, student[0])
    teacher_head, _ = model_state.output_head(graphdef, teacher[0])
    return divergence(
        h_student, h_teacher, head, batch.resp_mask, vocab_major=vocab_major,
        kind=cfg.kind, beta=cfg.beta, clip=cfg.clip, tile=cfg.tile, vocab_tile=cfg.vocab_tile,
        weights=sample_weights, teacher_lm_head=teacher_head,
        keep_fraction=cfg.keep_fraction, alpha=cfg.alpha, gamma=cfg.gamma, teacher_top_k=cfg.teacher_top_k,
        compute_dtype=None if cfg.compute_dtype is None else jnp.dtype(cfg.compute_dtype),
    )


_AUX_KEYS = ("tokens", "tokens_used", "student_entropy", "teacher_entropy", "divergence_mean", "divergence_max",
             "clip_fraction")
_COUNTS = ("tokens", "tokens_used")


def _split_micro(tree, m: int, shards: int):
    """[B, ...] -> [m, B/m, ...] where slice j takes rows j*L/m .. (j+1)*L/m - 1 of every
    shard's local block of L = B/shards rows, so each slice stays spread over all batch
    shards (no resharding, no replicated rows). Any fixed split gives the same token-mean
    gradient; this one keeps the work sharded."""
    def split(x):
        B = x.shape[0]
        x = x.reshape(shards, m, B // (shards * m), *x.shape[1:]).swapaxes(0, 1)
        return parallel.constrain(x.reshape(m, B // m, *x.shape[3:]), (None, "batch") + (None,) * (x.ndim - 3))

    return jax.tree.map(split, tree)


def train_step(state: TrainState, teacher_params, batch: PairBatch, sample_weights, *, graphdef,
               cfg: StepConfig, optimizer, params_sharding=None, batch_shards: int = 1) -> tuple[TrainState, dict]:
    """One update. Micro-batch gradients are combined token-weighted, so the result equals
    the full-batch gradient of the token-mean loss. `params_sharding` (the params'
    shardings) pins the gradient accumulator; `batch_shards` = data x fsdp."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    m = cfg.micro_batches

    def micro(carry, xs):
        g_acc, aux_acc = carry
        mb, w = xs
        (loss, aux), g = grad_fn(state.params, teacher_params, mb, w, graphdef, cfg)
        n = aux["tokens_used"]  # weight of this slice in the token mean
        g_acc = jax.tree.map(lambda a, b: a + n * b, g_acc, g)
        if params_sharding is not None:
            g_acc = jax.lax.with_sharding_constraint(g_acc, params_sharding)
        aux = {"loss": loss, **aux}
        aux_acc = {k: aux_acc[k] + (v if k in _COUNTS else n * v) for k, v in aux.items()}
        return (g_acc, aux_acc), None

    # The accumulator is pinned to the params' shardings (left to XLA, it is replicated).
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    if params_sharding is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, params_sharding)
    aux0 = {k: jnp.zeros((), jnp.float32) for k in ("loss",) + _AUX_KEYS}
    xs = _split_micro((batch, sample_weights), m, batch_shards)
    (grads, aux), _ = jax.lax.scan(micro, (zeros, aux0), xs)
    total = jnp.maximum(aux["tokens_used"], 1.0)
    grads = jax.tree.map(lambda g: g / total, grads)
    aux = {k: v if k in _COUNTS else v / total for k, v in aux.items()}

    params, opt_state = apply_gradients(optimizer, grads, state.opt_state, state.params)
    metrics = dict(grad_norm=optax.tree.norm(grads), skipped_updates=opt_state.total_notfinite, **aux)
    return TrainState(state.step + 1, params, opt_state), metrics


class TrainStep:
    """`train_step` jitted once per bucket shape, with the state's shardings pinned and donated.
    `teacher_params`: with LoRA, the base weights (or abstract ones), whose shardings the step takes."""

    def __init__(self, graphdef, cfg: StepConfig, optimizer, mesh: Mesh, state: TrainState, teacher_params=None):
        self.mesh = mesh
        self.micro_batches = cfg.micro_batches
        self.trace_count = 0
        self.batch_sharding = NamedSharding(mesh, P(tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None))
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        params_sh = state_sh.params

        batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]

        def step(state, teacher_params, batch, weights):
            self.trace_count += 1
            with parallel.activation_mesh(mesh):
                return train_step(state, teacher_params, batch, weights, graphdef=graphdef, cfg=cfg,
                                  optimizer=optimizer, params_sharding=params_sh, batch_shards=batch_shards)

        teacher_sh = None if cfg.teacher == "current" else params_sh
        if cfg.lora_scale is not None:  # the frozen base weights (their own shardings)
            if teacher_params is None:
                raise ValueError("a LoRA train step needs the base weights (teacher_params)")
            teacher_sh = jax.tree.map(lambda x: x.sharding, teacher_params)
        self._step = jax.jit(step, in_shardings=(state_sh, teacher_sh, self.batch_sharding, self.batch_sharding),
                             out_shardings=(state_sh, None), donate_argnums=0)

    def lower(self, state, teacher_params, batch: PairBatch, sample_weights):
        """The step lowered for these (abstract) arguments, for ahead-of-time compiles."""
        return self._step.lower(state, teacher_params, batch, sample_weights)

    def __call__(self, state: TrainState, teacher_params, batch: PairBatch, sample_weights=None):
        error = micro_batch_rows_error(len(batch.row_mask), self.micro_batches, self.mesh)
        if error:
            raise ValueError(error)
        if sample_weights is None:
            sample_weights = batch.row_mask
        batch = PairBatch(batch.student, batch.teacher, batch.resp_tokens, batch.resp_mask, batch.row_mask)
        # Every process holds the same host batch; each places its own shards.
        batch = jax.tree.map(lambda a: parallel.global_array(a, self.batch_sharding), batch)
        weights = parallel.global_array(np.asarray(sample_weights, np.float32), self.batch_sharding)
        return self._step(state, teacher_params, batch, weights)
