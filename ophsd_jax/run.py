"""A training run's state and chores: set-up, resume, logging, evaluation, checkpoints.

`train.py` holds the algorithm; this holds everything around it, so the loop there
stays one screen long.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time

import jax
import numpy as np

from ophsd_jax import parallel, runtime
from ophsd_jax.checkpointing import (CheckpointManager, IncompatibleCheckpoint, abstract_like, join_arrays,
                                    split_arrays)
from ophsd_jax.data.iterator import ExampleIterator
from ophsd_jax.distill.batch import Buckets, PairBatch, SideBatch
from ophsd_jax.distill.losses import reward_weights
from ophsd_jax.distill.step import (TrainStep, init_train_state, initial_state, learning_rate_schedule,
                                   micro_batch_rows_error, OptimConfig)
from ophsd_jax.evaluate import evaluate, write_eval
from ophsd_jax.metrics import MetricsWriter, PhaseTimer, logged_steps, progress_bar, scalars
from ophsd_jax.models import lora as lora_lib
from ophsd_jax.models import state as model_state

log = logging.getLogger("ophsd_jax.train")


class StopRequested(Exception):
    """Raised by `Run.poll` on every process once any process was asked to stop (SIGTERM):
    the step in progress is abandoned and the last completed one saved (`Run.save_stopped`)."""


class Run:
    _stop_requested = False  # set by the signal handler, on this process only
    _eval_harness = None  # the harness re-attached at evaluation, made at the first one
    _eval_sampler_obj = None  # evaluation's own sampler (eval.batch_size), made at the first evaluation

    @classmethod
    def request_stop(cls, signum=None, frame=None):
        log.warning("stop requested (signal %s): abandoning the step in progress, saving the last completed one",
                    signum)
        cls._stop_requested = True

    def poll(self) -> None:
        """Raise StopRequested if any process was asked to stop.

        Called only at points every process reaches in the same order: before and between
        the sampler's decode segments (the sampler is collective) and before the update.
        With several processes the flag is agreed there by an allgather, so a SIGTERM on any
        one process stops all of them at the same point, and they save the same step.
        """
        if Run.stop_agreed():
            raise StopRequested

    @staticmethod
    def stop_agreed() -> bool:
        """Whether any process was asked to stop (collective: every process must call it)."""
        return bool(parallel.agree_max([int(Run._stop_requested)])[0])

    @classmethod
    def create(cls, config, workdir: str, *, restore_step: int | None = None, for_eval: bool = False,
               initial_ok: bool = False) -> "Run":
        self = cls()
        try:
            return self._setup(config, workdir, restore_step=restore_step, for_eval=for_eval, initial_ok=initial_ok)
        except BaseException:
            # Orbax's manager runs a background thread (temp-dir cleanup, async saves): left
            # running, it dies with a traceback at interpreter exit, burying the error.
            if getattr(self, "ckpt", None) is not None:
                self.ckpt.close()
            raise

    def _setup(self, config, workdir: str, *, restore_step, for_eval, initial_ok) -> "Run":
        self.config, self.workdir = config, workdir
        c = config
        self.mesh = runtime.make_mesh(c)
        # Multi-process: this process's block of every batch's rows (see parallel.batch_share).
        self.share = parallel.batch_share(self.mesh)
        if c.train.batch_size % self.share[1]:
            raise ValueError(f"config.train.batch_size={c.train.batch_size} must be divisible by the number of "
                             f"processes ({self.share[1]}): each process takes an equal share of every batch")
        rows_error = micro_batch_rows_error(c.train.batch_size, runtime.micro_batches(c, self.mesh), self.mesh)
        if rows_error and not for_eval:
            raise ValueError(f"config.{rows_error} (mesh {dict(self.mesh.shape)})")
        # Nothing may change in the work dir until the newest checkpoint is known to fit this
        # config (an incompatible one is an error that leaves the work dir as it was): until
        # then the compilation cache is only read, and the data (built in the work dir) waits.
        runtime.use_compilation_cache(c, workdir, write=False)
        runtime.release_host_memory_after_compiles()
        self.model_cfg, self.graphdef, params, self.tokenizer = runtime.load_model(c, self.mesh)
        self.model_identity = model_identity(c, self.model_cfg)
        self.rng = jax.random.key(c.seed)
        self.optimizer = runtime.optimizer(c)
        # "initial": a frozen copy of the starting weights (reloaded from the source on resume).
        # LoRA: the state trains the adapter; the base weights (reloaded likewise) are the
        # step's second argument, and the sampler gets base + adapter merged once per step.
        self.lora = runtime.lora_config(c)
        if for_eval and self.lora is None:  # evaluation reads neither a frozen teacher nor the moments
            trained, self.teacher_params = params, None
        else:
            trained, self.teacher_params = runtime.trainable_params(c, self.model_cfg, params, self.mesh)
        self._merge = lora_lib.make_merge(params) if self.lora else None
        self._decode_layout = None  # built on first use (sampler.weights="decode")
        # Evaluation-only runs never build the initial moments: the restore target is abstract
        # (for the embedded default 1.6 GB fewer arrays while a checkpoint is read).
        abstract = init_train_state(abstract_like(trained), self.optimizer, self.mesh)
        self.state = initial_state(trained, self.mesh) if for_eval else \
            init_train_state(trained, self.optimizer, self.mesh)
        self.ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), keep=c.train.keep_checkpoints,
                                      async_save=c.train.async_checkpoints)
        found = self.ckpt.restore_latest(abstract, max_step=restore_step, model=self.model_identity)
        if found is None and for_eval:
            if not initial_ok:
                raise FileNotFoundError(f"no readable checkpoint in {self.ckpt.directory}")
            log.info("no checkpoint in %s: evaluating the config's initial weights as step 0", self.ckpt.directory)
        runtime.use_compilation_cache(c, workdir)
        self.data = runtime.load_data(c, workdir)
        self.harness = runtime.make_run_harness(c, self.data)
        self.sampler = runtime.make_sampler(c, self.model_cfg, self.graphdef, self.mesh, self.tokenizer)
        self.template_kwargs = c.model.chat_template_kwargs.to_dict()
        self.data_iter = ExampleIterator(self.data.train, c.train.batch_size, seed=c.seed, share=self.share)
        self.step, self._saved_step, self.pending_metrics, self._step_start = 0, None, None, None
        if found is not None:
            self._resume(*found, for_eval=for_eval)
        self.sampler.poll = self.poll  # a SIGTERM abandons a generation within one decode segment
        if for_eval:
            self.drop_training_arrays()
            return self
        runtime.save_config(c, workdir)
        self.train_step = TrainStep(self.graphdef, runtime.step_config(c, self.mesh), self.optimizer, self.mesh,
                                    self.state, teacher_params=self.teacher_params)
        self.buckets = Buckets.make({"student": c.distill.student_buckets, "teacher": c.distill.teacher_buckets,
                                     "response": c.distill.response_buckets})
        self.writer = MetricsWriter(workdir)
        self.timer = PhaseTimer()
        self.lr = learning_rate_schedule(OptimConfig(learning_rate=c.optim.learning_rate, schedule=c.optim.schedule,
                                                     warmup_steps=c.optim.warmup_steps, total_steps=c.train.steps))
        self.evals: dict[int, dict] = {}
        self._t_start, self._step_at_start = time.perf_counter(), self.step
        log.info("model %s (%.1fM params) on mesh %s; %d train / %d eval examples; starting at step %d",
                 self.model_cfg.family, self.model_cfg.num_params() / 1e6, dict(self.mesh.shape),
                 len(self.data.train), len(self.data.eval or []), self.step)
        return self

    def sample_params(self):
        """The weights the sampler generates with (call once per step, after the update;
        drop the result after generation): the training params, or with LoRA the base +
        adapter merged into one copy (docs/benchmarks.md); with sampler.weights="decode"
        then as a compute-dtype copy in the sampling layout (not fsdp-sharded)."""
        params = self.state.params if self.lora is None else \
            self._merge(self.teacher_params, self.state.params, self.lora.scale)
        if self.config.sampler.get("weights", "train") == "train":
            return params
        if self._decode_layout is None:
            self._decode_layout = model_state.decode_layout(params, self.mesh, self.config.model.dtype)
        return self._decode_layout(params)

    # ---- arrays only the update reads ---------------------------------------------------

    def drop_training_arrays(self) -> None:
        """Free what only the update reads: the optimizer's moments and the frozen teacher
        (not LoRA's base, which the sampler merges). Evaluation does not need them: for the
        embedded default that is 1.6 of the 2.15 GB of live arrays (docs/benchmarks.md)."""
        self.state = self.state._replace(opt_state=None)
        if self.lora is None:
            self.teacher_params = None

    def rebuild_training_arrays(self) -> None:
        """Undo `drop_training_arrays` at a fresh run's step 0, where both are functions of
        the initial weights: the optimizer's initial moments and a copy of the weights."""
        if self.step != 0 or self._saved_step is not None:
            raise RuntimeError(f"the optimizer state of step {self.step} cannot be rebuilt")
        self.state = init_train_state(self.state.params, self.optimizer, self.mesh)
        if self.lora is None:
            _, self.teacher_params = runtime.trainable_params(self.config, self.model_cfg, self.state.params,
                                                              self.mesh)

    def evaluate_before_training(self) -> None:
        """Step 0's evaluation, with the optimizer state and teacher freed for its duration."""
        self.drop_training_arrays()
        self.evaluate(0)  # (a stop here ends the run: nothing at step 0 to save)
        self.rebuild_training_arrays()

    # ---- checkpoints -------------------------------------------------------------------

    def _resume(self, step: int, state, host: dict, arrays: dict, for_eval: bool = False):
        # Evaluation reads no training batch: a checkpoint evaluates under any data, batch
        # size or seed (someone else's held-out set); training on needs the same ones.
        if not for_eval:
            try:
                self.data_iter.restore(host["data_iter"])
            except ValueError as e:  # other data, batch size or seed
                raise IncompatibleCheckpoint(f"checkpoint {self.ckpt.directory}/{step} does not fit this config: "
                                             f"data {e}") from e
        self.step, self.state, self._saved_step = step, state, step
        # The training harness's state (Draft–Verify's online bank). Evaluation builds its own
        # harness, so a checkpoint trained under another harness (OPSD's, evaluated with the
        # task's harness re-attached) evaluates fine; training on needs the same harness.
        saved, name = host.get("harness_name"), self.harness.name  # (older checkpoints: None)
        if saved not in (None, name):
            if not for_eval:
                raise IncompatibleCheckpoint(f"checkpoint {self.ckpt.directory}/{step} was trained with harness "
                                             f"{saved!r}, this run uses {name!r}")
            log.info("checkpoint trained with harness %r: its state is not loaded into %r", saved, name)
        else:
            try:
                self.harness.load_state_dict(join_arrays(host["harness"], arrays))
            except KeyError:  # an older checkpoint (no harness_name) of another harness
                if not for_eval:
                    raise
        # Stopped during the evaluation after `step`: its metrics row is written on resume,
        # unless an earlier resume wrote it (process 0's metrics file decides, for all).
        pending = host.get("pending_metrics")
        if pending is not None and parallel.agree_max([jax.process_index() == 0 and
                                                       step in logged_steps(self.workdir)])[0]:
            pending = None
        self.pending_metrics = pending
        log.info("resumed from %s/%d", self.ckpt.directory, self.step)

    def save(self, step: int, pending_metrics: dict | None = None):
        harness_json, arrays = split_arrays(self.harness.state_dict())
        host = {"step": step, "seed": self.config.seed, "data_iter": self.data_iter.state(), "harness": harness_json,
                "harness_name": self.harness.name, "model": self.model_identity}
        if pending_metrics is not None:
            host["pending_metrics"] = pending_metrics
        if self.lora is not None:  # the state holds the adapter; the base is reloaded from its source
            host["lora_base"] = {k: self.config.model[k] for k in ("source", "path")}
        self.ckpt.save(step, self.state, host, arrays)
        self._saved_step = step

    def save_stopped(self) -> None:
        """After StopRequested: checkpoint the last completed step, unless it is on disk."""
        if self._step_start is not None and self._step_start[0] == self.step:
            # Abandoned before its update: the data position goes back to the step's start.
            self.data_iter.restore(self._step_start[1])
        if self.step > 0 and self._saved_step != self.step:
            # Stopped during the evaluation after `step`: its metrics wait for the resumed run.
            self.save(self.step, None if self.pending_metrics is None else
                      scalars({**self.timer.report(), **self.pending_metrics}))
        self.ckpt.wait()
        log.warning("stopped after step %d (checkpoint %s/%d); re-run the same command to resume",
                    self.step, self.ckpt.directory, self.step)

    # ---- per step ----------------------------------------------------------------------

    def next_examples(self) -> list[dict]:
        """This process's share of the next batch (the iterator position is global)."""
        self._step_start = (self.step, self.data_iter.state())  # where an abandoned step goes back to
        return next(self.data_iter)

    def global_batch(self, batch: PairBatch, harness_rewards) -> tuple[PairBatch, np.ndarray, dict]:
        """(batch, sample weights, batch metrics) for the train step, from this process's
        rows: lengths agreed by all processes, the global batch assembled from each
        process's rows, weights and metrics over the whole batch."""
        c, meta, row_mask = self.config, batch.meta, batch.row_mask
        # Rows hold the kept examples first, then dummy rows: rewards in row order.
        row_rewards = np.zeros(row_mask.shape, np.float32)
        row_rewards[:meta.num_valid] = np.nan_to_num(np.asarray(harness_rewards, np.float32)[list(meta.kept)])
        metrics = meta.metrics()
        if self.share[1] > 1:
            lengths = parallel.agree_max([batch.student.tokens.shape[1], batch.teacher.tokens.shape[1],
                                          batch.resp_tokens.shape[1]])
            batch = _pad_lengths(batch, *lengths, pad_id=self.tokenizer.pad_token_id or 0)
            parts = parallel.allgather_json([metrics, row_rewards.tolist(), row_mask.tolist()])
            metrics = {k: sum(p[0][k] for p in parts) for k in metrics}
            row_rewards = np.asarray([r for p in parts for r in p[1]], np.float32)
            row_mask = np.asarray([m for p in parts for m in p[2]], np.float32)
            batch = jax.tree.map(lambda a: parallel.from_process_rows(a, self.train_step.batch_sharding, self.share),
                                 batch)
        weights = row_mask
        if c.distill.reward_weight_beta > 0:
            weights = np.asarray(reward_weights(row_rewards, c.distill.reward_weight_beta, valid=row_mask))
        return batch, weights, metrics

    def observe(self, examples: list[dict]) -> None:
        """Harness bookkeeping after a step. With several processes each one adds its own
        examples, then every memory bank gets every process's additions in batch order: the
        same bank as one process would have."""
        bank = getattr(self.harness, "bank", None)
        start = len(bank) if bank is not None else 0
        self.harness.observe(examples)
        if bank is None or self.share[1] == 1:
            return
        texts, labels, ids, embeddings = bank.take_since(start)
        parts = parallel.allgather_json([texts, [list(x) for x in labels], ids])
        for (t, l, i), e in zip(parts, parallel.allgather_rows(embeddings)):
            bank.put_back(t, l, i, e)

    def progress(self):
        return progress_bar(self.config.train.steps, initial=self.step - (self.pending_metrics is not None))

    def final_rows(self, n: int, step: int) -> list[bool]:
        """Which of this process's `n` examples get the harness's final response: all with
        reward weighting (it weights by that response's reward), else the batch's first
        rows (the batch is shuffled: a random sample), harness.reward_fraction of them on
        average: floor((step + 1) f B) - floor(step f B) at step `step` for a global batch
        of B, so 0.125 of 4 rows is one row every other step, not one (a quarter) every
        step. Counted over every process's equal share: any process count picks the same rows."""
        c = self.config
        first, total = self.share[0] * n, self.share[1] * n
        if c.distill.reward_weight_beta > 0:
            most = total
        else:
            most = reward_rows(step, total, c.harness.reward_fraction)
        return [first + i < most for i in range(n)]

    def step_metrics(self, step, examples, rollout, results, harness_rewards) -> dict:
        task = self.data.task
        # NaN where nothing was sampled (the prompt did not fit the sampler; counted in batch/skipped_*)
        per_example = {"rewards": [float(task.reward(t, e)) if t is not None else np.nan
                                   for t, e in zip(rollout.texts, examples)],
                       "tokens": [np.nan if s else len(t) for t, s in zip(rollout.tokens, rollout.skipped)],
                       "modes": [r.mode for r in results], "harness": [float(r) for r in harness_rewards]}
        if self.share[1] > 1:  # every process's examples, so that process 0 logs whole-batch numbers
            parts = parallel.allgather_json(per_example)
            per_example = {k: [x for p in parts for x in p[k]] for k in per_example}
        modes = collections.Counter(per_example["modes"])
        out = {"rollout/reward": _nanmean(per_example["rewards"]),
               "rollout/response_tokens": _nanmean(per_example["tokens"]),
               "lr": float(self.lr(step)),
               **{f"harness/mode_{m}": n for m, n in modes.items()}}
        if not np.all(np.isnan(per_example["harness"])):  # absent on a step that solved no row (reward_rows)
            out["harness/reward"] = _nanmean(per_example["harness"])
        bank = getattr(self.harness, "bank", None)
        if bank is not None:
            out["bank/size"] = len(bank)
        return out

    def end_step(self, step: int, metrics: dict, bar):
        """Log, evaluate and checkpoint after `step` updates."""
        c = self.config
        # The update is applied; until the metrics row is written, a stop (in the evaluation)
        # saves this step with its metrics, and the resumed run evaluates and writes them.
        self.step, self.pending_metrics = step, metrics
        if "tokens_per_s" not in metrics:  # (a pending step from a stopped run has its own)
            metrics["tokens_per_s"] = float(metrics.get("tokens", 0.0)) / max(sum(self.timer.seconds.values()), 1e-9)
        if step % c.train.eval_every == 0 or step == c.train.steps:
            if step == c.train.steps:
                # Last step: checkpoint it first (its metrics pending, as after a stop), so the
                # final evaluation runs without the optimizer state and teacher.
                if self._saved_step != step:
                    self.save(step, scalars({**self.timer.report(), **metrics}))
                    self.ckpt.wait()
                self.drop_training_arrays()
            with self.timer("eval"):
                metrics.update(self.evaluate(step))
        self.timer_report = self.timer.report()
        metrics.update(self.timer_report)
        self.timer.reset()
        flat = self.writer.write(step, metrics)
        self.pending_metrics = None
        if (step % c.train.save_every == 0 or step == c.train.steps) and self._saved_step != step:
            self.save(step)
        runtime.release_host_memory()  # the update's, evaluation's and checkpoint's freed buffers
        bar.update(1)
        bar.set_postfix(loss=f"{flat.get('loss', float('nan')):.4f}", rollout=f"{flat['rollout/reward']:.2f}",
                        harness=f"{flat.get('harness/reward', float('nan')):.2f}", refresh=False)
        if c.train.profile_steps:
            self._profile(step)

    def _profile(self, step: int):
        first, last = min(self.config.train.profile_steps), max(self.config.train.profile_steps)
        if step == first:
            jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
        elif step == last + 1 or (step == self.config.train.steps and step > first):
            jax.profiler.stop_trace()

    # ---- evaluation --------------------------------------------------------------------

    def evaluate(self, step: int) -> dict:
        c = self.config
        ev = self.data.eval
        if ev is None or len(ev) == 0:
            return {}
        n = len(ev) if not c.eval.num_examples else min(c.eval.num_examples, len(ev))
        part = parallel.share_slice(n, self.share)  # this process's examples; records gathered below
        gather = None
        if self.share[1] > 1:
            gather = lambda records: [r for p in parallel.allgather_json(records) for r in p]  # noqa: E731
        harness = None
        if c.eval.harness:  # built once: its bank (Draft–Verify) is the fixed training split
            if self._eval_harness is None:
                self._eval_harness = runtime.make_eval_harness(c, self.data, self.harness)
            harness = self._eval_harness
        summary, records = evaluate(sampler=self._eval_sampler(), tokenizer=self.tokenizer,
                                    params=self.sample_params(),
                                    task=self.data.task, harness=harness,
                                    examples=[ev[i] for i in range(part.start, part.stop)], eval_cfg=c.eval,
                                    rng=jax.random.fold_in(jax.random.key(c.seed + 1), step),
                                    template_kwargs=self.template_kwargs, first_index=part.start, gather=gather)
        if jax.process_index() == 0:
            write_eval(self.workdir, step, summary, records)
        log.info("eval @ step %d: %s", step, ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in summary.items()))
        if hasattr(self, "evals"):
            self.evals[step] = summary
        runtime.release_compiled_programs()  # the evaluation's, until the next one
        return summary

    def _eval_sampler(self):
        """The sampler for evaluation: its own batch size (`eval.batch_size`), else the run's."""
        rows = self.config.eval.get("batch_size", 0)  # (absent in the config.json of older runs)
        if not rows or rows == self.config.sampler.max_batch:
            return self.sampler
        if self._eval_sampler_obj is None:
            self._eval_sampler_obj = runtime.make_sampler(self.config, self.model_cfg, self.graphdef, self.mesh,
                                                          self.tokenizer, max_batch=rows)
            self._eval_sampler_obj.poll = self.sampler.poll
        return self._eval_sampler_obj

    def finish(self) -> dict:
        self.ckpt.wait()
        self.ckpt.close()
        self.writer.close()
        steps = self.step - self._step_at_start
        elapsed = time.perf_counter() - self._t_start
        summary = {"steps": self.step, "seconds": elapsed, "seconds_per_step": elapsed / max(steps, 1)}
        if self.evals:
            first, last = min(self.evals), max(self.evals)
            summary.update({f"before/{k}": v for k, v in self.evals[first].items()})
            summary.update({f"after/{k}": v for k, v in self.evals[last].items()})
            if jax.process_index() == 0:
                print(_summary_table(self.evals, self.timer_report if hasattr(self, "timer_report") else {}))
        if jax.process_index() == 0:
            with open(os.path.join(self.workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary


def reward_rows(step: int, batch: int, fraction: float) -> int:
    """Rows of step `step` that get the harness's final response: floor((step + 1) f B) -
    floor(step f B), so that over any run the count is `fraction` of the rows, spread
    evenly (rounded before flooring: 0.125 * 8 is exactly 1)."""
    due = lambda s: math.floor(round(s * batch * fraction, 6))  # noqa: E731
    return due(step + 1) - due(step)


def _nanmean(xs) -> float:
    xs = np.asarray(xs, np.float64)
    return float(np.nanmean(xs)) if xs.size and not np.all(np.isnan(xs)) else float("nan")


def model_identity(c, cfg) -> dict:
    """What the checkpointed weights are: the model's source and architecture. Not the
    runtime choices (compute dtype, remat, attention kernel), which a resumed run may change;
    nor the folder path, which may move (the initial teacher is reloaded from it)."""
    keys = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "param_dtype")
    return json.loads(json.dumps({"source": c.model.source, **{k: getattr(cfg, k) for k in keys}}))


def _pad_lengths(batch: PairBatch, student: int, teacher: int, response: int, pad_id: int) -> PairBatch:
    """Right-pad a paired batch to longer (agreed) lengths: the arrays `build_pair_batch`
    makes with those buckets (padding: pad_id tokens, position 0, masks 0)."""
    def pad(x, n, value=0):
        return np.pad(x, [(0, 0), (0, n - x.shape[1])], constant_values=value)

    def side(s: SideBatch, n: int) -> SideBatch:
        return SideBatch(pad(s.tokens, n, pad_id), pad(s.positions, n), pad(s.attn_mask, n),
                         pad(s.resp_index, response))

    return PairBatch(side(batch.student, student), side(batch.teacher, teacher),
                     pad(batch.resp_tokens, response, pad_id), pad(batch.resp_mask, response), batch.row_mask,
                     batch.meta)


def _summary_table(evals: dict[int, dict], timing: dict) -> str:
    keys = sorted({k for v in evals.values() for k in v if k.startswith("eval/")
                   and not any(w in k for w in ("tokens", "examples", "bank_size", "unscored", "seconds"))})
    lines = ["", "step  " + "  ".join(f"{k[5:]:>12}" for k in keys)]
    for step in sorted(evals):
        lines.append(f"{step:>4}  " + "  ".join(f"{evals[step].get(k, float('nan')):>12.3f}" for k in keys))
    return "\n".join(lines)
