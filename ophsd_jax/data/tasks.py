"""Tasks: how to prompt the student, what the reference is, how to score.

A task is the only place that knows an example's schema. Harnesses and the
trainer go through it: `student_messages(example)` is the bare prompt,
`reward(response, example)` the score, and classification tasks add the
pieces the Draft–Verify harness needs (`label`, `case_text`,
`parse_labels`, `format_answer`, `describe_labels`, `language`).
"""

from __future__ import annotations

import re

from ophsd_jax.data.load_uspto import CLASS_NAMES
from ophsd_jax.data.parsing import last_boxed, parse_accusations, parse_reaction_class, strip_thinking
from ophsd_jax.data.math_check import answers_equal
from ophsd_jax.data.rewards import class_reward, math_reward, set_f1

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
BOXED_TAIL = "Please reason step by step, and put your final answer within \\boxed{}."


def _user(content: str, system: str = "") -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


class MathTask:
    """Free-form math with a \\boxed{} final answer, scored by answer equivalence."""

    is_classification = False
    default_harness = "plan_solve"

    def __init__(self, name: str = "math", boxed_tail: str = BOXED_TAIL, system_prompt: str = "",
                 last_number_fallback: bool = False):
        self.name = name
        self.boxed_tail = boxed_tail
        self.system_prompt = system_prompt
        # Small models rarely write \boxed{}: optionally score the last number instead.
        self.last_number_fallback = last_number_fallback

    def student_messages(self, example: dict) -> list[dict]:
        question = example["question"].strip()
        # The paper's data already ends with the \boxed{} request; others get ours.
        if "\\boxed" not in question and self.boxed_tail:
            question = f"{question}\n\n{self.boxed_tail}"
        return _user(question, self.system_prompt)

    def problem_text(self, example: dict) -> str:
        return example["question"].strip()

    def reference_answer(self, example: dict) -> str:
        return str(example["answer"])

    def reference_solution(self, example: dict) -> str:
        return example.get("solution") or ""

    def extract_answer(self, response: str) -> str | None:
        answer = last_boxed(strip_thinking(response))
        if answer is None and self.last_number_fallback:
            numbers = _NUMBER.findall(strip_thinking(response))
            answer = numbers[-1].replace(",", "") if numbers else None
        return answer

    def reward(self, response: str, example: dict) -> float:
        if self.last_number_fallback:
            return 1.0 if answers_equal(self.extract_answer(response), self.reference_answer(example)) else 0.0
        return math_reward(response, self.reference_answer(example))


class ClassificationTask:
    """Shared plumbing for label-prediction tasks used with Draft–Verify."""

    is_classification = True
    default_harness = "draft_verify"
    language = "en"
    default_instruction = ""
    embedder_options: dict = {}

    def __init__(self, name: str, instruction: str = ""):
        self.name = name
        self.instruction = instruction

    def instruction_for(self, example: dict) -> str:
        # An explicit task instruction wins; then the example's own; then ours.
        return self.instruction or example.get("instruction") or self.default_instruction

    def label(self, example: dict) -> list[str]:
        return list(example["labels"])

    def reference_answer(self, example: dict) -> str:
        return self.format_answer(self.label(example))

    def reference_solution(self, example: dict) -> str:
        return ""

    def extract_answer(self, response: str) -> str | None:
        labels = self.parse_labels(response)
        return None if labels is None else ";".join(labels)

    def problem_text(self, example: dict) -> str:
        return self.student_messages(example)[-1]["content"]


class AccusationTask(ClassificationTask):
    """LawBench 3-3: predict the accusations (罪名) from Chinese case facts; set-F1 reward."""

    language = "zh"
    # Measured on LawBench 3-3: character uni/bi-grams retrieve same-charge cases best.
    embedder_options = {"ngram_min": 1, "ngram_max": 2}
    default_instruction = (
        "请根据下面的案件事实，判断被告人所犯的罪名。只需写出罪名名称，多个罪名之间用分号隔开，"
        "并把答案写在[罪名]和<eoa>之间，例如：[罪名]盗窃;诈骗<eoa>。"
    )

    def __init__(self, name: str = "lawbench", instruction: str = ""):
        super().__init__(name, instruction)

    def student_messages(self, example: dict) -> list[dict]:
        return _user(f"{self.instruction_for(example)}\n{example['question'].strip()}")

    def case_text(self, example: dict) -> str:
        return example["fact"]

    def parse_labels(self, response: str) -> list[str] | None:
        return parse_accusations(response)

    def format_answer(self, labels: list[str]) -> str:
        return "[罪名]" + ";".join(labels) + "<eoa>"

    def describe_labels(self, labels: list[str]) -> str:
        # "、" appears inside accusation names (窝藏、包庇), so list them with "；".
        return "；".join(labels)

    def reward(self, response: str, example: dict) -> float:
        return set_f1(parse_accusations(response), self.label(example))


_ATOM_MAP = re.compile(r"\[([^\[\]:]+):\d+\]")


def strip_atom_maps(smiles: str) -> str:
    """`[CH3:1]C` -> `[CH3]C`: atom-map numbers are bookkeeping, not chemistry."""
    return _ATOM_MAP.sub(r"[\1]", smiles)


class ReactionClassTask(ClassificationTask):
    """USPTO-50K: predict the reaction class 1–10 from reaction SMILES; exact-match reward."""

    language = "en"
    # Measured on the Schneider set: 2-4 character n-grams of SMILES retrieve same-class reactions best.
    embedder_options = {"ngram_min": 2, "ngram_max": 4}
    default_instruction = (
        "You are an expert organic chemist. Classify the reaction below into one of these "
        "ten reaction types:\n"
        + "\n".join(f"{k}. {v}" for k, v in CLASS_NAMES.items())
        + "\nAnswer with the class number only, written between [class] and <eoa>, "
        "for example [class]3<eoa>."
    )

    def __init__(self, name: str = "uspto", instruction: str = "", strip_maps: bool = True,
                 tagged_only: bool = False):
        """`tagged_only`: only a `[class]N<eoa>` answer counts. Otherwise the last bare class
        number does too, which credits a small model that recites the class list and is cut
        off after "9." (SmolLM2-135M: a "24.6%" that is the share of class 9; docs/results.md)."""
        super().__init__(name, instruction)
        self.strip_maps = strip_maps
        self.tagged_only = tagged_only

    def case_text(self, example: dict) -> str:
        smiles = example["rxn_smiles"]
        return strip_atom_maps(smiles) if self.strip_maps else smiles

    def student_messages(self, example: dict) -> list[dict]:
        return _user(f"{self.instruction_for(example)}\n\nReaction SMILES: {self.case_text(example)}")

    def parse_labels(self, response: str) -> list[str] | None:
        pred = parse_reaction_class(response, len(CLASS_NAMES), self.tagged_only)
        return None if pred is None else [pred]

    def format_answer(self, labels: list[str]) -> str:
        return f"[class]{labels[0]}<eoa>"

    def describe_labels(self, labels: list[str]) -> str:
        return ", ".join(f"{x} ({CLASS_NAMES.get(int(x), 'unknown')})" for x in labels)

    def reward(self, response: str, example: dict) -> float:
        return class_reward(response, example["answer"], len(CLASS_NAMES), self.tagged_only)


TASKS = {
    "math": MathTask,
    "lawbench": AccusationTask,
    "uspto": ReactionClassTask,
}


def make_task(name: str, **kwargs):
    """Build a task by name (`math`, `lawbench`, `uspto`) with its keyword options."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    try:
        return TASKS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for task {name!r}: {e}") from None
