"""A training run's state and chores: set-up, resume, logging, evaluation, checkpoints.

`train.py` holds the algorithm; this holds everything around it, so the loop there
stays one screen long.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time

import jax
import numpy as np

from ophsd_jax import runtime
from ophsd_jax.checkpointing import CheckpointManager, abstract_like, join_arrays, split_arrays
from ophsd_jax.data.iterator import ExampleIterator
from ophsd_jax.distill.batch import Buckets
from ophsd_jax.distill.step import TrainStep, init_train_state, learning_rate_schedule, OptimConfig
from ophsd_jax.evaluate import evaluate, write_eval
from ophsd_jax.metrics import MetricsWriter, PhaseTimer, progress_bar

log = logging.getLogger("ophsd_jax.train")


class Run:
    _stop_requested = False

    @classmethod
    def request_stop(cls, signum=None, frame=None):
        log.warning("stop requested (signal %s): finishing this step, then saving", signum)
        cls._stop_requested = True

    @property
    def preempted(self) -> bool:
        return Run._stop_requested

    @classmethod
    def create(cls, config, workdir: str, *, restore_step: int | None = None, for_eval: bool = False) -> "Run":
        self = cls()
        self.config, self.workdir = config, workdir
        c = config
        self.mesh = runtime.make_mesh(c)
        self.model_cfg, self.graphdef, params, self.tokenizer = runtime.load_model(c, self.mesh)
        self.data = runtime.load_data(c, workdir)
        self.harness = runtime.make_run_harness(c, self.data)
        self.sampler = runtime.make_sampler(c, self.model_cfg, self.graphdef, self.mesh, self.tokenizer)
        self.template_kwargs = c.model.chat_template_kwargs.to_dict()
        self.rng = jax.random.key(c.seed)
        self.optimizer = runtime.optimizer(c)
        # "initial": a frozen copy of the starting weights (reloaded from the source on resume).
        # Kept in the compute dtype: it is only ever read by bf16/fp32 forward passes.
        self.teacher_params = (jax.tree.map(lambda x: x.astype(self.model_cfg.dtype) + 0, params)
                               if c.distill.teacher == "initial" else None)
        self.state = init_train_state(params, self.optimizer, self.mesh)
        self.data_iter = ExampleIterator(self.data.train, c.train.batch_size, seed=c.seed)
        self.ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), keep=c.train.keep_checkpoints,
                                      async_save=c.train.async_checkpoints)
        self.step = 0
        self._restore(restore_step, required=for_eval)
        if for_eval:
            return self
        runtime.save_config(c, workdir)
        self.train_step = TrainStep(self.graphdef, runtime.step_config(c), self.optimizer, self.mesh, self.state)
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

    # ---- checkpoints -------------------------------------------------------------------

    def _restore(self, step: int | None, required: bool):
        found = self.ckpt.restore_latest(abstract_like(self.state), max_step=step)
        if found is None:
            if required:
                raise FileNotFoundError(f"no readable checkpoint in {self.ckpt.directory}")
            return
        self.step, self.state, host, arrays = found
        self.data_iter.restore(host["data_iter"])
        self.harness.load_state_dict(join_arrays(host["harness"], arrays))
        log.info("resumed from %s/%d", self.ckpt.directory, self.step)

    def save(self, step: int):
        harness_json, arrays = split_arrays(self.harness.state_dict())
        host = {"step": step, "seed": self.config.seed, "data_iter": self.data_iter.state(), "harness": harness_json}
        self.ckpt.save(step, self.state, host, arrays)

    # ---- per step ----------------------------------------------------------------------

    def next_examples(self) -> list[dict]:
        return next(self.data_iter)

    def progress(self):
        return progress_bar(self.config.train.steps, initial=self.step)

    def step_metrics(self, step, examples, rollout, results, harness_rewards) -> dict:
        task = self.data.task
        rewards = [task.reward(t, e) for t, e in zip(rollout.texts, examples)]
        modes = collections.Counter(r.mode for r in results)
        out = {"rollout/reward": float(np.mean(rewards)),
               "rollout/response_tokens": float(np.mean([len(t) for t in rollout.tokens])),
               "harness/reward": float(np.nanmean(harness_rewards)) if not np.all(np.isnan(harness_rewards)) else float("nan"),
               "lr": float(self.lr(step)),
               **{f"harness/mode_{m}": n for m, n in modes.items()}}
        bank = getattr(self.harness, "bank", None)
        if bank is not None:
            out["bank/size"] = len(bank)
        return out

    def end_step(self, step: int, metrics: dict, bar):
        """Log, evaluate and checkpoint after `step` updates."""
        c = self.config
        train_seconds = sum(self.timer.seconds.values())
        if step % c.train.eval_every == 0 or step == c.train.steps:
            with self.timer("eval"):
                metrics.update(self.evaluate(step))
        self.timer_report = self.timer.report()
        metrics.update(self.timer_report)
        metrics["tokens_per_s"] = float(metrics.get("tokens", 0.0)) / max(train_seconds, 1e-9)
        self.timer.reset()
        flat = self.writer.write(step, metrics)
        self.step = step
        if step % c.train.save_every == 0 or step == c.train.steps or self.preempted:
            self.save(step)
            if self.preempted:
                self.ckpt.wait()
                log.warning("stopped at step %d; checkpoint saved, re-run the same command to resume", step)
        bar.update(1)
        bar.set_postfix(loss=f"{flat.get('loss', float('nan')):.4f}", rollout=f"{flat['rollout/reward']:.2f}",
                        harness=f"{flat['harness/reward']:.2f}", refresh=False)
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
        harness = None
        if c.eval.harness:
            harness = runtime.make_eval_harness(c, self.data, self.harness)
        summary, records = evaluate(sampler=self.sampler, tokenizer=self.tokenizer, params=self.state.params,
                                    task=self.data.task, harness=harness, examples=[ev[i] for i in range(n)],
                                    eval_cfg=c.eval, rng=jax.random.fold_in(jax.random.key(c.seed + 1), step),
                                    template_kwargs=self.template_kwargs)
        if jax.process_index() == 0:
            write_eval(self.workdir, step, summary, records)
        log.info("eval @ step %d: %s", step, ", ".join(f"{k}={v:.3f}" for k, v in summary.items()
                                                        if isinstance(v, float)))
        if hasattr(self, "evals"):
            self.evals[step] = summary
        return summary

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


def _summary_table(evals: dict[int, dict], timing: dict) -> str:
    keys = sorted({k for v in evals.values() for k in v if k.startswith("eval/") and "tokens" not in k
                   and "examples" not in k})
    lines = ["", "step  " + "  ".join(f"{k[5:]:>12}" for k in keys)]
    for step in sorted(evals):
        lines.append(f"{step:>4}  " + "  ".join(f"{evals[step].get(k, float('nan')):>12.3f}" for k in keys))
    return "\n".join(lines)
