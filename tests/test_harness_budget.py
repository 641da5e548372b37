"""Generate only what is used: the harness's final call generates for the examples in
`final` only, and the step's rollout joins the harness's first call (one sampler call).
A scripted sampler behind the real chat helper (`sampling.GenerateChat`) counts the
sampler calls, the prompts of each and the tokens generated."""

import jax
import pytest
from fake_model import ByteTokenizer, ScriptedSampler
from test_harness_draft_verify import CONFIG as DV_CONFIG
from test_harness_draft_verify import law  # noqa: F401 - fixture
from test_harness_plan_solve import EXAMPLES

from ophsd_jax.data.tasks import make_task
from ophsd_jax.harnesses import make_harness
from ophsd_jax.harnesses.plan_solve_prompts import PLANNER_SYSTEM, SOLVER_SYSTEM
from ophsd_jax.sampling import ChatRequest, GenerateChat, generate_chat_tokens

TOK = ByteTokenizer()


def answer(prompt: str) -> str:
    if PLANNER_SYSTEM in prompt:
        return "1. Add the numbers."
    if SOLVER_SYSTEM in prompt:
        return "The sum is \\boxed{1}, as planned."
    return "[罪名]盗窃<eoa>" if "罪名" in prompt or "[" in prompt else "Student answer \\boxed{2}."


def run_step(harness, examples, final, student_msgs, join_calls=True):
    """The trainer's generation for one step: (results, rollout, sampler) with the rollout
    joined to the harness's first call (where the sampler joins calls)."""
    sampler = ScriptedSampler(answer)
    sampler.join_calls = join_calls
    rollout_request = ChatRequest(student_msgs, 40, jax.random.key(0))
    gen = GenerateChat(sampler, TOK, None, jax.random.key(1), join=rollout_request)
    results = harness.run(examples, gen, final=final)
    return results, gen.joined(), sampler


def generated_tokens(sampler) -> int:
    return sum(len(TOK.encode(answer(TOK.decode(p)))) for call in sampler.calls for p in call)


@pytest.mark.parametrize("final", [None, [True, False, False], [False, False, False]])
def test_plan_solve_generates_the_solve_only_for_final_rows(final):
    task = make_task("math")
    harness = make_harness("plan_solve", task, {"plan_max_tokens": 64, "solve_max_tokens": 64})
    students = [task.student_messages(e) for e in EXAMPLES]
    results, rollout, sampler = run_step(harness, EXAMPLES, final, students)
    wanted = [True] * 3 if final is None else final

    plan_and_rollout, solve = sampler.calls  # two sampler calls, not three
    assert len(plan_and_rollout) == 3 + 3 and len(solve) == sum(wanted)
    assert all(SOLVER_SYSTEM in TOK.decode(p) for p in solve)
    # The joined rollout is what the rollout alone gives.
    alone = generate_chat_tokens(ScriptedSampler(answer), TOK, None, students, max_new_tokens=40,
                                 rng=jax.random.key(0))
    assert rollout.tokens == alone.tokens and rollout.prompt_tokens == alone.prompt_tokens
    for r, f in zip(results, wanted):
        assert r.mode == "plan_solve" and r.teacher_messages[0]["content"] == SOLVER_SYSTEM
        assert r.teacher_material.texts == ["1. Add the numbers."]  # the plan: always generated
        if f:
            assert r.final_response == "The sum is \\boxed{1}, as planned."
            assert r.teacher_prompt_ids == TOK.apply_chat_template(r.teacher_messages)
        else:  # not generated: the trainer renders the messages itself
            assert r.final_response is None and r.teacher_prompt_ids is None
    # Tokens: the plans and rollouts of every row, the solve of the final rows only.
    n = lambda text: len(TOK.encode(text))  # noqa: E731
    assert generated_tokens(sampler) == 3 * (n("1. Add the numbers.") + n("Student answer \\boxed{2}.")) + \
        sum(wanted) * n("The sum is \\boxed{1}, as planned.")


