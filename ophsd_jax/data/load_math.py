"""Math loaders: the paper's `{question, answer, solution}` JSON and GSM8K JSONL.

Both produce normalised example dicts:
`{"id", "question", "answer", "solution", "source"}` (solution may be "").
"""

from __future__ import annotations

import re

from ophsd_jax.data.errors import LoadReport
from ophsd_jax.data.records import Row, collect, example_id, read_json_or_jsonl


def load_math_json(path, *, on_error: str = "raise") -> tuple[list[dict], LoadReport]:
    """The paper's schema: `question`, `answer` required; `solution` optional."""

    def parse(row: Row) -> dict:
        return {
            "id": example_id(row),
            "question": row.text("question").strip(),
            "answer": row.answer_text("answer"),
            "solution": row.optional_text("solution").strip(),
            "source": "math_json",
        }

    return collect(path, on_error, read_json_or_jsonl, parse)


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def split_gsm8k_answer(answer: str) -> tuple[str, str] | None:
    """GSM8K `answer` field -> (worked solution, final answer), or None if no `####`."""
    if "####" not in answer:
        return None
    solution, final = answer.rsplit("####", 1)
    # Calculator annotations (<<48/2=24>>) are tool-use markup, not reasoning.
    solution = _CALCULATOR.sub("", solution).strip()
    # GSM8K finals are integers, some written with thousands separators.
    final = re.sub(r"(?<=\d),(?=\d{3})", "", final.strip())
    return solution, final


def load_gsm8k_jsonl(path, *, on_error: str = "raise") -> tuple[list[dict], LoadReport]:
    """GSM8K: `{question, answer}` where `answer` ends with `#### <final answer>`."""

    def parse(row: Row) -> dict:
        question = row.text("question").strip()
        split = split_gsm8k_answer(row.text("answer"))
        if split is None or not split[1]:
            raise row.error("answer", "no '#### <final answer>' at the end of the worked solution")
        solution, final = split
        return {
            "id": example_id(row),
            "question": question,
            "answer": final,
            "solution": solution,
            "source": "gsm8k",
        }

    return collect(path, on_error, read_json_or_jsonl, parse)
