"""Hand tables for every parser and reward: the expected values are written by hand."""

import threading

import pytest

from ophsd_jax.data.math_check import answers_equal, normalize_answer
from ophsd_jax.data.parsing import (
    last_boxed,
    parse_accusations,
    parse_reaction_class,
    strip_boxed_instruction,
    strip_thinking,
)
from ophsd_jax.data.rewards import accusation_reward, class_reward, math_reward, set_f1
from ophsd_jax.data.tasks import make_task

BOXED_CASES = [
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{ x^{2} + 1 }", "x^{2} + 1"),
    ("final: \\boxed 7", "7"),
    ("\\boxed{3} and a cut-off \\boxed{\\frac{1}{", "3"),
    ("no box here", None),
    ("\\boxed{}", ""),
]


@pytest.mark.parametrize("text,expected", BOXED_CASES)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


THINK_CASES = [
    ("<think>try 5</think>The plan.", "The plan."),
    ("<think>a</think>x<think>b</think>y", "xy"),
    ("reasoning in the prompt's open block</think>\nPlan here", "Plan here"),
    ("<think>cut off mid-thought", "cut off mid-thought"),
    ("<think>only thinking</think>", ""),
    ("plain", "plain"),
]


@pytest.mark.parametrize("text,expected", THINK_CASES)
def test_strip_thinking(text, expected):
    assert strip_thinking(text) == expected


STRIP_TAIL_CASES = [
    ("What is 2+2? Please reason step by step, and put your final answer within \\boxed{}.", "What is 2+2?"),
    ("Compute 3.5 + 1.\nLet's think step by step and output the final answer within \\boxed{}.", "Compute 3.5 + 1."),
    ("Solve x+1=2. Put your final answer in \\boxed{}.", "Solve x+1=2."),
    ("Find the sum of 1 and 2.", "Find the sum of 1 and 2."),
    # Only the boxed instruction: nothing else to keep, so keep it all.
    ("Put your final answer in \\boxed{}.", "Put your final answer in \\boxed{}."),
]


@pytest.mark.parametrize("text,expected", STRIP_TAIL_CASES)
def test_strip_boxed_instruction(text, expected):
    assert strip_boxed_instruction(text) == expected


