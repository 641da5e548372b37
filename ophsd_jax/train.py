"""Train with On-Policy Harness Self-Distillation.

    python -m ophsd_jax.train --config configs/<task>.py [--config.key=value ...] [--workdir DIR]

Each step (docs/design.md):
  1. rollout  - the student answers bare prompts with the current weights (T=1.0)
  2. harness  - the same prompts go through the harness, also with the current weights;
                its last call's messages are the teacher context (its first call and
                the rollout are one sampler call, sampler.join_calls;
                its last call's answer, which only the harness reward reads, for
                harness.reward_fraction of the rows)
  3. distill  - one jitted step scores the student's own response under both contexts
                and moves the student towards the teacher, token by token
  4. bookkeep - memory bank, metrics, periodic evaluation and checkpoints
Re-running the same command resumes from the newest checkpoint in the work dir.
With several processes each one does all of this for its own share of the batch's
examples; the sampler and the train step are collective (docs/scaling.md).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import jax
import numpy as np

from ophsd_jax import runtime
from ophsd_jax.distill.batch import build_pair_batch
from ophsd_jax.parallel import to_host
from ophsd_jax.run import Run, StopRequested
from ophsd_jax.sampling import ChatRequest, GenerateChat

log = logging.getLogger("ophsd_jax.train")


def train(config, workdir: str) -> dict:
    """Run (or resume) training; returns the final evaluation summary."""
    run = Run.create(config, workdir)
    c, task, tok = run.config, run.data.task, run.tokenizer
    bar = run.progress()
    try:
        _train_loop(run, c, task, tok, bar)
    except StopRequested:  # SIGTERM on any process: the step in progress is abandoned
        run.save_stopped()
    except BaseException:
        run.ckpt.close()  # finish an async save in flight; stop Orbax's threads before exit
        raise
    bar.close()
    return run.finish()


def _train_loop(run: Run, c, task, tok, bar) -> None:
    if run.step == 0 and c.train.eval_before:
        run.evaluate_before_training()
    if run.pending_metrics is not None:  # stopped during the evaluation after this step: finish it
        run.end_step(run.step, run.pending_metrics, bar)
    for step in range(run.step, c.train.steps):
        examples = run.next_examples()  # this process's share of the batch
        key = jax.random.fold_in(run.rng, step)
        student_msgs = [task.student_messages(e) for e in examples]
        with run.timer("generate"):  # 1. on-policy answers to the bare prompts; 2. the teacher context
            params = run.sample_params()  # current weights (LoRA: base + adapter, merged once per step)
            rollout_request = ChatRequest(student_msgs, c.rollout.max_new_tokens, jax.random.fold_in(key, 0),
                                          c.rollout.temperature, c.rollout.top_p, c.rollout.top_k)
            # The rollout joins the harness's first call (one sampler call; neither needs the
            # other), unless sampler.join_calls is off.
            generate_chat = GenerateChat(run.sampler, tok, params, jax.random.fold_in(key, 1),
                                         template_kwargs=run.template_kwargs, join=rollout_request)
            # The final call's answer only feeds the harness reward: generated where it is used.
            results = run.harness.run(examples, generate_chat, final=run.final_rows(len(examples), step))
            rollout = generate_chat.joined()
            del params, generate_chat  # LoRA: the merged copy is not kept through the update
            runtime.release_host_memory()  # the sampler's freed buffers, before the update's
        with run.timer("update"):  # 3. score y under both contexts, one jitted step
            skip = ["rollout_prompt_too_long" if s else "harness_prompt_too_long" if r.skipped else None
                    for s, r in zip(rollout.skipped, results)]  # prompts longer than the sampler takes
            # Scored after exactly the ids the sampler conditioned on (rollout, harness's last call).
            batch = build_pair_batch(tok, student_msgs, [r.teacher_messages for r in results], rollout.tokens,
                                     buckets=run.buckets, batch_size=len(examples), skip=skip,
                                     max_response_tokens=c.distill.max_response_tokens or None,
                                     student_prompt_ids=rollout.prompt_tokens,
                                     teacher_prompt_ids=[r.teacher_prompt_ids for r in results],
                                     template_kwargs=run.template_kwargs, teacher_overflow=c.distill.teacher_overflow,
                                     teacher_material=[r.teacher_material for r in results])
            harness_rewards = [task.reward(r.final_response, e) if r.final_response else np.nan
                               for r, e in zip(results, examples)]
            batch, weights, metrics = run.global_batch(batch, harness_rewards)  # all processes' rows
            run.poll()  # the last point to abandon the step: the update runs to its end
            if metrics["batch/valid"]:
                run.state, step_metrics = run.train_step(run.state, run.teacher_params, batch, weights)
                metrics.update(jax.tree.map(to_host, step_metrics))
        run.observe(examples)  # 4. bookkeeping (memory bank)
        metrics.update(run.step_metrics(step, examples, rollout, results, harness_rewards))
        run.end_step(step + 1, metrics, bar)


def evaluate_workdir(workdir: str, *, step: int | None = None, num_examples: int | None = None,
                     k: int | None = None, config=None) -> dict:
    """Evaluate a work dir's checkpoint (`step`, default the newest). With `config` (a
    config file's contents instead of the work dir's config.json), a work dir without a
    checkpoint evaluates the config's initial weights (the base model) as step 0."""
    initial_ok = config is not None
    if config is None:
        config = runtime.load_config(workdir)
    else:
        from ophsd_jax.config import validate

        validate(config)
    if num_examples is not None:
        config.eval.num_examples = num_examples
    if k is not None:
        config.eval.k = k
    run = Run.create(config, workdir, restore_step=step, for_eval=True, initial_ok=initial_ok)
    try:
        return run.evaluate(run.step)
    finally:
        run.ckpt.close()


