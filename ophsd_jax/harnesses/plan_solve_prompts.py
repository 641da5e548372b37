"""Prompts of the Plan–Solve harness (our wording of the paper's intent).

Planner: a tutor who outlines, never solves. Solver: an expert who follows
the plan and boxes the answer. Reference material appears only when the
caller passes it (the harness passes "" for everything when use_gt is off).
"""

from __future__ import annotations

PLANNER_SYSTEM = (
    "You are a thoughtful math tutor. Do not solve the problem and do not state its final answer. "
    "Write a short plan another student can follow: the key ideas or formulas that apply, the steps "
    "in the order to carry them out, and the mistakes to watch out for. Keep it brief, cover every "
    "step that matters, and do not re-check things you have already said."
)

SOLVER_SYSTEM = (
    "You are an expert mathematician. You are given a problem and a plan for solving it. "
    "Carry out the plan step by step, show your work, and give the final answer in \\boxed{}."
)

SOLVE_ONLY_SYSTEM = (
    "You are an expert mathematician. Solve the problem step by step, show your work, "
    "and give the final answer in \\boxed{}."
)


def plan_messages(problem: str, solution: str = "") -> list[dict]:
    if solution:
        user = (
            f"Problem:\n{problem}\n\n"
            f"A worked reference solution (study it to see which approach works):\n{solution}\n\n"
            "Turn the approach of the reference solution into a concise step-by-step plan."
        )
    else:
        user = f"Problem:\n{problem}\n\nWrite a concise step-by-step plan for solving this problem."
    return [{"role": "system", "content": PLANNER_SYSTEM}, {"role": "user", "content": user}]


def _answer_hint(answer: str) -> str:
    return f"\n\nReference answer (use it only to check your result): {answer}" if answer else ""


def solve_messages(problem: str, plan: str, answer: str = "") -> list[dict]:
    user = (
        f"Problem:\n{problem}\n\n"
        f"Plan:\n{plan}{_answer_hint(answer)}\n\n"
        "Solve the problem by following the plan. Show your work and put the final answer in \\boxed{}."
    )
    return [{"role": "system", "content": SOLVER_SYSTEM}, {"role": "user", "content": user}]


def solve_only_messages(problem: str, answer: str = "") -> list[dict]:
    user = f"{problem}{_answer_hint(answer)}"
    return [{"role": "system", "content": SOLVE_ONLY_SYSTEM}, {"role": "user", "content": user}]
