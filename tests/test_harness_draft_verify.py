"""Draft–Verify against a scripted fake model: modes, retrieved neighbours in prompts, batching, state."""

import pathlib

import numpy as np
import pytest

from ophsd_jax.data.load_lawbench import load_lawbench
from ophsd_jax.data.load_uspto import load_uspto_csv
from ophsd_jax.data.tasks import make_task
from ophsd_jax.harnesses import DraftVerifyHarness, MemoryBank, make_harness
from ophsd_jax.harnesses.draft_verify_prompts import TEXT

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CONFIG = {"cold_start_threshold": 10, "draft_k": 3, "confirm_k": 2, "challenge_k": 2,
          "draft_max_tokens": 33, "verify_max_tokens": 44}


class ScriptedModel:
    def __init__(self, respond):
        self.respond = respond
        self.calls = []

    def __call__(self, batch, *, temperature, top_p, top_k, max_new_tokens):
        self.calls.append({"batch": batch, "max_new_tokens": max_new_tokens})
        return [self.respond(m) for m in batch]


@pytest.fixture
def law():
    examples, _ = load_lawbench(FIXTURES / "lawbench_small.json")
    return examples


def brute_force(harness, query_example, k, same=None, other=None):
    """Reference neighbours: cosine over every bank entry, filtered, sorted by (-score, index)."""
    task, bank = harness.task, harness.bank
    q = bank.embedder.embed([task.case_text(query_example)])[0].astype(np.float64)
    rows = []
    for i in range(len(bank)):
        labels = set(bank.labels[i])
        if bank.ids[i] == query_example["id"]:
            continue
        if same is not None and not labels & set(same):
            continue
        if other is not None and labels & set(other):
            continue
        rows.append((-float(bank.embeddings[i].astype(np.float64) @ q), i))
    return [i for _, i in sorted(rows)[:k]]


def section(text, start, end=None):
    tail = text.split(start, 1)[1]
    return tail.split(end, 1)[0] if end else tail


def test_cold_start_below_threshold(law):
    task = make_task("lawbench")
    harness = make_harness("draft_verify", task, CONFIG, train_examples=law)
    harness.observe(law[:9])  # 9 < 10
    model = ScriptedModel(lambda m: "[罪名]盗窃<eoa>")
    results = harness.run(law[9:12], model)
    assert len(model.calls) == 1 and model.calls[0]["max_new_tokens"] == 33
    for e, r, sent in zip(law[9:12], results, model.calls[0]["batch"]):
        assert r.mode == "cold_start"
        assert sent == task.student_messages(e) == r.teacher_messages
        assert r.trace == [{"name": "cold_start", "messages": sent, "response": "[罪名]盗窃<eoa>"}]


