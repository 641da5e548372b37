"""Pulling answers out of model text: thinking blocks, \\boxed{}, label tags."""

from __future__ import annotations

import re

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S)
_BOXED = "\\boxed"


def strip_thinking(text: str) -> str:
    """Remove reasoning blocks and return the visible answer text.

    - closed `<think>...</think>` blocks are removed;
    - a `</think>` with no opening tag (chat templates that put `<think>` in
      the prompt) means everything before it was reasoning, so it is dropped;
    - an unclosed `<think>` (generation cut off mid-thought) loses only the
      tag: the partial reasoning is all the text there is, and keeping it is
      more useful to a downstream prompt than an empty string.
    """
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    text = text.replace("<think>", "")
    return text.strip()


def _braced_content(text: str, open_pos: int) -> str | None:
    """Content of the brace group starting at text[open_pos] == '{', or None if unbalanced."""
    depth = 0
    for j in range(open_pos, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : j]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (nested braces kept), else None.

    `\\boxed 5` (no braces, a TeX-legal form) is accepted for a single token.
    An unbalanced last box (truncated output) is ignored in favour of the
    previous complete one.
    """
    found = None
    pos = text.find(_BOXED)
    while pos != -1:
        after = pos + len(_BOXED)
        rest = text[after:]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            content = _braced_content(text, after + len(rest) - len(stripped))
            if content is not None:
                found = content.strip()
        elif rest[:1] == " ":
            m = re.match(r"\s+([^\s$]+)", rest)
            if m:
                found = m.group(1)
        pos = text.find(_BOXED, after)
    return found


_INSTRUCTION_HINT = re.compile(r"\\boxed|step[- ]by[- ]step", re.I)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?。])\s+|\n+")


def strip_boxed_instruction(question: str) -> str:
    """Drop trailing sentences that ask for step-by-step work or a \\boxed answer.

    Planners must outline, not solve; a question that ends by asking for a
    boxed answer pushes the model to solve it. Only trailing sentences are
    removed (a mention of \\boxed inside the problem itself stays), and a
    question that is nothing but such a sentence is returned unchanged.
    """
    text = question.strip()
    while True:
        starts = [0] + [m.end() for m in _SENTENCE_BREAK.finditer(text)]
        start = max(s for s in starts if s < len(text)) if text else 0
        if start == 0 or not _INSTRUCTION_HINT.search(text[start:]):
            return text
        text = text[:start].rstrip()


# Separators between accusations. Names contain "、" (e.g. 窝藏、包庇), so it is not one.
_ACCUSATION_SPLIT = re.compile(r"[;；,，]")
_ACCUSATION_TAG = re.compile(r"\[罪名\](.*?)(?:<eoa>|\n|$)", re.S)


def normalize_accusation(name: str) -> str:
    """Canonical accusation name: no spaces, no trailing 罪 (盗窃罪 == 盗窃)."""
    name = re.sub(r"\s+", "", name).strip("。.:：")
    if name.endswith("罪") and len(name) > 1:
        name = name[:-1]
    return name


def split_accusations(text: str) -> list[str]:
    """`盗窃;诈骗罪` -> ['盗窃', '诈骗'] (normalised, duplicates removed, order kept)."""
    out = []
    for part in _ACCUSATION_SPLIT.split(text):
        name = normalize_accusation(part)
        if name and name not in out:
            out.append(name)
    return out


def parse_accusations(text: str) -> list[str] | None:
    """Accusations from the last `[罪名]...<eoa>`; a `罪名:` line as fallback; else None."""
    visible = strip_thinking(text)
    matches = _ACCUSATION_TAG.findall(visible)
    if not matches:
        matches = re.findall(r"罪名\s*[:：]\s*([^\n]*)", visible)
    for candidate in reversed(matches):
        labels = split_accusations(candidate)
        if labels:
            return labels
    return None


_CLASS_TAG = re.compile(r"\[class\]\s*(\d+)\s*(?:<eoa>|$|\n)", re.I)
# A standalone 1..10: not part of a longer number, a decimal, a word or a percentage.
_BARE_CLASS = re.compile(r"(?<![\w.])(10|[1-9])(?![\w%]|\.\d)")


def parse_reaction_class(text: str, num_classes: int = 10, tagged_only: bool = False) -> str | None:
    """Class number from the last `[class]N<eoa>`; else (unless `tagged_only`) the last bare
    1..10 number.

    A tagged number outside 1..num_classes is treated as no answer (None):
    it is a wrong format, not a different class.
    """
    visible = strip_thinking(text)
    tagged = _CLASS_TAG.findall(visible)
    if tagged:
        value = int(tagged[-1])
        return str(value) if 1 <= value <= num_classes else None
    if tagged_only:
        return None
    bare = [int(m) for m in _BARE_CLASS.findall(visible)]
    bare = [b for b in bare if 1 <= b <= num_classes]
    return str(bare[-1]) if bare else None
