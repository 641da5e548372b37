"""The teacher context as the distill step sees it: the harnesses report the token ids
their last call was sampled after; the training loop scores the response after exactly
the ids the sampler conditioned on (Qwen3-style template with enable_thinking)."""

import json
import pathlib

import pytest

from ophsd_jax.data.load_lawbench import load_lawbench
from ophsd_jax.data.tasks import make_task
from ophsd_jax.distill.batch import build_pair_batch
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


def check_result(r, last_call_messages):
    assert r.teacher_messages == last_call_messages
    assert r.teacher_prompt_ids == fake_ids(last_call_messages)


def test_plan_solve_and_opsd_report_prompt_ids():
    task = make_task("math")
    plans = {"a": "1. Multiply twelve by twelve.", "b": ""}  # b: empty plan, solve_only

    def respond(m):
        if m[0]["content"] == PLANNER_SYSTEM:
            return plans["a"] if "12 times" in m[1]["content"] else plans["b"]
        return "\\boxed{1}"

    model = FakeModel(respond)
    results = make_harness("plan_solve", task, {"use_gt": True}).run(MATH, model)
    assert [r.mode for r in results] == ["plan_solve", "solve_only"]
    check_result(results[0], model.calls[1][0])
    assert results[0].teacher_messages[0]["content"] == SOLVER_SYSTEM
    check_result(results[1], model.calls[1][1])

    # A model that does not report prompt ids (a list of texts): None, rendered later.
    results = make_harness("plan_solve", task, {"use_gt": True}).run(MATH, FakeModel(respond, with_ids=False))
    assert [r.teacher_prompt_ids for r in results] == [None, None]

    # OPSD: never sampled without `generate` (no ids).
    results = make_harness("opsd", task).run(MATH, FakeModel(respond))
    assert [r.teacher_prompt_ids for r in results] == [None, None]
    model = FakeModel(respond)
    results = make_harness("opsd", task, {"generate": True}).run(MATH, model)
    for i in range(len(MATH)):
        check_result(results[i], model.calls[0][i])


def test_draft_verify_reports_prompt_ids():
    law, _ = load_lawbench(FIXTURES / "lawbench_small.json")
    task = make_task("lawbench")
    config = {"cold_start_threshold": 10, "draft_k": 3, "confirm_k": 2, "challenge_k": 2, "max_example_chars": 50}
    harness = make_harness("draft_verify", task, config, train_examples=law)
    model = FakeModel(lambda m: "[罪名]盗窃<eoa>")
    cold = harness.run(law[:2], model)
    for i, r in enumerate(cold):
        check_result(r, model.calls[0][i])  # the student's own prompt

    harness.observe(law[:11])
    queries = law[11:13]
    model = FakeModel(lambda m: "我无法判断。" if queries[1]["fact"] in m[1]["content"] else "[罪名]盗窃<eoa>")
    results = harness.run(queries, model)
    assert [r.mode for r in results] == ["full", "draft_only"]
    check_result(results[0], model.calls[1][0])
    check_result(results[1], model.calls[0][1])
    assert results[0].teacher_messages[0]["content"] == TEXT["zh"]["verify_system"]


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
def test_training_scores_the_response_after_the_sampled_prompt_ids(qwen3_style_tokenizer, tmp_path, monkeypatch):
    """One step of the real loop: the pair batch's student prompt is the rollout's prompt,
    token for token, and its teacher prompt the harness's solve call's prompt."""
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

    rollouts, harness_calls, batches = [], [], []

    def rollout(*args, **kw):
        rollouts.append(sampling.generate_chat_tokens(*args, **kw))
        return rollouts[-1]

    def generate_chat(*args, **kw):
        harness_calls.clear()  # this step's calls only
        return sampling.make_generate_chat(*args, record=harness_calls, **kw)

    def pair_batch(*args, **kw):
        batches.append(build_pair_batch(*args, **kw))
        return batches[-1]

    monkeypatch.setattr(train, "generate_chat_tokens", rollout)
    monkeypatch.setattr(train, "make_generate_chat", generate_chat)
    monkeypatch.setattr(train, "build_pair_batch", pair_batch)
    monkeypatch.setattr(Run, "evaluate", lambda self, step: {})
    train.train(c, str(tmp_path))

    (out,), (batch,), (_, solve_call) = rollouts, batches, harness_calls  # harness: plan, then solve
    tok = Tokenizer.from_dir(qwen3_style_tokenizer)
    think = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert batch.meta.num_valid == 8
    for row, i in enumerate(batch.meta.kept):
        assert SOLVER_SYSTEM in tok.decode(solve_call.prompt_tokens[i])
        for side, prompt in ((batch.student, out.prompt_tokens[i]), (batch.teacher, solve_call.prompt_tokens[i])):
            assert tok.decode(prompt, skip_special_tokens=False).endswith(think)  # the kwargs were in effect
            n = len(prompt)
            assert side.tokens[row, :n].tolist() == list(prompt)
            assert side.resp_index[row, 0] == n - 1  # the first response token follows it
            assert side.tokens[row, n:n + int(batch.resp_mask[row].sum())].tolist() == out.tokens[i]
