"""Plan–Solve and OPSD harnesses against a scripted fake model: exact prompts, modes, batching."""

import json

import pytest

from ophsd_jax.data.tasks import make_task
from ophsd_jax.harnesses import HarnessError, PlanSolveConfig, make_harness
from ophsd_jax.harnesses.plan_solve_prompts import PLANNER_SYSTEM, SOLVE_ONLY_SYSTEM, SOLVER_SYSTEM


class ScriptedModel:
    """Stands in for the sampler's generate_chat: records calls, answers by script."""

    def __init__(self, respond):
        self.respond = respond
        self.calls = []

    def __call__(self, batch, *, temperature, top_p, top_k, max_new_tokens):
        self.calls.append({"batch": batch, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                           "max_new_tokens": max_new_tokens})
        return [self.respond(messages) for messages in batch]


def phase(messages):
    return {PLANNER_SYSTEM: "plan", SOLVER_SYSTEM: "solve", SOLVE_ONLY_SYSTEM: "solve_only"}[messages[0]["content"]]


TAIL = " Please reason step by step, and put your final answer within \\boxed{}."
EXAMPLES = [
    {"id": "a", "question": "Compute $\\frac{1}{2} + \\frac{1}{3}$." + TAIL, "answer": "\\frac{5}{6}",
     "solution": "Use the common denominator 6: 3/6 + 2/6 = 5/6."},
    {"id": "b", "question": "A box holds 6 eggs. How many eggs are in 8 boxes?", "answer": "48",
     "solution": "8 boxes hold 8 * 6 = 48 eggs."},
    {"id": "c", "question": "What is the product of twelve and twelve?" + TAIL, "answer": "144",
     "solution": "Twelve times twelve is 12 * 12 = 144."},
]


def scripted(plans):
    """Planner returns plans[id-index]; solver boxes a fixed answer."""

    def respond(messages):
        if phase(messages) == "plan":
            for i, e in enumerate(EXAMPLES):
                if e["question"].split("$")[0][:20] in messages[1]["content"]:
                    return plans[i]
            raise AssertionError("planner prompt without a known problem")
        return "Working... \\boxed{1}"

    return respond


PLANS = ["<think>hmm, fractions</think>1. Find a common denominator.\n2. Add.",
         "1. Multiply boxes by eggs per box.",
         "<think>I would just multiply</think>1. Multiply the two numbers."]


def test_plan_solve_exact_prompts_with_gt():
    task = make_task("math")
    harness = make_harness("plan_solve", task, {"use_gt": True, "temperature": 0.7, "plan_max_tokens": 111,
                                                 "solve_max_tokens": 222})
    model = ScriptedModel(scripted(PLANS))
    results = harness.run(EXAMPLES, model)

    # Batching: one call per phase, in order, with the harness's own sampling settings.
    assert [len(c["batch"]) for c in model.calls] == [3, 3]
    assert [c["max_new_tokens"] for c in model.calls] == [111, 222]
    assert all(c["temperature"] == 0.7 and c["top_p"] == 0.95 and c["top_k"] == 20 for c in model.calls)

    plan_a = model.calls[0]["batch"][0]
    assert plan_a == [
        {"role": "system", "content": PLANNER_SYSTEM},
        {"role": "user", "content": (
            "Problem:\nCompute $\\frac{1}{2} + \\frac{1}{3}$.\n\n"
            "A worked reference solution (study it to see which approach works):\n"
            "Use the common denominator 6: 3/6 + 2/6 = 5/6.\n\n"
            "Turn the approach of the reference solution into a concise step-by-step plan."
        )},
    ]
    assert "Do not solve the problem" in PLANNER_SYSTEM
    solve_a = model.calls[1]["batch"][0]
    assert solve_a == [
        {"role": "system", "content": SOLVER_SYSTEM},
        {"role": "user", "content": (
            "Problem:\nCompute $\\frac{1}{2} + \\frac{1}{3}$.\n\n"
            "Plan:\n1. Find a common denominator.\n2. Add.\n\n"
            "Reference answer (use it only to check your result): \\frac{5}{6}\n\n"
            "Solve the problem by following the plan. Show your work and put the final answer in \\boxed{}."
        )},
    ]
    # The boxed-answer tail never reaches the planner; thinking never reaches the solver.
    for messages in model.calls[0]["batch"]:
        assert "boxed" not in messages[1]["content"] and "step by step" not in messages[1]["content"]
    for messages in model.calls[1]["batch"]:
        assert "<think>" not in messages[1]["content"] and "I would just multiply" not in messages[1]["content"]
    assert "Plan:\n1. Multiply the two numbers." in model.calls[1]["batch"][2][1]["content"]

    for i, r in enumerate(results):
        assert r.mode == "plan_solve"
        assert r.teacher_messages == model.calls[1]["batch"][i]
        assert r.final_response == "Working... \\boxed{1}"
        assert [t["name"] for t in r.trace] == ["plan", "solve"]
        assert r.trace[0] == {"name": "plan", "messages": model.calls[0]["batch"][i], "response": PLANS[i]}
        assert r.trace[1]["messages"] == r.teacher_messages
    json.dumps([r.trace for r in results])  # traces are plain JSON