def test_draft_and_verify_prompts_contain_the_right_neighbours(law):
    task = make_task("lawbench")
    harness = make_harness("draft_verify", task, CONFIG, train_examples=law)
    harness.observe(law[:11])
    queries = [law[11], law[12], law[13]]
    drafts = {law[11]["id"]: "分析……[罪名]抢劫<eoa>", law[12]["id"]: "我无法判断。",
              law[13]["id"]: "[罪名]盗窃;诈骗<eoa>"}

    def respond(messages):
        system = messages[0]["content"]
        if system == TEXT["zh"]["draft_system"]:
            for e in queries:
                if e["fact"] in messages[1]["content"]:
                    return drafts[e["id"]]
        return "[罪名]盗窃<eoa>"

    model = ScriptedModel(respond)
    results = harness.run(queries, model)

    # One batched call per phase: 3 drafts, then 2 verifications (one draft is unparseable).
    assert [len(c["batch"]) for c in model.calls] == [3, 2]
    assert [c["max_new_tokens"] for c in model.calls] == [33, 44]
    assert [r.mode for r in results] == ["full", "draft_only", "full"]

    for e, draft_msgs in zip(queries, model.calls[0]["batch"]):
        user = draft_msgs[1]["content"]
        assert draft_msgs[0] == {"role": "system", "content": TEXT["zh"]["draft_system"]}
        assert user.startswith(TEXT["zh"]["draft_intro"])
        assert user.endswith(task.student_messages(e)[-1]["content"])  # the task, with its format instruction
        expected = brute_force(harness, e, 3)
        blocks = [f"案例{n}\n事实：{harness.bank.texts[i]}\n罪名：{'；'.join(harness.bank.labels[i])}"
                  for n, i in enumerate(expected, start=1)]
        assert "\n\n".join(blocks) in user
        assert "案例4" not in user

    # draft_only: teacher context is the draft call.
    assert results[1].teacher_messages == model.calls[0]["batch"][1]
    assert results[1].final_response == "我无法判断。"
    assert [t["name"] for t in results[1].trace] == ["draft"]

    for r, e, draft_labels, verify_msgs in zip([results[0], results[2]], [queries[0], queries[2]],
                                               [["抢劫"], ["盗窃", "诈骗"]], model.calls[1]["batch"]):
        user = verify_msgs[1]["content"]
        assert r.teacher_messages == verify_msgs and r.final_response == "[罪名]盗窃<eoa>"
        assert [t["name"] for t in r.trace] == ["draft", "verify"]
        assert r.info["draft_labels"] == draft_labels
        assert user.startswith(f"你对下面这起案件初步认定的罪名是：{'；'.join(draft_labels)}。")
        assert e["fact"] in user
        confirm = section(user, TEXT["zh"]["confirm_intro"], TEXT["zh"]["challenge_intro"])
        challenge = section(user, TEXT["zh"]["challenge_intro"])
        same = brute_force(harness, e, 2, same=draft_labels)
        other = brute_force(harness, e, 2, other=draft_labels)
        assert r.info["confirm_ids"] == [harness.bank.ids[i] for i in same]
        assert r.info["challenge_ids"] == [harness.bank.ids[i] for i in other]
        for i in same:
            assert harness.bank.texts[i] in confirm and set(harness.bank.labels[i]) & set(draft_labels)
        for i in other:
            assert harness.bank.texts[i] in challenge and not set(harness.bank.labels[i]) & set(draft_labels)
    # 抢劫 is in the bank once (the knife robbery), so the confirm section for it is exactly that case.
    robbery = [i for i in range(len(harness.bank)) if "抢劫" in harness.bank.labels[i]]
    assert results[0].info["confirm_ids"] == [harness.bank.ids[i] for i in robbery]


def test_query_never_retrieves_itself(law):
    harness = make_harness("draft_verify", make_task("lawbench"), CONFIG, train_examples=law)
    harness.observe(law)  # a later epoch: every query is already in the bank
    results = harness.run(law[:4], ScriptedModel(lambda m: "[罪名]盗窃<eoa>"))
    for e, r in zip(law[:4], results):
        seen = r.info["draft_ids"] + r.info["confirm_ids"] + r.info["challenge_ids"]
        assert e["id"] not in seen and len(r.info["draft_ids"]) == 3


def test_empty_confirm_section_is_stated(law):
    harness = make_harness("draft_verify", make_task("lawbench"), CONFIG, train_examples=law)
    harness.observe(law[:11])
    results = harness.run([law[12]], ScriptedModel(lambda m: "[罪名]走私<eoa>"))
    user = results[0].teacher_messages[1]["content"]
    assert TEXT["zh"]["confirm_none"] in user and results[0].info["confirm_ids"] == []


def test_observe_uses_true_labels_and_state_roundtrip(law):
    task = make_task("lawbench")
    harness = make_harness("draft_verify", task, CONFIG, train_examples=law)
    harness.observe(law[:12])
    assert len(harness.bank) == 12 and list(harness.bank.labels[10]) == ["盗窃", "诈骗"]
    assert harness.bank.ids == [e["id"] for e in law[:12]]
    model_a, model_b = ScriptedModel(lambda m: "[罪名]盗窃<eoa>"), ScriptedModel(lambda m: "[罪名]盗窃<eoa>")
    restored = DraftVerifyHarness(task, CONFIG, bank=MemoryBank(harness.bank.embedder))
    restored.load_state_dict(harness.state_dict())
    a = harness.run(law[12:], model_a)
    b = restored.run(law[12:], model_b)
    assert model_a.calls == model_b.calls and [r.teacher_messages for r in a] == [r.teacher_messages for r in b]


def test_seed_bank_and_fitting_requirements(law):
    task = make_task("lawbench")
    seeded = make_harness("draft_verify", task, dict(CONFIG, seed_bank_from_train=True), train_examples=law[:12])
    assert len(seeded.bank) == 12
    with pytest.raises(ValueError, match="train_examples"):
        make_harness("draft_verify", task, CONFIG)
    with pytest.raises(ValueError, match="classification task"):
        make_harness("draft_verify", make_task("math"), CONFIG, train_examples=law)
    assert make_harness(None, task, CONFIG, train_examples=law).name == "draft_verify"


