"""Are two math answers equal? `math-verify` first, a normalising string compare second.

`math-verify` parses LaTeX / plain expressions into sympy and compares them
symbolically (1/2 == 0.5, \\dfrac == \\frac, units and \\text dropped).
It can fail on unusual text (it returns no parse, or raises); then we fall
back to comparing normalised strings, which catches formatting-only
differences (spaces, `\\left`, `\\!`, thousands separators, a trailing
unit word) without claiming anything symbolic.
"""

from __future__ import annotations

import logging
import re
import threading

logger = logging.getLogger(__name__)

# math-verify's timeouts use signal.alarm, which only works on the main thread.
_TIMEOUT_S = 5


def _timeout() -> int | None:
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _math_verify_equal(pred: str, gold: str) -> bool:
    from math_verify import parse, verify  # lazy: pulls sympy + antlr

    timeout = _timeout()
    # Wrapping both in \boxed{} makes extraction unambiguous for bare answers.
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


_LATEX_NOISE = (
    r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", "$", r"\displaystyle",
)
_UNIT_WORDS = re.compile(
    r"\s*(?:dollars?|cents?|units?|cm|mm|km|m|kg|g|hours?|minutes?|seconds?|degrees?|"
    r"meters?|inches?|feet|foot|miles?|pounds?|percent|%)\s*$",
    re.I,
)


def normalize_answer(text: str) -> str:
    """A canonical string for formatting-insensitive comparison."""
    s = text.strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\mathrm\{\s*([^{}]*)\}", r"\1", s)
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\%", "%")
    for noise in _LATEX_NOISE:
        s = s.replace(noise, "")
    s = s.replace("\\$", "")
    s = _UNIT_WORDS.sub("", s)
    # Thousands separators: 1,000,000 -> 1000000 (only in well-formed groups).
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    # Plain numbers compare by value: 2.50 == 2.5, 3.0 == 3.
    if re.fullmatch(r"[-+]?\d+(?:\.\d+)?", s):
        value = float(s)
        s = str(int(value)) if value.is_integer() else repr(value)
    return s


def answers_equal(pred: str | None, gold: str) -> bool:
    """True when `pred` and `gold` are the same mathematical answer."""
    if pred is None or not pred.strip() or not gold.strip():
        return False
    try:
        if _math_verify_equal(pred, gold):
            return True
    except Exception as e:  # math-verify raising is a parse failure, not a wrong answer
        logger.debug("math-verify failed on %r vs %r: %s", pred, gold, e)
    return normalize_answer(pred) == normalize_answer(gold)