USER_ERRORS = (ValueError, FileNotFoundError, KeyError, OSError)


def run_cli(fn, workdir: str | None = None, *, command: str = "train", create_workdir: bool = False):
    """Run `fn`. Whatever it raises, the full traceback goes to a file in `workdir`
    (named on the console). A user error (bad config, missing file, bad data: these
    types) is one line and exit 2; as the same types also come from bugs (or from JAX),
    that line names the file. Other exceptions show their traceback as usual.
    `create_workdir`: make a missing work dir for the file (train makes it anyway);
    otherwise a missing one (a mistyped path) gets the file in the temp dir instead."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return fn()
    except Exception as e:
        path = write_traceback(workdir, command, create_workdir)
        where = f"traceback in {path}" if path else "the traceback could not be written"
        if not isinstance(e, USER_ERRORS) or os.environ.get("OPHSD_TRACEBACK"):
            print(f"error: {type(e).__name__} ({where})", file=sys.stderr)
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {type(e).__name__}: {msg} ({where})", file=sys.stderr)
        sys.exit(2)


def write_traceback(workdir: str | None, command: str, create_workdir: bool) -> str | None:
    """Write the exception being handled, with its traceback, to
    `<workdir>/errors/<command>_<time>_<host>_<pid>.txt` (one file per process, also on
    a file system shared by the hosts; no JAX call, which could be what failed); returns
    the path, or None if it cannot be written."""
    import socket
    import tempfile
    import time
    import traceback

    if workdir and (create_workdir or os.path.isdir(workdir)):
        base = workdir
    else:
        base = os.path.join(tempfile.gettempdir(), "ophsd_jax")
    name = f"{command}_{time.strftime('%Y%m%d-%H%M%S')}_{socket.gethostname()}_{os.getpid()}.txt"
    path = os.path.join(base, "errors", name)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"{' '.join(sys.argv)}\n\n{traceback.format_exc()}")
    except OSError:
        return None
    return path


def parse_flags(argv):
    """absl's parser, but a bad flag or config override is one line and exit 2."""
    from absl import flags

    path = next((b for a, b in zip(argv, argv[1:] + [""]) if a == "--config"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path and not os.path.isfile(path.split(":", 1)[0]):  # "file.py:param" passes param to get_config
        print(f"error: config file not found: {path.split(':', 1)[0]}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:  # ml_collections: an override under a section that does not exist
        lines = str(e.args[0] if e.args else e).splitlines()
        hint = " ".join(lines[1:])
        print(f"error: unknown config key: {lines[0] if lines else e}{'. ' + hint if hint else ''}", file=sys.stderr)
        sys.exit(2)
    except (flags.Error, ValueError, TypeError) as e:
        msg = str(e).strip().splitlines()
        print(f"error: {type(e).__name__}: {msg[-1] if msg else e}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    del argv
    from ophsd_jax.config import validate

    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0])

    def go():
        from ophsd_jax.parallel import initialize_distributed

        initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
        if jax.process_index() != 0:  # one voice: only process 0 logs progress
            logging.getLogger("ophsd_jax").setLevel(logging.WARNING)
        validate(config)
        signal.signal(signal.SIGTERM, Run.request_stop)  # preemption: abandon the step, save the last, exit 0
        return train(config, workdir)

    run_cli(go, workdir, create_workdir=True)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    # Unlocked, so overrides may add option keys (harness.options.k=4); validate() rejects
    # new keys outside config.OPEN_SECTIONS, so a typo is still an error.
    config_flags.DEFINE_config_file("config", None, "a config file under configs/", lock_config=False,
                                    accept_new_attributes=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and evals go (default: runs/<config name>)")
    flags.DEFINE_string("coordinator", None, "multi-process: host:port of process 0 (auto on TPU VMs / SLURM)")
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
    flags.mark_flags_as_required(["config"])
    FLAGS = flags.FLAGS
    app.run(main, flags_parser=parse_flags)
