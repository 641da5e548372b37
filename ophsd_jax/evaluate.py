"""Evaluation: student avg@k / pass@k on bare prompts, and accuracy with the harness
re-attached (the paper's "reattach the harness" analysis). Used in the training loop and
as a CLI on a work dir:

    python -m ophsd_jax.evaluate --workdir DIR [--step N] [--k 8] [--num_examples 64]
    python -m ophsd_jax.evaluate --config configs/X.py --workdir DIR [--config.key=value ...]

With `--config`, the run's settings come from the config file (with overrides) instead
of `<workdir>/config.json`, and a work dir without checkpoints evaluates the config's
initial weights (the base model, with and without its harness) as step 0. The checkpoint
evaluates under any data, seed or batch size (the model must match), e.g. on your own
held-out file: `--config.data.eval.kind=uspto_csv --config.data.eval.path=mine.csv`.

Writes `<workdir>/eval/step_<N>.jsonl` (one line per example: prompt, responses,
extracted answers, rewards, harness response) and `step_<N>_summary.json`. An example
whose prompt is longer than the sampler's largest prompt bucket is not scored (record
`"unscored"`, harness mode `skipped_<phase>`) and counted: `eval/unscored`,
`eval/harness_unscored`; the accuracies cover the scored examples.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import numpy as np

from ophsd_jax.harnesses.base import SKIPPED
from ophsd_jax.sampling import ChatRequest, GenerateChat

log = logging.getLogger(__name__)


def _mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def evaluate(*, sampler, tokenizer, params, task, harness, examples, eval_cfg, rng, template_kwargs=None,
             first_index: int = 0, gather=None):
    """(summary dict, per-example records). `harness=None` skips the harness measurement.

    Multi-process: each process passes its share of the examples (`first_index`: the
    position of the first one, for records without an id) and `gather(records) -> all
    records in order`; the summary then covers every process's examples.
    """
    k = eval_cfg.k
    t0 = time.perf_counter()
    convs = [task.student_messages(e) for e in examples]
    student = ChatRequest([m for m in convs for _ in range(k)], eval_cfg.max_new_tokens, jax.random.fold_in(rng, 0),
                          eval_cfg.temperature, eval_cfg.top_p, eval_cfg.top_k)
    # The student's answers join the harness's first call (one sampler call, sampler.join_calls).
    harness_calls = []
    gen = GenerateChat(sampler, tokenizer, params, jax.random.fold_in(rng, 1), template_kwargs=template_kwargs,
                       record=harness_calls, join=student)
    results = harness.run(list(examples), gen) if harness is not None else None
    out = gen.joined()
    records = []
    for i, (e, m) in enumerate(zip(examples, convs)):
        rows = [j for j in range(i * k, (i + 1) * k) if not out.skipped[j]]  # all k or none: the same prompt
        texts = [out.texts[j] for j in rows]
        rewards = [float(task.reward(t, e)) for t in texts]
        records.append({"id": e.get("id", first_index + i), "prompt": m[-1]["content"], "responses": texts,
                        "extracted": [task.extract_answer(t) for t in texts], "rewards": rewards,
                        "reference": task.reference_answer(e),
                        "response_tokens": [len(out.tokens[j]) for j in rows]})
        if not rows:  # longer than the sampler's largest prompt bucket: counted, not scored
            records[-1]["unscored"] = "prompt_too_long"
    if harness is not None:
        bank = getattr(harness, "bank", None)  # retrieval harnesses: the bank it retrieved from
        for rec, res, e in zip(records, results, examples):
            rec["harness_response"] = res.final_response
            rec["harness_mode"] = res.mode
            rec["harness_reward"] = float(task.reward(res.final_response, e)) if res.final_response else None
            if bank is not None:
                rec["harness_bank_size"] = len(bank)
    # generated tokens per second of this process's generation (student + harness calls)
    generated = sum(map(len, out.tokens)) + sum(len(t) for c in harness_calls for t in c.tokens)
    seconds = time.perf_counter() - t0
    if gather is not None:
        records = gather(records)
    summary = {f"eval/avg@{k}": _mean([r for rec in records for r in rec["rewards"]]),
               f"eval/pass@{k}": _mean([max(rec["rewards"]) for rec in records if rec["rewards"]]),
               "eval/response_tokens": _mean([n for rec in records for n in rec["response_tokens"]]),
               "eval/examples": len(records),
               "eval/unscored": sum("unscored" in rec for rec in records),
               "eval/seconds": seconds, "eval/tokens_per_s": generated / max(seconds, 1e-9)}
    if harness is not None:  # accuracy over the examples the harness could answer; the others counted
        summary["eval/harness_acc"] = _mean([rec["harness_reward"] for rec in records])
        summary["eval/harness_unscored"] = sum(rec["harness_mode"].startswith(SKIPPED) for rec in records)
        if bank is not None:
            summary["eval/harness_bank_size"] = len(bank)
    return summary, records


def write_eval(workdir: str, step: int, summary: dict, records: list[dict]) -> str:
    d = os.path.join(workdir, "eval")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"step_{step}.jsonl")
    with open(path + ".tmp", "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    with open(os.path.join(d, f"step_{step}_summary.json"), "w") as f:
        json.dump({"step": step, **summary}, f, indent=2)
    return path


def main(argv):
    del argv
    from ophsd_jax import train

    config = FLAGS.config if FLAGS["config"].present else None
    summary = train.run_cli(lambda: train.evaluate_workdir(FLAGS.workdir, step=FLAGS.step,
                                                           num_examples=FLAGS.num_examples, k=FLAGS.k, config=config),
                            FLAGS.workdir, command="evaluate", create_workdir=config is not None)
    print(json.dumps(summary))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from ophsd_jax.train import parse_flags

    config_flags.DEFINE_config_file("config", None, "evaluate this config's model (a work dir without checkpoints: "
                                    "its initial weights) instead of the work dir's config.json", lock_config=False,
                                    accept_new_attributes=True)
    flags.DEFINE_string("workdir", None, "training work dir (holds config.json and checkpoints/)", required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
    flags.DEFINE_integer("num_examples", None, "override config.eval.num_examples")
    flags.DEFINE_integer("k", None, "override config.eval.k")
    FLAGS = flags.FLAGS
    app.run(main, flags_parser=parse_flags)
