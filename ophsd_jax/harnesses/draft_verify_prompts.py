"""Prompts of the Draft–Verify harness, in Chinese (LawBench) and English (USPTO).

The task supplies the pieces: the student's prompt text (which already
carries the answer-format instruction), how a neighbour's labels read
(`describe_labels`) and how an answer is written (`format_answer`). Here we
only arrange them. Neighbour texts are clipped to `max_chars` so fifteen
long case descriptions cannot crowd out the case being judged.
"""

from __future__ import annotations

TEXT = {
    "zh": {
        "draft_system": "你是一名经验丰富的刑事法官，擅长根据案件事实准确认定罪名。",
        "verify_system": "你是一名经验丰富的刑事法官，正在复核一份初步的罪名认定。",
        "neighbour": "案例{n}\n事实：{text}\n罪名：{labels}",
        "draft_intro": "下面是几件与本案相似、已经作出认定的案例，供你参考：",
        "draft_task": "请参考上述案例，完成下面的任务。",
        "verify_intro": "你对下面这起案件初步认定的罪名是：{labels}。",
        "confirm_intro": "以下相似案例的罪名与你的初步认定相同：",
        "confirm_none": "（记忆库中没有与初步认定罪名相同的相似案例。）",
        "challenge_intro": "以下相似案例的罪名与你的初步认定不同：",
        "challenge_none": "（记忆库中没有罪名不同的相似案例。）",
        "verify_task": (
            "请对照上面支持和反对初步认定的案例，重新审视本案事实：如果初步认定正确，就保持不变；"
            "如果有误或有遗漏，就加以修正。最后按照题目要求的格式给出最终答案。"
        ),
    },
    "en": {
        "draft_system": "You are an expert organic chemist who classifies reactions by type.",
        "verify_system": "You are an expert organic chemist reviewing a draft reaction classification.",
        "neighbour": "Example {n}\nReaction: {text}\nClass: {labels}",
        "draft_intro": "Here are labelled reactions similar to the one you need to classify, for reference:",
        "draft_task": "Using these examples as a guide, complete the task below.",
        "verify_intro": "Your draft classification of the reaction below is class {labels}.",
        "confirm_intro": "Similar reactions that have the same class as your draft:",
        "confirm_none": "(No stored similar reaction has the draft class.)",
        "challenge_intro": "Similar reactions that have a different class:",
        "challenge_none": "(No stored similar reaction has a different class.)",
        "verify_task": (
            "Compare the reaction with the supporting and the contrasting examples above. Keep your draft "
            "if it is right; otherwise correct it. Give the final answer in the format the task asks for."
        ),
    },
}


def clip(text: str, max_chars: int | None) -> str:
    text = text.strip()
    if max_chars and len(text) > max_chars:
        return text[:max_chars].rstrip() + "…"
    return text


def neighbour_block(task, hits, max_chars: int | None) -> str:
    t = TEXT[task.language]
    return "\n\n".join(
        t["neighbour"].format(n=n, text=clip(h.text, max_chars), labels=task.describe_labels(list(h.labels)))
        for n, h in enumerate(hits, start=1)
    )


def draft_messages(task, example: dict, hits, max_chars: int | None) -> list[dict]:
    t = TEXT[task.language]
    student = task.student_messages(example)[-1]["content"]
    parts = [t["draft_intro"], neighbour_block(task, hits, max_chars), t["draft_task"], student]
    return [
        {"role": "system", "content": t["draft_system"]},
        {"role": "user", "content": "\n\n".join(p for p in parts if p)},
    ]


def verify_messages(task, example: dict, draft_labels, confirm_hits, challenge_hits, max_chars) -> list[dict]:
    t = TEXT[task.language]
    student = task.student_messages(example)[-1]["content"]
    confirm = neighbour_block(task, confirm_hits, max_chars) or t["confirm_none"]
    challenge = neighbour_block(task, challenge_hits, max_chars) or t["challenge_none"]
    parts = [
        t["verify_intro"].format(labels=task.describe_labels(list(draft_labels))),
        student,
        t["confirm_intro"] + "\n\n" + confirm,
        t["challenge_intro"] + "\n\n" + challenge,
        t["verify_task"],
    ]
    return [
        {"role": "system", "content": t["verify_system"]},
        {"role": "user", "content": "\n\n".join(parts)},
    ]