def test_a_sampler_that_does_not_join_gets_the_rollout_and_harness_calls_separately_with_the_same_outputs():
    """`Sampler.join_calls` False (an option): the rollout is its own sampler call,
    after the harness's, and every output is what the joined call gave."""
    task = make_task("math")
    harness = make_harness("plan_solve", task, {"plan_max_tokens": 64, "solve_max_tokens": 64})
    students = [task.student_messages(e) for e in EXAMPLES]
    final = [True, False, False]
    joined = run_step(harness, EXAMPLES, final, students)
    results, rollout, sampler = run_step(harness, EXAMPLES, final, students, join_calls=False)
    plan, solve, rollout_call = sampler.calls  # three calls, none joined; the same prompts in all
    assert [len(c) for c in sampler.calls] == [3, 1, 3]
    assert all(PLANNER_SYSTEM in TOK.decode(p) for p in plan) and rollout_call == joined[2].calls[0][:3]
    assert plan == joined[2].calls[0][3:] and solve == joined[2].calls[1]
    assert [getattr(rollout, f) for f in ("texts", "tokens", "prompt_tokens", "skipped")] == \
        [getattr(joined[1], f) for f in ("texts", "tokens", "prompt_tokens", "skipped")]
    assert [r.teacher_messages for r in results] == [r.teacher_messages for r in joined[0]]
    assert [r.final_response for r in results] == [r.final_response for r in joined[0]]


@pytest.mark.parametrize("join_calls", [True, False])
def test_the_config_key_reaches_the_sampler(join_calls):
    from ophsd_jax import parallel, runtime
    from ophsd_jax.config import base_config
    from ophsd_jax.models import state as model_state
    from ophsd_jax.models.config import ModelConfig

    cfg = ModelConfig(family="llama", vocab_size=300, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    mesh = parallel.single_device_mesh()
    graphdef, _ = model_state.init_params(cfg, mesh, seed=0)
    c = base_config()
    c.sampler.join_calls = join_calls
    assert runtime.make_sampler(c, cfg, graphdef, mesh, TOK).join_calls is join_calls


def test_draft_verify_verifies_only_final_rows_and_cold_start_joins_the_rollout(law):  # noqa: F811
    task = make_task("lawbench")
    harness = make_harness("draft_verify", task, DV_CONFIG, train_examples=law)
    queries = law[10:13]
    students = [task.student_messages(e) for e in queries]

    # Cold start (empty bank): its one call is the final call, joined with the rollout.
    results, rollout, sampler = run_step(harness, queries, [False, True, False], students)
    (call,) = sampler.calls
    assert len(call) == 3 + 1 and len(rollout.texts) == 3
    assert [r.final_response for r in results] == [None, "[罪名]盗窃<eoa>", None]
    assert all(r.mode == "cold_start" and r.teacher_messages == s for r, s in zip(results, students))

    # Full path: drafts for every row (a draft is final where it has no label), verify for final rows.
    harness.observe(law[:10])
    results, rollout, sampler = run_step(harness, queries, [True, False, False], students)
    draft_and_rollout, verify = sampler.calls
    assert len(draft_and_rollout) == 3 + 3 and len(verify) == 1
    assert [r.mode for r in results] == ["full"] * 3
    assert results[0].final_response == "[罪名]盗窃<eoa>" and results[0].teacher_prompt_ids is not None
    for r in results[1:]:
        assert r.final_response is None and r.teacher_prompt_ids is None
        assert r.teacher_messages[0]["content"] == results[0].teacher_messages[0]["content"]  # verify prompt


def test_opsd_generates_for_final_rows_only_and_not_at_all_without_generate():
    task = make_task("math")
    students = [task.student_messages(e) for e in EXAMPLES]
    for generate, expected in ((True, [3 + 1]), (False, [3])):  # without generate: the rollout alone
        harness = make_harness("opsd", task, {"generate": generate, "max_tokens": 32})
        results, rollout, sampler = run_step(harness, EXAMPLES, [False, True, False], students)
        assert [len(c) for c in sampler.calls] == expected and len(rollout.texts) == 3
        sampled = [r.final_response is not None and r.final_response != "" for r in results]
        assert sampled == ([False, True, False] if generate else [False] * 3)


@pytest.mark.parametrize("batch,fraction", [(4, 0.125), (8, 0.125), (64, 0.125), (6, 0.3), (5, 1.0), (7, 0.0)])
def test_reward_rows_spread_the_fraction_over_steps(batch, fraction):
    """harness.reward_fraction of the rows over a run, evenly: each step floor or ceil of
    f x B (0.125 of 4 rows: one row every other step, where ceil gave one every step)."""
    import math

    from ophsd_jax.run import reward_rows

    counts = [reward_rows(step, batch, fraction) for step in range(40)]
    for steps in range(1, 41):  # every prefix of the run: the fraction so far, to the row
        assert sum(counts[:steps]) == math.floor(round(steps * batch * fraction, 6))
    assert set(counts) <= {math.floor(batch * fraction), math.ceil(batch * fraction)}
    if (batch, fraction) == (4, 0.125):
        assert counts[:4] == [0, 1, 0, 1]
