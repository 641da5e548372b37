"""The teacher context as the distill step sees it: the harnesses report the token ids
their last call was sampled after and their inserted material; the training loop scores
the response after exactly the ids the sampler conditioned on (Qwen3-style template with
enable_thinking); an over-long context is shortened in the harness material only."""

import json
import pathlib

import pytest

from ophsd_jax.data.load_lawbench import load_lawbench
from ophsd_jax.data.tasks import make_task
from ophsd_jax.distill.batch import SHORTENED_MARKER, build_pair_batch
from ophsd_jax.harnesses import make_harness
from ophsd_jax.harnesses.draft_verify_prompts import TEXT
from ophsd_jax.harnesses.plan_solve_prompts import PLANNER_SYSTEM, SOLVER_SYSTEM

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MATH = [{"id": "a", "question": "What is 12 times 12?", "answer": "144", "solution": "12 * 12 = 144."},
        {"id": "b", "question": "What is 7 plus 8?", "answer": "15", "solution": "7 + 8 = 15."}]


def fake_ids(messages):
    """A stand-in renderer: distinct ids for distinct message lists."""
    return [ord(c) % 251 + 3 for c in json.dumps(messages, ensure_ascii=False)]


class Reply:
    """What the sampler's generate_chat returns: texts and the prompt ids they followed."""

    def __init__(self, texts, prompt_tokens):
        self.texts, self.prompt_tokens = texts, prompt_tokens


class FakeModel:
    def __init__(self, respond, with_ids=True):
        self.respond, self.with_ids, self.calls = respond, with_ids, []

    def __call__(self, batch, *, temperature, top_p, top_k, max_new_tokens):
        self.calls.append(batch)
        texts = [self.respond(m) for m in batch]
        return Reply(texts, [fake_ids(m) for m in batch]) if self.with_ids else texts


def check_result(r, last_call_messages, material_texts):
    assert r.teacher_messages == last_call_messages
    assert r.teacher_prompt_ids == fake_ids(last_call_messages)
    if material_texts is None:
        assert r.teacher_material is None
    else:
        assert r.teacher_material.texts == material_texts
        assert r.teacher_material.rebuild(list(material_texts)) == r.teacher_messages


def test_plan_solve_and_opsd_report_prompt_ids_and_material():
    task = make_task("math")
    plans = {"a": "1. Multiply twelve by twelve.", "b": ""}  # b: empty plan, solve_only

    def respond(m):
        if m[0]["content"] == PLANNER_SYSTEM:
            return plans["a"] if "12 times" in m[1]["content"] else plans["b"]
        return "\\boxed{1}"

    model = FakeModel(respond)
    results = make_harness("plan_solve", task, {"use_gt": True}).run(MATH, model)
    assert [r.mode for r in results] == ["plan_solve", "solve_only"]
    check_result(results[0], model.calls[1][0], [plans["a"]])
    assert results[0].teacher_messages[0]["content"] == SOLVER_SYSTEM
    check_result(results[1], model.calls[1][1], None)  # no plan: nothing inserted to shorten

    # A model that does not report prompt ids (a list of texts): None, rendered later.
    results = make_harness("plan_solve", task, {"use_gt": True}).run(MATH, FakeModel(respond, with_ids=False))
    assert [r.teacher_prompt_ids for r in results] == [None, None]

    # OPSD: never sampled without `generate` (no ids); the reference solution is the material.
    results = make_harness("opsd", task).run(MATH, FakeModel(respond))
    for r, e in zip(results, MATH):
        assert r.teacher_prompt_ids is None and r.teacher_material.texts == [e["solution"]]
        assert r.teacher_material.rebuild([e["solution"]]) == r.teacher_messages
    model = FakeModel(respond)
    results = make_harness("opsd", task, {"generate": True}).run(MATH, model)
    for i, e in enumerate(MATH):
        check_result(results[i], model.calls[0][i], [e["solution"]])


def test_draft_verify_reports_prompt_ids_and_neighbours_as_material():
    law, _ = load_lawbench(FIXTURES / "lawbench_small.json")
    task = make_task("lawbench")
    config = {"cold_start_threshold": 10, "draft_k": 3, "confirm_k": 2, "challenge_k": 2, "max_example_chars": 50}
    harness = make_harness("draft_verify", task, config, train_examples=law)
    model = FakeModel(lambda m: "[罪名]盗窃<eoa>")
    cold = harness.run(law[:2], model)
    for i, r in enumerate(cold):
        check_result(r, model.calls[0][i], None)  # the student's own prompt

    harness.observe(law[:11])
    queries = law[11:13]
    model = FakeModel(lambda m: "我无法判断。" if queries[1]["fact"] in m[1]["content"] else "[罪名]盗窃<eoa>")
    results = harness.run(queries, model)
    assert [r.mode for r in results] == ["full", "draft_only"]
    bank_text = dict(zip(harness.bank.ids, harness.bank.texts))

    def clipped(ids):
        return [t[:50].rstrip() + "…" if len(t) > 50 else t for t in (bank_text[i].strip() for i in ids)]

    info = results[0].info
    check_result(results[0], model.calls[1][0], clipped(info["confirm_ids"] + info["challenge_ids"]))
    check_result(results[1], model.calls[0][1], clipped(results[1].info["draft_ids"]))
    assert results[0].teacher_messages[0]["content"] == TEXT["zh"]["verify_system"]


class CharTokenizer:
    pad_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}|" for m in messages) + ("<assistant>" if add_generation_prompt else "")
        return [ord(c) for c in text]


def decode(ids):
    return "".join(map(chr, ids))


