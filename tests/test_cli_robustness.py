"""The training CLI does not lose a run to one over-long prompt, and its errors keep their
traceback in the work dir (configs/tiny.py, real subprocesses)."""

import json
import os

from test_trainer import cli, read_metrics, train_args


def test_prompts_longer_than_the_sampler_takes_are_skipped_and_counted(tmp_path):
    """sampler.prompt_buckets=(128,): the tiny run's student prompts (65-95 tokens) fit,
    its training planner prompts (reference solution included, > 180 tokens) do not."""
    workdir = tmp_path / "long"
    cli("ophsd_jax.train", *train_args(workdir, "--config.sampler.prompt_buckets=(128,)", "--config.train.steps=2",
                                       "--config.train.eval_every=2"))
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # batch_size=2: both examples of every step skipped at the plan call, no update
        assert r["batch/skipped_harness_prompt_too_long"] == r["harness/mode_skipped_plan"] == 2
        assert r["batch/skipped_rollout_prompt_too_long"] == 0 and r["batch/valid"] == 0 and "loss" not in r
        assert r["rollout/response_tokens"] > 0
    for step in (0, 2):
        summary = json.load(open(os.path.join(workdir, "eval", f"step_{step}_summary.json")))
        records = [json.loads(line) for line in open(os.path.join(workdir, "eval", f"step_{step}.jsonl"))]
        assert summary["eval/unscored"] == 0 and summary["eval/examples"] == len(records) == 2
        unscored = [r for r in records if r["harness_mode"].startswith("skipped_")]
        assert summary["eval/harness_unscored"] == len(unscored) >= 1
        assert all(r["harness_reward"] is None for r in unscored)