def test_long_neighbour_texts_are_clipped(law):
    long_law = [dict(e, fact=e["fact"] * 30) for e in law]
    harness = make_harness("draft_verify", make_task("lawbench"), dict(CONFIG, max_example_chars=50),
                           train_examples=long_law)
    harness.observe(long_law[:11])
    results = harness.run([long_law[12]], ScriptedModel(lambda m: "?"))
    user = results[0].teacher_messages[1]["content"]
    neighbour = user.split("案例1\n事实：", 1)[1].split("\n", 1)[0]
    assert len(neighbour) == 51 and neighbour.endswith("…")


def test_uspto_english_prompts():
    examples, _ = load_uspto_csv(FIXTURES / "uspto_small.csv")
    task = make_task("uspto")
    harness = make_harness("draft_verify", task, dict(CONFIG, cold_start_threshold=5), train_examples=examples)
    harness.observe(examples[:10])
    query = examples[13]  # bromination, class 10

    model = ScriptedModel(lambda m: "[class]3<eoa>" if m[0]["content"] == TEXT["en"]["draft_system"] else "[class]10<eoa>")
    (result,) = harness.run([query], model)
    assert result.mode == "full"
    draft_user = model.calls[0]["batch"][0][1]["content"]
    assert "Reaction SMILES: c1ccccc1.BrBr>>Brc1ccccc1" in draft_user
    assert "Answer with the class number only" in draft_user
    user = result.teacher_messages[1]["content"]
    assert user.startswith("Your draft classification of the reaction below is class 3 (C-C bond formation).")
    confirm = section(user, TEXT["en"]["confirm_intro"], TEXT["en"]["challenge_intro"])
    challenge = section(user, TEXT["en"]["challenge_intro"])
    assert confirm.count("Class: 3 (C-C bond formation)") == 2  # both class-3 reactions in the bank
    assert "Class: 3" not in challenge and challenge.count("Example ") == 2
    # The whole verify prompt, literally, with neighbours from brute-force search.
    names = {"1": "heteroatom alkylation and arylation", "2": "acylation and related processes",
             "3": "C-C bond formation", "5": "protections", "6": "deprotections", "7": "reductions",
             "8": "oxidations", "9": "functional group interconversion (FGI)"}

    def block(indices):
        return "\n\n".join(
            f"Example {n}\nReaction: {harness.bank.texts[i]}\n"
            f"Class: {harness.bank.labels[i][0]} ({names[harness.bank.labels[i][0]]})"
            for n, i in enumerate(indices, start=1)
        )

    expected = (
        "Your draft classification of the reaction below is class 3 (C-C bond formation).\n\n"
        + task.student_messages(query)[0]["content"] + "\n\n"
        "Similar reactions that have the same class as your draft:\n\n"
        + block(brute_force(harness, query, 2, same=["3"])) + "\n\n"
        "Similar reactions that have a different class:\n\n"
        + block(brute_force(harness, query, 2, other=["3"])) + "\n\n"
        "Compare the reaction with the supporting and the contrasting examples above. Keep your draft "
        "if it is right; otherwise correct it. Give the final answer in the format the task asks for."
    )
    assert user == expected
    assert result.teacher_messages[0] == {"role": "system", "content": (
        "You are an expert organic chemist reviewing a draft reaction classification.")}
    # Atom maps are stripped from everything the model sees.
    assert ":1]" not in draft_user + user
    assert result.final_response == "[class]10<eoa>" and task.reward(result.final_response, query) == 1.0


@pytest.mark.slow
def test_minilm_embedder_option_needs_no_fitting(law):
    harness = make_harness("draft_verify", make_task("lawbench"), dict(CONFIG, embedder="minilm"))
    harness.observe(law[:11])
    assert harness.bank.embeddings.shape == (11, 384)
    results = harness.run([law[12]], ScriptedModel(lambda m: "[罪名]诈骗<eoa>"))
    assert results[0].mode == "full"


def test_every_phase_calls_the_model_even_with_nothing_to_ask(law):
    """Multi-process rule: generate_chat is collective, so a phase is called even with no
    prompts (no parseable draft here; no examples at all on a process with no share)."""
    harness = make_harness("draft_verify", make_task("lawbench"), CONFIG, train_examples=law)
    harness.observe(law[:11])
    model = ScriptedModel(lambda m: "?")
    results = harness.run(law[11:13], model)
    assert [r.mode for r in results] == ["draft_only", "draft_only"]
    assert [len(c["batch"]) for c in model.calls] == [2, 0]
    model = ScriptedModel(lambda m: "?")
    assert harness.run([], model) == [] and [len(c["batch"]) for c in model.calls] == [0, 0]
