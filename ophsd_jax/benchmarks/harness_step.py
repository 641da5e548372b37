"""The harness's generation cost per training step, on a config's real prompts.

    python -m ophsd_jax.benchmarks.harness_step --config configs/smollm2_arithmetic.py [--steps 4] \
        [--config.key=value ...]

For `--steps` training batches of the config (its data, harness, sampler settings and
current weights: the initial ones), times the generation phase of a step five ways, in
one process on the same batches:

  rollout alone   the student's answers to the bare prompts (one sampler call);
  three calls     the design before issue 14: rollout, then every harness call in full
                  (Plan-Solve: the plan, then the solve), one sampler call each;
  two calls       rollout, then the harness's first call, one sampler call each, the
                  final call only where it is used, as below (`sampler.join_calls=False`);
  joined, static  the rollout joined with the harness's first call
                  (`sampler.join_calls=True`), the final call only where it is used
                  (`harness.reward_fraction`), every row prefilled at the call's
                  longest prompt bucket (`sampler.batching=static`);
  joined, slots   the same call on the slot path (the default, `sampler.batching=auto`,
                  for a call whose prompts span prefill sizes): every row starts at
                  once, each prompt bucket prefilled at its own size.

The harness's seconds are a way's time minus the rollout's. Every way runs once over all
batches to compile, then is timed over the same batches; the mean per step is reported
(and that of the first pass, compilations included).
Two calls, joined static and joined slots draw every row with the same key: their tokens
are compared.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import jax
import numpy as np

from ophsd_jax.benchmarks.common import cpu_model, emit


def main(argv):
    del argv
    from ophsd_jax import config as config_lib
    from ophsd_jax.run import Run
    from ophsd_jax.sampling import ChatRequest, GenerateChat, generate_chats

    c, steps = FLAGS.config, FLAGS.steps
    logging.getLogger("ophsd_jax").setLevel(logging.WARNING)
    config_lib.validate(c)
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="harness_step_")
    run = Run.create(c, os.path.join(workdir, "run"), for_eval=True, initial_ok=True)
    run.sampler.show_progress = False
    tok, task, sampler = run.tokenizer, run.data.task, run.sampler
    params = run.sample_params()
    batches = [run.next_examples() for _ in range(steps)]

    def rollout_request(examples, key):
        return ChatRequest([task.student_messages(e) for e in examples], c.rollout.max_new_tokens,
                           jax.random.fold_in(key, 0), c.rollout.temperature, c.rollout.top_p, c.rollout.top_k)

    def rollout_alone(examples, key):
        return generate_chats(sampler, tok, params, [rollout_request(examples, key)],
                              template_kwargs=run.template_kwargs)[0].tokens

    def three_calls(examples, key):
        rollout_alone(examples, key)
        chat = GenerateChat(sampler, tok, params, jax.random.fold_in(key, 1), template_kwargs=run.template_kwargs)
        run.harness.run(examples, chat, final=[True] * len(examples))

    def two_calls(examples, key):
        rollout = rollout_alone(examples, key)
        chat = GenerateChat(sampler, tok, params, jax.random.fold_in(key, 1), template_kwargs=run.template_kwargs)
        # (no `join`: the harness's calls are its own)
        results = run.harness.run(examples, chat, final=[False] * len(examples))
        return rollout + [r.teacher_messages[-1]["content"] for r in results]

    def joined(batching):
        def way(examples, key):
            sampler.batching, sampler.join_calls = batching, True
            chat = GenerateChat(sampler, tok, params, jax.random.fold_in(key, 1), template_kwargs=run.template_kwargs,
                                join=rollout_request(examples, key))
            results = run.harness.run(examples, chat, final=[False] * len(examples))
            return chat.joined().tokens + [r.teacher_messages[-1]["content"] for r in results]
        return way

    batching, join_calls = sampler.batching, sampler.join_calls
    ways = {"rollout alone": rollout_alone, "three calls": three_calls, "two calls": two_calls,
            "joined, static": joined("static"),
            "joined, slots": joined("continuous")}
    seconds, first, outputs = {}, {}, {}
    for name, way in ways.items():
        t0 = time.perf_counter()
        for step, examples in enumerate(batches):  # compile every bucket this way uses
            way(examples, jax.random.fold_in(run.rng, step))
        first[name] = (time.perf_counter() - t0) / len(batches)
        t0 = time.perf_counter()
        outputs[name] = [way(examples, jax.random.fold_in(run.rng, step)) for step, examples in enumerate(batches)]
        seconds[name] = (time.perf_counter() - t0) / len(batches)
        print(f"{name:>15}: {seconds[name]:6.2f} s/step ({first[name]:6.2f} in the first pass)", flush=True)
    sampler.batching, sampler.join_calls = batching, join_calls
    harness = {name: seconds[name] - seconds["rollout alone"] for name in ways if name != "rollout alone"}
    same = sum(a == b for a, b in zip(outputs["joined, static"], outputs["joined, slots"]))
    same_two = sum(a == b for a, b in zip(outputs["joined, static"], outputs["two calls"]))
    print(f"cpu: {cpu_model()}; {jax.devices()[0].platform}; config {FLAGS['config'].config_filename}, {len(batches)} steps of "
          f"{c.train.batch_size} prompts")
    for name, s in harness.items():
        print(f"harness s/step, {name:>14}: {s:6.2f}  ({s / harness['three calls']:.2f}x three calls)")
    print(f"joined static vs slots: {same}/{len(batches)} steps with identical rollouts and teacher contexts; "
          f"vs two calls: {same_two}/{len(batches)}")
    emit({"bench": "harness_step", "cpu": cpu_model(), "platform": jax.devices()[0].platform, "config": FLAGS['config'].config_filename,
          "steps": len(batches), "batch": c.train.batch_size, "seconds_per_step": seconds,
          "first_pass_seconds_per_step": first,
          "harness_seconds_per_step": harness,
          "harness_ratio_vs_three_calls": {k: v / harness["three calls"] for k, v in harness.items()},
          "identical_steps": same, "identical_steps_two_calls": same_two})


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from ophsd_jax.train import parse_flags

    config_flags.DEFINE_config_file("config", None, "a config file under configs/", lock_config=False,
                                    accept_new_attributes=True)
    flags.DEFINE_integer("steps", 4, "training batches timed")
    flags.DEFINE_string("workdir", None, "where the config's data is built (default: a temp dir)")
    flags.mark_flags_as_required(["config"])
    FLAGS = flags.FLAGS
    app.run(main, flags_parser=parse_flags)
