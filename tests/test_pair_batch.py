"""Paired teacher/student batches: alignment, buckets, prompt ids, over-long teacher contexts, skips, caps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ophsd_jax.distill.batch import SHORTENED_MARKER, Buckets, PairBatch, build_pair_batch
from ophsd_jax.distill.losses import divergence


class CharTokenizer:
    """Character ids with a tiny chat template: ``[role]content|...[assistant]``."""

    pad_token_id = 0

    def apply_chat_template(self, messages, add_generation_prompt=True):
        if not messages:
            return []
        text = "".join(f"[{m['role']}]{m['content']}|" for m in messages)
        if add_generation_prompt:
            text += "[assistant]"
        return [ord(c) for c in text]


TOK = CharTokenizer()


def user(text):
    return [{"role": "user", "content": text}]


def resp(text):
    return [ord(c) for c in text]


def _check_row(side, batch, row, prompt, response):
    """Row ``row`` of one side is exactly ``prompt + response``, right-padded, aligned."""
    n, r = len(prompt) + len(response), len(response)
    assert side.tokens[row, :n].tolist() == prompt + response
    assert np.all(side.tokens[row, n:] == TOK.pad_token_id)
    assert side.attn_mask[row].tolist() == [1] * n + [0] * (side.tokens.shape[1] - n)
    assert side.positions[row, :n].tolist() == list(range(n))
    idx = side.resp_index[row, :r]
    # The hidden state at resp_index predicts the next token: the response token.
    assert side.tokens[row, idx + 1].tolist() == response
    assert batch.resp_tokens[row, :r].tolist() == response
    assert batch.resp_mask[row].tolist() == [1.0] * r + [0.0] * (batch.resp_mask.shape[1] - r)
    assert idx[0] == len(prompt) - 1  # the first response token is predicted by the prompt's end


def test_alignment_both_sides_end_with_the_same_response():
    students = [user("2+2?"), user("name a colour"), user("hi")]
    teachers = [user("2+2? plan: add"), user("name a colour, hint: sky"), user("hi, be nice")]
    responses = [resp("4"), resp("blue, like the sky"), resp("hello!")]
    b = build_pair_batch(TOK, students, teachers, responses, buckets=[16, 32, 64, 128])
    assert b.meta.skipped == 0 and b.meta.kept == (0, 1, 2)
    for i in range(3):
        _check_row(b.student, b, i, TOK.apply_chat_template(students[i]), responses[i])
        _check_row(b.teacher, b, i, TOK.apply_chat_template(teachers[i]), responses[i])
    # Token by token, the two sides predict the same targets.
    m = b.resp_mask > 0
    s_next = np.take_along_axis(b.student.tokens, b.student.resp_index + 1, 1)
    t_next = np.take_along_axis(b.teacher.tokens, b.teacher.resp_index + 1, 1)
    np.testing.assert_array_equal(s_next[m], t_next[m])
    np.testing.assert_array_equal(s_next[m], b.resp_tokens[m])
    for arr in (b.student.tokens, b.student.positions, b.student.attn_mask, b.student.resp_index):
        assert arr.dtype == np.int32


def test_buckets_are_chosen_per_dimension():
    students = [user("ab")]
    teachers = [user("x" * 50)]
    responses = [resp("hello")]
    assert len(TOK.apply_chat_template(students[0])) == 20  # 18 template tokens + 2
    assert len(TOK.apply_chat_template(teachers[0])) == 68
    buckets = {"student": [16, 32, 64], "teacher": [32, 64, 128], "response": [4, 8, 16]}
    b = build_pair_batch(TOK, students, teachers, responses, buckets=buckets)
    assert b.student.tokens.shape == (1, 32)  # 20 + 5 = 25 -> 32
    assert b.teacher.tokens.shape == (1, 128)  # 68 + 5 = 73 -> 128
    assert b.resp_mask.shape == (1, 8) and b.student.resp_index.shape == (1, 8)
    assert b.teacher.resp_index.shape == (1, 8)
    # One list serves all three dimensions; the longest row decides.
    b = build_pair_batch(
        TOK, students * 2, [user("y"), user("y" * 20)], [resp("a"), resp("a" * 20)],
        buckets=[8, 32, 64, 128],
    )
    assert b.student.tokens.shape == (2, 64)  # 20 + 20 = 40
    assert b.teacher.tokens.shape == (2, 64)  # 38 + 20 = 58
    assert b.resp_mask.shape == (2, 32)
    assert b.meta.teacher_shortened == 0
    assert Buckets.make([32, 8]).student == (8, 32)


def test_over_long_teacher_context_is_skipped_never_cut():
    """Default policy: a teacher prompt + response over the largest teacher bucket is
    skipped and counted; no part of the prompt (system prompt, problem) is dropped."""
    teacher = [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "PROBLEM " + "CONTEXT " * 10}]
    tp_full = TOK.apply_chat_template(teacher)
    response = resp("final answer")
    buckets = {"student": [64], "teacher": [48], "response": [16]}
    assert len(tp_full) + len(response) > 48
    b = build_pair_batch(TOK, [user("q"), user("r")], [teacher, user("t")], [response, response], buckets=buckets)
    assert b.meta.kept == (1,) and b.meta.skip_reasons["teacher_too_long"] == 1
    assert b.meta.metrics()["batch/skipped_teacher_too_long"] == 1 and b.meta.teacher_shortened == 0
    _check_row(b.teacher, b, 0, TOK.apply_chat_template(user("t")), response)
    # "shorten" without material to shorten (e.g. a zero-shot prompt) skips the pair too.
    b = build_pair_batch(TOK, [user("q")], [teacher], [response], buckets=buckets, teacher_overflow="shorten",
                         teacher_material=[None])
    assert b.meta.num_valid == 0 and b.meta.skip_reasons["teacher_too_long"] == 1
    with pytest.raises(ValueError, match="teacher_overflow must be one of"):
        build_pair_batch(TOK, [user("q")], [teacher], [response], buckets=buckets, teacher_overflow="cut")


class Material:
    """A harness-style teacher context: fixed problem and instructions around two
    inserted pieces (say a plan and a reference solution)."""

    def __init__(self, texts):
        self.texts = texts

    @staticmethod
    def rebuild(texts):
        return [{"role": "system", "content": "SYSTEM"},
                {"role": "user", "content": f"PROBLEM: 2+2?\nPLAN: {texts[0]}\nREF: {texts[1]}\nSOLVE IT."}]


def test_shorten_cuts_only_the_harness_material_with_a_marker():
    plan, ref = "add the two numbers " * 6, "four"
    material = Material([plan, ref])
    teacher = material.rebuild(material.texts)
    response = resp("2+2=4")
    room = 100 - len(response)
    assert len(TOK.apply_chat_template(teacher)) > room
    buckets = {"student": [64], "teacher": [64, 100], "response": [16]}
    b = build_pair_batch(TOK, [user("2+2?")], [teacher], [response], buckets=buckets, teacher_overflow="shorten",
                         teacher_material=[material])
    assert b.meta.num_valid == 1 and b.meta.teacher_shortened == 1 and b.meta.skipped == 0
    n = int(b.teacher.attn_mask[0].sum()) - len(response)
    text = "".join(map(chr, b.teacher.tokens[0, :n]))
    # Independent reference: the longest prefix of the plan (+ marker) whose full prompt fits.
    fits = [c for c in range(len(plan)) if len(TOK.apply_chat_template(
        material.rebuild([plan[:c].rstrip() + SHORTENED_MARKER, ref]))) <= room]
    expected = material.rebuild([plan[:max(fits)].rstrip() + SHORTENED_MARKER, ref])
    assert text == "".join(map(chr, TOK.apply_chat_template(expected)))
    assert text.startswith("[system]SYSTEM|[user]PROBLEM: 2+2?\nPLAN: add the two")
    assert text.endswith(SHORTENED_MARKER + "\nREF: four\nSOLVE IT.|[assistant]")  # the short piece is whole
    _check_row(b.teacher, b, 0, TOK.apply_chat_template(expected), response)
    # When even the bare structure (every piece reduced to the marker) does not fit: skipped.
    b = build_pair_batch(TOK, [user("2+2?")], [teacher], [response], buckets={**buckets, "teacher": [60]},
                         teacher_overflow="shorten", teacher_material=[material])
    assert b.meta.num_valid == 0 and b.meta.skip_reasons["teacher_too_long"] == 1


class ThinkingTokenizer(CharTokenizer):
    """Character ids with a Qwen3-style template: `enable_thinking=False` adds an empty
    think block after the generation prompt."""

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        ids = super().apply_chat_template(messages, add_generation_prompt)
        if add_generation_prompt and kwargs.get("enable_thinking", True) is False:
            ids += [ord(c) for c in "<think>\n\n</think>\n\n"]
        return ids


def test_prompts_are_the_sampled_ids_or_rendered_with_the_template_kwargs():
    tok, kwargs = ThinkingTokenizer(), {"enable_thinking": False}
    students, teachers = [user("2+2?"), user("3+3?")], [user("2+2? plan"), user("3+3? plan")]
    responses = [resp("4"), resp("6")]
    # What the sampler conditioned on (e.g. from another renderer): used token for token.
    sampled_student = [tok.apply_chat_template(students[0], **kwargs), [7, 8, 9]]
    sampled_teacher = [None, tok.apply_chat_template(teachers[1], **kwargs)]
    b = build_pair_batch(tok, students, teachers, responses, buckets=[64], student_prompt_ids=sampled_student,
                         teacher_prompt_ids=sampled_teacher, template_kwargs=kwargs)
    for i in range(2):
        _check_row(b.student, b, i, sampled_student[i], responses[i])
    # A teacher context never sampled is rendered as the sampler renders: with the kwargs.
    _check_row(b.teacher, b, 0, tok.apply_chat_template(teachers[0], **kwargs), responses[0])
    _check_row(b.teacher, b, 1, sampled_teacher[1], responses[1])
    assert tok.apply_chat_template(teachers[0], **kwargs) != tok.apply_chat_template(teachers[0])
    with pytest.raises(ValueError, match="1 student_prompt_ids"):
        build_pair_batch(tok, students, teachers, responses, buckets=[64], student_prompt_ids=sampled_student[:1])


def test_unbuildable_pairs_are_skipped_and_counted():
    buckets = {"student": [32], "teacher": [40], "response": [24]}
    ok = (user("a"), user("b"), resp("fine"))
    cases = [
        ok,
        (user("a"), user("b"), []),  # empty_response
        (user("a"), user("b"), resp("r" * 25)),  # response_too_long
        (user("a" * 20), user("b"), resp("abc")),  # student_too_long: 40 + 3 > 32
        (user("a"), user("b"), resp("r" * 24)),  # student_too_long: 21 + 24 > 32
        ([], user("b"), resp("x")),  # empty_student_prompt
        (user("a"), [], resp("x")),  # empty_teacher_prompt
        (user("b"), user("c"), resp("still fine")),
    ]
    b = build_pair_batch(TOK, *zip(*cases), buckets=buckets)
    assert b.meta.kept == (0, 7)
    assert b.meta.skipped == 6
    reasons = b.meta.skip_reasons
    assert reasons["empty_response"] == 1 and reasons["response_too_long"] == 1
    assert reasons["student_too_long"] == 2
    assert reasons["empty_student_prompt"] == 1 and reasons["empty_teacher_prompt"] == 1
    assert b.meta.metrics()["batch/skipped"] == 6
    # Rows stay aligned with their own examples after the skips.
    for row, i in enumerate(b.meta.kept):
        s, t, y = cases[i]
        _check_row(b.student, b, row, TOK.apply_chat_template(s), y)
        _check_row(b.teacher, b, row, TOK.apply_chat_template(t), y)
    # A response that leaves no room for a teacher prompt token.
    b = build_pair_batch(TOK, [user("a")], [user("b")], [resp("r" * 10)],
                         buckets={"student": [64], "teacher": [10], "response": [16]})
    assert b.meta.skip_reasons["teacher_no_room"] == 1 and b.meta.num_valid == 0


def test_response_cap():
    response = resp("a long response here")
    b = build_pair_batch(TOK, [user("q"), user("r")], [user("t"), user("u")],
                         [response, resp("ok")], buckets=[4, 8, 32], max_response_tokens=6)
    assert b.meta.response_capped == 1
    assert b.resp_mask.sum(-1).tolist() == [6.0, 2.0]
    assert b.resp_mask.shape == (2, 8)
    _check_row(b.student, b, 0, TOK.apply_chat_template(user("q")), response[:6])
    _check_row(b.teacher, b, 0, TOK.apply_chat_template(user("t")), response[:6])


def test_batch_padding_with_dummy_rows_and_pytree():
    b = build_pair_batch(TOK, [user("q"), user("r")], [user("t"), user("u")],
                         [resp("abc"), resp("de")], buckets=[8, 32], batch_size=4)
    assert b.student.tokens.shape == (4, 32) and b.resp_mask.shape == (4, 8)
    assert b.row_mask.tolist() == [1, 1, 0, 0]
    assert np.all(b.resp_mask[2:] == 0)
    # Dummy rows attend to exactly one pad token, so no attention row is empty.
    assert b.student.attn_mask[2:].sum(-1).tolist() == [1, 1]
    assert b.teacher.attn_mask[2:].sum(-1).tolist() == [1, 1]
    assert len(jax.tree.leaves(b)) == 11
    total = jax.jit(lambda x: x.resp_mask.sum() + x.teacher.attn_mask.sum())(b)
    assert float(total) == 5 + (19 + 3) + (19 + 2) + 2  # masks: 3+2 resp, prompts 19 each
    moved = jax.tree.map(jnp.asarray, b)
    assert isinstance(moved, PairBatch) and moved.meta is None
    with pytest.raises(ValueError, match="batch_size"):
        build_pair_batch(TOK, [user("q")] * 3, [user("t")] * 3, [resp("a")] * 3,
                         buckets=[32], batch_size=2)
    with pytest.raises(ValueError, match="responses"):
        build_pair_batch(TOK, [user("q")], [user("t")] * 2, [resp("a")], buckets=[32])


def test_gathered_hidden_states_feed_the_loss():
    """End to end with a toy "model" whose hidden state depends only on the input token.

    Both chat templates end with the same generation prompt and both sides
    hold the same response, so correctly gathered hidden states are identical
    and every divergence is exactly 0, while the full sequences differ.
    """
    students = [user("short"), user("another one")]
    teachers = [user("a much longer teacher context"), user("ctx")]
    responses = [resp("answer A"), resp("B")]
    b = build_pair_batch(TOK, students, teachers, responses, buckets=[16, 64], batch_size=3)
    emb = jax.random.normal(jax.random.key(0), (128, 8))
    w = jax.random.normal(jax.random.key(1), (8, 128))

    def gather(side):
        hidden = emb[side.tokens]  # [B, L, D]
        return jnp.take_along_axis(hidden, jnp.asarray(side.resp_index)[..., None], axis=1)

    hs, ht = gather(b.student), gather(b.teacher)
    loss, aux = divergence(hs, ht, w, jnp.asarray(b.resp_mask), tile=8)
    assert float(loss) == 0.0 and float(aux["tokens"]) == 9.0
    # A one-position misalignment on one side would not be zero.
    shifted = jnp.take_along_axis(emb[b.teacher.tokens],
                                  jnp.asarray(b.teacher.resp_index + 1)[..., None], axis=1)
    assert float(divergence(hs, shifted, w, jnp.asarray(b.resp_mask), tile=8)[0]) > 0.01