def test_over_long_harness_contexts_are_shortened_in_their_material_only():
    tok = CharTokenizer()
    task = make_task("math")
    long_plan = "1. Write twelve as ten plus two and multiply each part. " * 8

    def respond(m):
        return long_plan if m[0]["content"] == PLANNER_SYSTEM else "\\boxed{144}"

    results = make_harness("plan_solve", task, {"use_gt": True}).run(MATH[:1], FakeModel(respond, with_ids=False))
    full = decode(tok.apply_chat_template(results[0].teacher_messages))
    response = [ord(c) for c in "12*12 = 144"]
    buckets = {"student": [128], "teacher": [len(full) - 100], "response": [16]}
    students = [task.student_messages(MATH[0])]

    b = build_pair_batch(tok, students, [r.teacher_messages for r in results], [response], buckets=buckets)
    assert b.meta.num_valid == 0 and b.meta.skip_reasons["teacher_too_long"] == 1  # default: skip

    b = build_pair_batch(tok, students, [r.teacher_messages for r in results], [response], buckets=buckets,
                         teacher_overflow="shorten", teacher_material=[r.teacher_material for r in results])
    assert b.meta.num_valid == 1 and b.meta.teacher_shortened == 1
    n = int(b.teacher.attn_mask[0].sum())
    assert n <= buckets["teacher"][0] and decode(b.teacher.tokens[0, n - len(response):n]) == decode(response)
    text = decode(b.teacher.tokens[0, :n - len(response)])
    # Everything but the plan is intact: system prompt, problem, answer hint, instruction, template.
    head, tail = full.split("Plan:\n", 1)[0], full.split(long_plan.strip(), 1)[1]
    kept_plan = text[len(head) + len("Plan:\n"):len(text) - len(tail)]
    assert text.startswith(head + "Plan:\n") and text.endswith(tail)
    assert SOLVER_SYSTEM in head and MATH[0]["question"] in head and "144" in tail
    assert kept_plan.endswith(SHORTENED_MARKER) and long_plan.startswith(kept_plan[:-len(SHORTENED_MARKER)])
    assert len(kept_plan) > 0.5 * len(long_plan) - 100


# ---- the training loop, with a Qwen3-style chat template ---------------------------------

# Modelled on Qwen3's template: with enable_thinking=False the generation prompt is
# followed by an empty think block.
QWEN3_STYLE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def qwen3_style_tokenizer(tmp_path_factory):
    from ophsd_jax.models.bundled import load_bundled_tokenizer
    from ophsd_jax.models.tokenizer import Tokenizer

    base = load_bundled_tokenizer()
    tok = Tokenizer(base.tok, QWEN3_STYLE, eos_token=base.eos_token, pad_token=base.pad_token)
    path = tmp_path_factory.mktemp("qwen3_style_tokenizer")
    tok.save(str(path))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("reward_fraction", [1.0, 0.125])
def test_training_scores_the_response_after_the_sampled_prompt_ids(qwen3_style_tokenizer, tmp_path, monkeypatch,
                                                                   reward_fraction):
    """One step of the real loop: the pair batch's student prompt is the rollout's prompt,
    token for token, and its teacher prompt the harness's solve call's prompt. With
    harness.reward_fraction=0.125 only the first of 8 rows is solved (the final answer
    only feeds the harness reward); the others' teacher prompts are the solve messages
    rendered as the sampler renders them."""
    import importlib.util

    from ophsd_jax import sampling, train
    from ophsd_jax.models.tokenizer import Tokenizer
    from ophsd_jax.run import Run

    spec = importlib.util.spec_from_file_location("tiny", pathlib.Path(__file__).parents[1] / "configs" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()
    c.model.tokenizer = qwen3_style_tokenizer
    assert c.model.chat_template_kwargs.enable_thinking is False  # the default
    c.train.steps, c.train.batch_size, c.train.eval_before = 1, 8, False  # 8 rows: one per test device
    c.harness.reward_fraction = reward_fraction

    made, batches, teacher_msgs = [], [], []

    class Recording(sampling.GenerateChat):  # the step's generation: rollout joined with the harness calls
        def __init__(self, *args, **kw):
            super().__init__(*args, record=[], **kw)
            made.append(self)

    def pair_batch(*args, **kw):
        teacher_msgs.append(args[2])
        batches.append(build_pair_batch(*args, **kw))
        return batches[-1]

    monkeypatch.setattr(train, "GenerateChat", Recording)
    monkeypatch.setattr(train, "build_pair_batch", pair_batch)
    monkeypatch.setattr(Run, "evaluate", lambda self, step: {})
    train.train(c, str(tmp_path))

    (gen,), (batch,), (teacher_msgs,) = made, batches, teacher_msgs
    out, (plan_call, solve_call) = gen.joined(), gen.record  # harness: plan (with the rollout), then solve
    assert len(plan_call.texts) == 8 and len(solve_call.texts) == (8 if reward_fraction == 1 else 1)
    tok = Tokenizer.from_dir(qwen3_style_tokenizer)
    think = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert batch.meta.num_valid == 8
    for row, i in enumerate(batch.meta.kept):
        rendered = tok.apply_chat_template(teacher_msgs[i], add_generation_prompt=True, enable_thinking=False)
        teacher = solve_call.prompt_tokens[i] if i < len(solve_call.texts) else rendered
        assert list(teacher) == list(rendered) and SOLVER_SYSTEM in tok.decode(teacher)
        for side, prompt in ((batch.student, out.prompt_tokens[i]), (batch.teacher, teacher)):
            assert tok.decode(prompt, skip_special_tokens=False).endswith(think)  # the kwargs were in effect
            n = len(prompt)
            assert side.tokens[row, :n].tolist() == list(prompt)
            assert side.resp_index[row, 0] == n - 1  # the first response token follows it
            assert side.tokens[row, n:n + int(batch.resp_mask[row].sum())].tolist() == out.tokens[i]