MATH_EQUAL_CASES = [
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\dfrac{3}{4}", "\\frac34", True),
    ("10\\text{ cm}", "10", True),
    ("10 \\mathrm{cm}", "10", True),
    ("\\$18", "18", True),
    ("90^\\circ", "90", True),
    ("1,000", "1000", True),
    ("1+x^2", "x^2+1", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\{2,1\\}", "\\{1,2\\}", True),
    ("5\\sqrt{2}", "\\sqrt{50}", True),
    ("3", "4", False),
    ("\\frac{1}{3}", "0.3", False),
    ("", "1", False),
    (None, "1", False),
]


@pytest.mark.parametrize("pred,gold,expected", MATH_EQUAL_CASES)
def test_answers_equal(pred, gold, expected):
    assert answers_equal(pred, gold) is expected


NORMALIZE_CASES = [
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("12 dollars", "12"),
    ("2.50", "2.5"),
    ("3.0", "3"),
    ("1,234,567", "1234567"),
    ("\\dfrac{a}{b}", "\\frac{a}{b}"),
    ("$7$.", "7"),
]


@pytest.mark.parametrize("text,expected", NORMALIZE_CASES)
def test_normalize_answer_fallback(text, expected):
    assert normalize_answer(text) == expected


def test_string_fallback_when_math_verify_cannot_parse(monkeypatch):
    import ophsd_jax.data.math_check as mc

    def broken(pred, gold):
        raise RuntimeError("parser crashed")

    monkeypatch.setattr(mc, "_math_verify_equal", broken)
    assert mc.answers_equal("12 dollars", "12")
    assert not mc.answers_equal("13", "12")


MATH_REWARD_CASES = [
    ("So we get \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("<think>maybe \\boxed{3}</think>Answer: \\boxed{4}", "4", 1.0),
    ("<think>\\boxed{4}</think>Answer: \\boxed{3}", "4", 0.0),
    ("The answer is 4.", "4", 0.0),  # no \boxed{}: no answer
    ("\\boxed{\\boxed{72}}", "72", 1.0),
    ("\\boxed{72 \\text{ apples}}", "72", 1.0),
]


@pytest.mark.parametrize("response,gold,expected", MATH_REWARD_CASES)
def test_math_reward(response, gold, expected):
    assert math_reward(response, gold) == expected


def test_math_reward_off_main_thread():
    # math-verify's signal-based timeout cannot run off the main thread; we must still score.
    out = []
    t = threading.Thread(target=lambda: out.append(math_reward("\\boxed{\\dfrac{1}{2}}", "0.5")))
    t.start()
    t.join()
    assert out == [1.0]


ACCUSATION_PARSE_CASES = [
    ("[罪名]盗窃<eoa>", ["盗窃"]),
    ("[罪名]盗窃;诈骗<eoa>", ["盗窃", "诈骗"]),
    ("[罪名]盗窃罪；诈骗罪<eoa>", ["盗窃", "诈骗"]),
    ("[罪名]窝藏、包庇<eoa>", ["窝藏、包庇"]),
    ("[罪名]盗窃;盗窃<eoa>", ["盗窃"]),
    ("先想想[罪名]抢劫<eoa>，不对，应为[罪名]抢夺<eoa>", ["抢夺"]),
    ("<think>[罪名]抢劫<eoa></think>[罪名]盗窃<eoa>", ["盗窃"]),
    ("[罪名]故意伤害", ["故意伤害"]),
    ("罪名：危险驾驶", ["危险驾驶"]),
    ("[罪名]<eoa>", None),
    ("我无法判断", None),
]


@pytest.mark.parametrize("text,expected", ACCUSATION_PARSE_CASES)
def test_parse_accusations(text, expected):
    assert parse_accusations(text) == expected


F1_CASES = [
    (["盗窃"], ["盗窃"], 1.0),
    (["盗窃", "诈骗"], ["盗窃"], 2 * 1 / 3),
    (["盗窃"], ["盗窃", "诈骗"], 2 * 1 / 3),
    (["抢劫"], ["盗窃"], 0.0),
    ([], ["盗窃"], 0.0),  # empty prediction
    (None, ["盗窃"], 0.0),  # unparseable
    (["盗窃", "盗窃", "盗窃"], ["盗窃"], 1.0),  # duplicates count once
    (["盗窃", "盗窃", "抢劫"], ["盗窃", "诈骗"], 0.5),
    (["盗窃罪"], ["盗窃"], 1.0),
    ([], [], 1.0),
]


@pytest.mark.parametrize("pred,gold,expected", F1_CASES)
def test_set_f1(pred, gold, expected):
    assert set_f1(pred, gold) == pytest.approx(expected)


def test_accusation_reward_end_to_end():
    assert accusation_reward("[罪名]盗窃;抢劫<eoa>", ["盗窃", "诈骗"]) == pytest.approx(0.5)
    assert accusation_reward("不知道", ["盗窃"]) == 0.0


CLASS_CASES = [
    ("[class]3<eoa>", "3"),
    ("[class] 10 <eoa>", "10"),
    ("[class]2<eoa> hmm, actually [class]7<eoa>", "7"),
    ("[class]11<eoa>", None),  # tagged but not a class
    ("[class]0<eoa>", None),
    ("I think it is class 6.", "6"),  # bare-number fallback
    ("Between 2 and 9, I pick 9", "9"),  # last bare number
    ("Yield was 85%", None),
    ("<think>[class]4<eoa></think>[class]5<eoa>", "5"),
    ("no idea", None),
]


@pytest.mark.parametrize("text,expected", CLASS_CASES)
def test_parse_reaction_class(text, expected):
    assert parse_reaction_class(text) == expected


@pytest.mark.parametrize(
    "response,gold,expected",
    [("[class]3<eoa>", "3", 1.0), ("[class]4<eoa>", "3", 0.0), ("[class]13<eoa>", "3", 0.0), ("3", "3", 1.0)],
)
def test_class_reward(response, gold, expected):
    assert class_reward(response, gold) == expected


def test_uspto_tagged_only_scores_only_tagged_answers():
    """The base SmolLM2 recites the class list and is cut off after "9. ...": the bare-number
    fallback reads that as class 9; with `tagged_only` it is no answer."""
    recital = "1. heteroatom alkylation and arylation\n2. acylation and related processes\n9. functional group ("
    ex = {"id": "u", "rxn_smiles": "C>>C", "labels": ["9"], "answer": "9", "class": 9}
    lenient, strict = make_task("uspto"), make_task("uspto", tagged_only=True)
    assert lenient.reward(recital, ex) == 1.0 and lenient.extract_answer(recital) == "9"
    assert strict.reward(recital, ex) == 0.0 and strict.extract_answer(recital) is None
    for text, expected in CLASS_CASES:  # tagged answers are read as before
        tagged = "[class]" in text and expected is not None
        assert strict.extract_answer(text) == (expected if tagged else None), text


def test_task_rewards_and_extraction():
    math = make_task("math")
    ex = {"id": "m", "question": "1/2?", "answer": "\\frac{1}{2}", "solution": ""}
    assert math.reward("\\boxed{0.5}", ex) == 1.0
    assert math.extract_answer("<think>x</think>\\boxed{0.5}") == "0.5"
    law = make_task("lawbench")
    ex = {"id": "l", "question": "事实:…", "fact": "…", "labels": ["盗窃", "诈骗"], "answer": "盗窃;诈骗"}
    assert law.reward("[罪名]诈骗;盗窃<eoa>", ex) == 1.0
    assert law.extract_answer("[罪名]诈骗;盗窃<eoa>") == "诈骗;盗窃"
    assert law.extract_answer("?") is None
    uspto = make_task("uspto")
    ex = {"id": "u", "rxn_smiles": "C>>C", "labels": ["3"], "answer": "3", "class": 3}
    assert uspto.reward("[class]3<eoa>", ex) == 1.0
    assert uspto.extract_answer("[class]3<eoa>") == "3"
    assert uspto.label(ex) == ["3"]


def test_classification_student_prompts():
    law = make_task("lawbench")
    ex = {"id": "l", "instruction": "请判断罪名。", "question": "事实:甲盗窃手机。\n", "fact": "甲盗窃手机。",
          "labels": ["盗窃"], "answer": "盗窃"}
    assert law.student_messages(ex) == [{"role": "user", "content": "请判断罪名。\n事实:甲盗窃手机。"}]
    no_instruction = dict(ex, instruction="")
    assert law.student_messages(no_instruction)[0]["content"].startswith("请根据下面的案件事实，判断被告人所犯的罪名。")
    assert make_task("lawbench", instruction="只写罪名。").student_messages(ex)[0]["content"] == "只写罪名。\n事实:甲盗窃手机。"
    uspto = make_task("uspto")
    ex = {"id": "u", "rxn_smiles": "[CH3:1][Br:2].[OH:3]C>>[CH3:1][O:3]C", "labels": ["1"], "answer": "1"}
    content = uspto.student_messages(ex)[0]["content"]
    assert content.endswith("\n\nReaction SMILES: [CH3][Br].[OH]C>>[CH3][O]C")
    assert "10. functional group addition (FGA)" in content and "[class]3<eoa>" in content
    assert make_task("uspto", strip_maps=False).case_text(ex) == ex["rxn_smiles"]
    with pytest.raises(ValueError, match="unknown task"):
        make_task("chess")
    with pytest.raises(ValueError, match="bad options"):
        make_task("math", boxed=True)


def test_math_last_number_fallback_is_opt_in():
    from ophsd_jax.data.tasks import make_task

    example = {"question": "2+3?", "answer": "5"}
    plain, lenient = make_task("math"), make_task("math", last_number_fallback=True)
    text = "2 + 3 = 5. So the result is 5"
    assert plain.reward(text, example) == 0.0 and plain.extract_answer(text) is None
    assert lenient.reward(text, example) == 1.0 and lenient.extract_answer(text) == "5"
    assert lenient.reward("It is 1,234", {"answer": "1234"}) == 1.0
    assert lenient.reward("\\boxed{4} though 5 appears later", example) == 0.0  # boxed wins when present
    assert lenient.reward("no digits here", example) == 0.0
