"""A prompt longer than the sampler's largest prompt bucket is skipped and counted (rollout,
each harness call, evaluation) instead of ending the run, and the sampler calls stay the
same whatever is skipped: in a multi-process run they are collective, so every process
must make the same calls whatever its own prompts are (docs/scaling.md)."""

import pathlib

import jax
import numpy as np
import pytest

from fake_model import ByteTokenizer, ScriptedSampler
from ophsd_jax import parallel
from ophsd_jax.config import base_config
from ophsd_jax.data.load_lawbench import load_lawbench
from ophsd_jax.data.tasks import make_task
from ophsd_jax.distill.batch import build_pair_batch
from ophsd_jax.evaluate import evaluate
from ophsd_jax.harnesses import make_harness
from ophsd_jax.harnesses.plan_solve_prompts import PLANNER_SYSTEM
from ophsd_jax.models.config import ModelConfig
from ophsd_jax.models.state import init_params
from ophsd_jax.sampling import GenerateChat, Sampler, generate_chat_tokens

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TOK = ByteTokenizer()


def user(text):
    return [{"role": "user", "content": text}]


def prompt_len(messages):
    return len(TOK.apply_chat_template(messages, add_generation_prompt=True))


@pytest.fixture(scope="module")
def tiny_sampler():
    cfg = ModelConfig(family="llama", vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16)
    mesh = parallel.single_device_mesh()
    graphdef, params = init_params(cfg, mesh, seed=0)
    sampler = Sampler(cfg, graphdef, mesh, max_batch=4, prompt_buckets=(32, 64), new_token_buckets=(8,),
                      show_progress=False)
    return sampler, params


def test_chat_skips_only_the_prompts_over_the_largest_bucket(tiny_sampler):
    """Real sampler: the prompts that fit get exactly what a call with only them gives."""
    sampler, params = tiny_sampler
    convs = [user("x" * n) for n in (5, 80, 20, 3)]
    fits = [prompt_len(m) <= 64 for m in convs]
    assert fits == [True, False, True, True]
    out = generate_chat_tokens(sampler, TOK, params, convs, max_new_tokens=8, rng=jax.random.key(0),
                               temperature=0.0)
    ref = sampler.generate(params, [p for p, f in zip(out.prompt_tokens, fits) if f], max_new_tokens=8,
                           rng=jax.random.key(0), temperature=0.0, stop_tokens=TOK.stop_token_ids)
    assert out.skipped == [not f for f in fits]
    assert out.prompt_tokens == [TOK.apply_chat_template(m) for m in convs]
    assert out.texts[1] is None and out.tokens[1] == [] and out.logprobs[1].shape == (0,)
    assert [out.tokens[i] for i in (0, 2, 3)] == ref.tokens
    assert [out.texts[i] for i in (0, 2, 3)] == [TOK.decode([t for t in r if t != 1]) for r in ref.tokens]
    for i, r in zip((0, 2, 3), ref.logprobs):
        np.testing.assert_array_equal(out.logprobs[i], r)


def test_a_call_with_nothing_that_fits_still_calls_the_sampler():
    sampler = ScriptedSampler("42", prompt_buckets=(16,))
    out = generate_chat_tokens(sampler, TOK, None, [user("y" * 40)] * 2, max_new_tokens=8, rng=jax.random.key(0))
    assert sampler.calls == [[]]  # one (collective) call, with no prompt from this process
    assert out.skipped == [True, True] and out.texts == [None, None]


EXAMPLES = [
    {"id": "long", "question": "What is 2 + 3? " * 400, "answer": "5", "solution": "2 + 3 = 5."},
    {"id": "long_plan", "question": "What is 4 + 4?", "answer": "8", "solution": "4 + 4 = 8."},
    {"id": "ok", "question": "What is 6 + 1?", "answer": "7", "solution": "6 + 1 = 7."},
]
LIMIT = 2048  # bytes: the normal plan and solve prompts fit, the long ones do not


def plan_solve_answer(prompt):
    if prompt.startswith(f"<system>{PLANNER_SYSTEM}"):
        if "What is 4 + 4?" in prompt:
            return "1. Add. " * 400  # a plan that makes its solve prompt too long
        return "1. Add the numbers."
    return "\\boxed{7}"


def test_plan_solve_skips_per_phase_and_keeps_its_calls():
    harness = make_harness("plan_solve", make_task("math"), {"plan_max_tokens": 8192})
    sampler = ScriptedSampler(plan_solve_answer, prompt_buckets=(LIMIT,))
    results = harness.run(EXAMPLES, GenerateChat(sampler, TOK, None, jax.random.key(0)))
    assert [r.mode for r in results] == ["skipped_plan", "skipped_solve", "plan_solve"]
    assert [r.skipped for r in results] == [True, True, False]
    assert results[0].final_response == results[1].final_response == ""
    assert results[2].final_response == "\\boxed{7}"
    # Two calls, as without skips: the plan call without the long problem, the solve call
    # without it and without the over-long solve prompt.
    assert [len(c) for c in sampler.calls] == [2, 1]
    assert [t["name"] for t in results[1].trace] == ["plan", "solve"] and results[1].trace[1]["response"] is None

    sampler = ScriptedSampler(plan_solve_answer, prompt_buckets=(16,))  # nothing fits anywhere
    results = harness.run(EXAMPLES, GenerateChat(sampler, TOK, None, jax.random.key(0)))
    assert [r.mode for r in results] == ["skipped_plan"] * 3 and sampler.calls == [[], []]


