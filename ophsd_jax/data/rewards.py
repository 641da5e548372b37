"""Rewards: math answer equivalence, accusation set-F1, reaction-class exact match.

Each reward takes the model's full response text and the reference, so the
parsing rules (last \\boxed{}, [罪名]…<eoa>, [class]N<eoa>) live in one place.
"""

from __future__ import annotations

from ophsd_jax.data.math_check import answers_equal
from ophsd_jax.data.parsing import (
    last_boxed,
    normalize_accusation,
    parse_accusations,
    parse_reaction_class,
    strip_thinking,
)


def math_reward(response: str, gold_answer: str) -> float:
    """1.0 when the last \\boxed{} answer equals the reference, else 0.0."""
    pred = last_boxed(strip_thinking(response))
    return 1.0 if answers_equal(pred, gold_answer) else 0.0


def set_f1(pred: list[str] | None, gold: list[str]) -> float:
    """F1 between label sets; duplicates count once; no prediction scores 0.

    Both empty is a perfect (if degenerate) match and scores 1.
    """
    p = {normalize_accusation(x) for x in (pred or [])} - {""}
    g = {normalize_accusation(x) for x in gold} - {""}
    if not p and not g:
        return 1.0
    if not p or not g:
        return 0.0
    return 2.0 * len(p & g) / (len(p) + len(g))


def accusation_reward(response: str, gold_labels: list[str]) -> float:
    return set_f1(parse_accusations(response), gold_labels)


def class_reward(response: str, gold_class: str, num_classes: int = 10, tagged_only: bool = False) -> float:
    pred = parse_reaction_class(response, num_classes, tagged_only)
    return 1.0 if pred is not None and pred == str(gold_class).strip() else 0.0
