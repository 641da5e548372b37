"""The harness re-attached at evaluation: Draft–Verify retrieves from a bank of the whole
labelled training split (never an evaluation example), whatever the training run's online
bank holds, `seed_bank_from_train=True` works, and the bank size is reported.

The model is a scripted fake behind the real chat helper (tests/fake_model.py) that
answers every prompt with the same text."""

import pathlib

import jax
import numpy as np
import pytest

from fake_model import ByteTokenizer, ScriptedSampler
from ophsd_jax import runtime
from ophsd_jax.config import base_config
from ophsd_jax.data.load_lawbench import load_lawbench
from ophsd_jax.data.tasks import make_task
from ophsd_jax.evaluate import evaluate

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
OPTIONS = {"cold_start_threshold": 10, "draft_k": 3, "confirm_k": 2, "challenge_k": 2,
           "draft_max_tokens": 64, "verify_max_tokens": 64}


@pytest.fixture
def lawbench_run():
    examples, _ = load_lawbench(FIXTURES / "lawbench_small.json")
    c = base_config()
    c.task, c.harness.name, c.harness.options = "lawbench", "draft_verify", OPTIONS
    c.eval.k, c.eval.max_new_tokens = 1, 64
    data = runtime.Data(make_task("lawbench"), train=examples[:11], eval=examples[11:], report=None)
    return c, data


def brute_force_ids(embedder, task, bank_examples, query, k):
    """The k training cases nearest to `query` by cosine (float64), ties to the earlier one."""
    q = embedder.embed([task.case_text(query)])[0].astype(np.float64)
    emb = embedder.embed([task.case_text(e) for e in bank_examples]).astype(np.float64)
    scores = emb @ q / np.linalg.norm(emb, axis=1) / np.linalg.norm(q)
    order = sorted(range(len(bank_examples)), key=lambda i: (-scores[i], i))
    return [bank_examples[i]["id"] for i in order[:k]]


def run_eval(c, data, harness):
    sampler = ScriptedSampler("[罪名]盗窃<eoa>")
    summary, records = evaluate(sampler=sampler, tokenizer=ByteTokenizer(), params=None, task=data.task,
                                harness=harness, examples=list(data.eval), eval_cfg=c.eval, rng=jax.random.key(0))
    return summary, records


@pytest.mark.parametrize("online", [0, 4])
def test_eval_bank_is_the_training_split_whatever_the_online_bank_holds(lawbench_run, online):
    """Step 0 (an empty online bank) and mid-run (a partial one): evaluation retrieves
    from every labelled training example and from no evaluation example."""
    c, data = lawbench_run
    train_harness = runtime.make_run_harness(c, data)
    train_harness.observe(data.train[:online])
    harness = runtime.make_eval_harness(c, data, train_harness)
    train_ids, eval_ids = [e["id"] for e in data.train], {e["id"] for e in data.eval}
    assert harness.bank.ids == train_ids and not eval_ids & set(harness.bank.ids)
    assert [list(x) for x in harness.bank.labels] == [data.task.label(e) for e in data.train]
    assert len(train_harness.bank) == online  # the training bank is left as it was

    summary, records = run_eval(c, data, harness)
    assert summary["eval/harness_bank_size"] == len(data.train)
    assert [r["harness_bank_size"] for r in records] == [len(data.train)] * len(data.eval)
    assert [r["harness_mode"] for r in records] == ["full"] * len(data.eval)  # not the zero-shot cold start
    results = harness.run(list(data.eval), lambda convs, **kw: ["[罪名]盗窃<eoa>"] * len(convs))
    for e, r in zip(data.eval, results):
        assert r.info["draft_ids"] == brute_force_ids(harness.bank.embedder, data.task, data.train, e,
                                                      OPTIONS["draft_k"])


def test_seed_bank_from_train_evaluates(lawbench_run):
    c, data = lawbench_run
    c.harness.options.seed_bank_from_train = True
    train_harness = runtime.make_run_harness(c, data)
    assert train_harness.bank.ids == [e["id"] for e in data.train]
    harness = runtime.make_eval_harness(c, data, train_harness)  # raised ValueError before
    assert harness.bank.ids == [e["id"] for e in data.train]
    summary, records = run_eval(c, data, harness)
    assert summary["eval/harness_bank_size"] == len(data.train)
    assert [r["harness_mode"] for r in records] == ["full"] * len(data.eval)
    assert summary["eval/harness_acc"] == pytest.approx(np.mean([data.task.reward("[罪名]盗窃<eoa>", e)
                                                                 for e in data.eval]))


def test_eval_reports_generated_tokens_per_second(lawbench_run):
    """eval/tokens_per_s x eval/seconds = every token generated: the student's answers and
    each harness call's (draft and verify), counted here from the fake's own outputs."""
    c, data = lawbench_run
    harness = runtime.make_eval_harness(c, data, runtime.make_run_harness(c, data))
    sampler = ScriptedSampler("[罪名]盗窃<eoa>")
    summary, records = evaluate(sampler=sampler, tokenizer=ByteTokenizer(), params=None, task=data.task,
                                harness=harness, examples=list(data.eval), eval_cfg=c.eval, rng=jax.random.key(0))
    answer = len(ByteTokenizer().encode("[罪名]盗窃<eoa>"))
    n = len(data.eval)  # sampler calls: the student's answers joined with the drafts, then verify
    assert [len(p) for p in sampler.calls] == [2 * n, n]
    expected = 3 * n * answer
    assert summary["eval/seconds"] > 0
    assert summary["eval/tokens_per_s"] * summary["eval/seconds"] == pytest.approx(expected, rel=1e-9)


def test_eval_batch_size_gets_its_own_sampler(tmp_path):
    """eval.batch_size: evaluation generates with that many rows per call; 0 = the run's."""
    import importlib.util

    from ophsd_jax.run import Run

    spec = importlib.util.spec_from_file_location("tiny", pathlib.Path(__file__).parents[1] / "configs" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    c.train.batch_size, c.sampler.max_batch, c.eval.batch_size = 8, 8, 16  # tests run on 8 devices
    run = Run.create(c, str(tmp_path / "w"))
    assert run._eval_sampler().max_batch == 16 and run.sampler.max_batch == 8
    assert run._eval_sampler() is run._eval_sampler()
    c.eval.batch_size = 0
    run = Run.create(c, str(tmp_path / "v"))
    assert run._eval_sampler() is run.sampler