def test_draft_verify_skips_per_phase_and_keeps_its_calls():
    law, _ = load_lawbench(FIXTURES / "lawbench_small.json")
    task = make_task("lawbench")
    options = {"cold_start_threshold": 10, "draft_k": 3, "confirm_k": 2, "challenge_k": 2}
    harness = make_harness("draft_verify", task, options, train_examples=law)

    class Scripted:  # generate_chat, None for the prompts of `skip` (what the chat helper returns)
        def __init__(self, skip):
            self.skip, self.calls = skip, []

        def __call__(self, batch, **kw):
            self.calls.append(len(batch))
            return [None if self.skip(m) else "[罪名]盗窃<eoa>" for m in batch]

    cold = Scripted(lambda m: law[11]["fact"] in m[-1]["content"])
    results = harness.run(law[11:13], cold)  # the bank is still empty
    assert [r.mode for r in results] == ["skipped_cold_start", "cold_start"] and cold.calls == [2]

    harness.observe(law[:11])
    draft_system = harness.run([law[12]], Scripted(lambda m: False))[0].trace[0]["messages"][0]["content"]
    model = Scripted(lambda m: (law[11]["fact"] in m[-1]["content"] and m[0]["content"] == draft_system)
                     or (law[12]["fact"] in m[-1]["content"] and m[0]["content"] != draft_system))
    results = harness.run(law[11:14], model)
    assert [r.mode for r in results] == ["skipped_draft", "skipped_verify", "full"]
    assert model.calls == [3, 2]  # the draft call, then the verify call for the two with a draft
    assert [t["name"] for t in results[1].trace] == ["draft", "verify"]


def test_pair_batch_counts_the_callers_skips():
    tok = ByteTokenizer()
    student = [user("a"), user("bb"), user("ccc"), user("dddd")]
    teacher = [user("A"), user("BB"), user("CCC"), user("DDDD")]
    responses = [[5, 6], [7], [8, 9, 10], [11]]
    skip = [None, "rollout_prompt_too_long", "harness_prompt_too_long", None]
    batch = build_pair_batch(tok, student, teacher, responses, buckets=[64], batch_size=4, skip=skip)
    keep = [0, 3]
    ref = build_pair_batch(tok, [student[i] for i in keep], [teacher[i] for i in keep],
                           [responses[i] for i in keep], buckets=[64], batch_size=4)
    m = batch.meta
    assert m.kept == (0, 3) and m.num_valid == 2 and m.skipped == 2
    assert m.skip_reasons["rollout_prompt_too_long"] == 1 and m.skip_reasons["harness_prompt_too_long"] == 1
    for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="skip"):
        build_pair_batch(tok, student, teacher, responses, buckets=[64], skip=["no_such_reason"] * 4)


def test_evaluation_counts_what_it_could_not_score():
    c = base_config()
    c.eval.k, c.eval.max_new_tokens = 2, 64
    task = make_task("math")
    harness = make_harness("plan_solve", task, {"use_gt": False, "plan_max_tokens": 8192})
    sampler = ScriptedSampler(plan_solve_answer, prompt_buckets=(LIMIT,))
    summary, records = evaluate(sampler=sampler, tokenizer=TOK, params=None, task=task, harness=harness,
                                examples=EXAMPLES, eval_cfg=c.eval, rng=jax.random.key(0))
    assert [prompt_len(task.student_messages(e)) <= LIMIT for e in EXAMPLES] == [False, True, True]
    assert records[0]["unscored"] == "prompt_too_long" and records[0]["rewards"] == []
    assert "unscored" not in records[1] and len(records[1]["rewards"]) == 2
    rewards = [task.reward("\\boxed{7}", e) for e in EXAMPLES[1:] for _ in range(2)]
    assert summary["eval/unscored"] == 1 and summary["eval/examples"] == 3
    assert summary["eval/avg@2"] == pytest.approx(np.mean(rewards))
    assert summary["eval/pass@2"] == pytest.approx(np.mean([max(rewards[:2]), max(rewards[2:])]))
    assert [r["harness_mode"] for r in records] == ["skipped_plan", "skipped_solve", "plan_solve"]
    assert summary["eval/harness_unscored"] == 2
    assert summary["eval/harness_acc"] == pytest.approx(task.reward("\\boxed{7}", EXAMPLES[2]))