def test_use_gt_off_leaks_nothing():
    harness = make_harness("plan_solve", make_task("math"), PlanSolveConfig(use_gt=False))
    model = ScriptedModel(scripted(["1. Think.", "1. Think.", "1. Think."]))
    results = harness.run(EXAMPLES, model)
    everything = json.dumps([c["batch"] for c in model.calls] + [r.teacher_messages for r in results])
    for e in EXAMPLES:
        assert e["solution"] not in everything
    for secret in ["5/6", "\\\\frac{5}{6}", "48 eggs", "144", "Reference", "reference"]:
        assert secret not in everything
    plan_b = model.calls[0]["batch"][1][1]["content"]
    assert plan_b == ("Problem:\nA box holds 6 eggs. How many eggs are in 8 boxes?\n\n"
                      "Write a concise step-by-step plan for solving this problem.")
    solve_b = model.calls[1]["batch"][1][1]["content"]
    assert solve_b == ("Problem:\nA box holds 6 eggs. How many eggs are in 8 boxes?\n\nPlan:\n1. Think.\n\n"
                       "Solve the problem by following the plan. Show your work and put the final answer in \\boxed{}.")


def test_empty_plan_falls_back_to_solve_only():
    plans = ["<think>only thinking, then cut</think>   ", "1. Multiply.", ""]
    for use_gt in (True, False):
        model = ScriptedModel(scripted(plans))
        results = make_harness("plan_solve", make_task("math"), {"use_gt": use_gt}).run(EXAMPLES, model)
        assert [r.mode for r in results] == ["solve_only", "plan_solve", "solve_only"]
        assert [len(c["batch"]) for c in model.calls] == [3, 3]  # fallbacks share the solve call
        solve_a = results[0].teacher_messages
        hint = "\n\nReference answer (use it only to check your result): \\frac{5}{6}" if use_gt else ""
        assert solve_a == [{"role": "system", "content": SOLVE_ONLY_SYSTEM},
                           {"role": "user", "content": "Compute $\\frac{1}{2} + \\frac{1}{3}$." + hint}]
        assert results[0].info["plan"] == ""


def test_generate_chat_must_answer_every_prompt():
    harness = make_harness("plan_solve", make_task("math"), {})
    with pytest.raises(HarnessError, match="2 responses for 3 prompts"):
        harness.run(EXAMPLES, lambda batch, **kw: ["x", "y"])
    with pytest.raises(HarnessError, match="expected str or None"):  # None: a prompt that did not fit
        harness.run(EXAMPLES, lambda batch, **kw: [b"x"] * len(batch))


def test_config_validation_and_configdict():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict({"use_gt": False, "top_k": 5})
    harness = make_harness("plan_solve", make_task("math"), cfg)
    assert harness.config.use_gt is False and harness.config.top_k == 5
    with pytest.raises(ValueError, match="use_gtt"):
        make_harness("plan_solve", make_task("math"), {"use_gtt": False})
    with pytest.raises(ValueError, match="unknown harness"):
        make_harness("tree_search", make_task("math"), {})
    assert make_harness(None, make_task("math")).name == "plan_solve"


def test_student_prompt_gets_boxed_tail_once():
    task = make_task("math")
    assert task.student_messages(EXAMPLES[1]) == [{"role": "user", "content": (
        "A box holds 6 eggs. How many eggs are in 8 boxes?\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}.")}]
    assert task.student_messages(EXAMPLES[0])[0]["content"] == EXAMPLES[0]["question"]


# ---------------------------------------------------------------- OPSD baseline


def test_opsd_teacher_context_without_calls():
    task = make_task("math")
    harness = make_harness("opsd", task, {})
    model = ScriptedModel(lambda m: "unused")
    no_solution = dict(EXAMPLES[1], solution="")
    results = harness.run([EXAMPLES[1], no_solution], model)
    assert model.calls == []
    assert results[0].mode == "opsd" and results[0].trace == [] and results[0].final_response == ""
    assert results[0].teacher_messages == [{"role": "user", "content": (
        "A box holds 6 eggs. How many eggs are in 8 boxes?\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}.\n\n"
        "Here is a reference solution to this problem:\n8 boxes hold 8 * 6 = 48 eggs.\n\n"
        "First make sure you understand the reference solution. Then solve the problem yourself, "
        "in your own words and your own way, without copying it.")}]
    assert results[1].mode == "opsd_answer_only"
    assert "Here is a reference answer to this problem:\n48" in results[1].teacher_messages[-1]["content"]


def test_opsd_generate_is_one_batched_call():
    harness = make_harness("opsd", make_task("math"), {"generate": True, "max_tokens": 64})
    model = ScriptedModel(lambda m: "\\boxed{48}")
    results = harness.run(EXAMPLES, model)
    assert len(model.calls) == 1 and len(model.calls[0]["batch"]) == 3 and model.calls[0]["max_new_tokens"] == 64
    assert all(r.final_response == "\\boxed{48}" and r.trace[0]["name"] == "solve" for r in results)
    assert results[2].teacher_messages == model.calls[0]["batch"][2]
