"""LawBench 3-3 / CAIL accusation-prediction loader.

Accepted schemas (JSON list or JSONL):
- LawBench 3-3: `{instruction, question, answer}` with `answer` = `罪名:盗窃;诈骗`;
- the paper's CAIL data: the same plus `fact`, `accusations` (list), `label_str`.

Normalised example: `{"id", "instruction", "question", "fact", "answer",
"labels", "solution", "source"}`; `answer` is the `;`-joined label string,
`labels` the accusation list, `fact` the case facts used for retrieval.
"""

from __future__ import annotations

import re

from ophsd_jax.data.errors import LoadReport
from ophsd_jax.data.parsing import split_accusations
from ophsd_jax.data.records import Row, collect, example_id, read_json_or_jsonl

_ANSWER_PREFIX = re.compile(r"^\s*罪名\s*[:：]")
_FACT_PREFIX = re.compile(r"^\s*事实\s*[:：]\s*")


def _labels(row: Row) -> list[str]:
    if row.has("accusations"):
        labels = []
        for name in row.text_list("accusations"):
            labels += [x for x in split_accusations(name) if x not in labels]
        return labels
    answer = row.text("answer")
    if not _ANSWER_PREFIX.match(answer):
        raise row.error("answer", f"expected '罪名:<accusation>[;<accusation>...]', got {answer!r:.60}")
    labels = split_accusations(_ANSWER_PREFIX.sub("", answer))
    if not labels:
        raise row.error("answer", "no accusation after '罪名:'")
    return labels


def parse_lawbench_row(row: Row) -> dict:
    question = row.text("question").strip()
    fact = row.text("fact").strip() if row.has("fact") else _FACT_PREFIX.sub("", question).strip()
    if not fact:
        raise row.error("question", "no case facts after '事实:'")
    labels = _labels(row)
    return {
        "id": example_id(row),
        "instruction": row.optional_text("instruction").strip(),
        "question": question,
        "fact": fact,
        "answer": ";".join(labels),
        "labels": labels,
        "solution": "",
        "source": "lawbench",
    }


def load_lawbench(path, *, on_error: str = "raise") -> tuple[list[dict], LoadReport]:
    return collect(path, on_error, read_json_or_jsonl, parse_lawbench_row)
