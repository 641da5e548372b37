"""OPSD baseline: the teacher sees the problem plus the reference solution.

The teacher context is the student's prompt with the reference solution
and an instruction to understand it and then solve the problem in its own
words. It needs no model call to build; `generate=True` also samples a
response under that context (for evaluating the privileged teacher).
Examples without a worked solution fall back to the reference answer
(mode `opsd_answer_only`).
"""

from __future__ import annotations

import dataclasses

from ophsd_jax.harnesses.base import (HarnessResult, SamplingConfig, TeacherMaterial, call_model, config_from,
                                     final_mask, prompt_ids_at, skipped_result, trace_entry)


@dataclasses.dataclass
class OPSDConfig(SamplingConfig):
    generate: bool = False
    max_tokens: int = 4096


def opsd_messages(student_messages: list[dict], reference: str, answer_only: bool) -> list[dict]:
    what = "reference answer" if answer_only else "reference solution"
    problem = student_messages[-1]["content"]
    user = (
        f"{problem}\n\n"
        f"Here is a {what} to this problem:\n{reference}\n\n"
        f"First make sure you understand the {what}. Then solve the problem yourself, "
        "in your own words and your own way, without copying it."
    )
    return list(student_messages[:-1]) + [{"role": "user", "content": user}]


class OPSDHarness:
    name = "opsd"

    def __init__(self, task, config=None):
        self.task = task
        self.config = config_from(OPSDConfig, config)

    def run(self, examples: list[dict], generate_chat, final: list[bool] | None = None) -> list[HarnessResult]:
        final = final_mask(final, len(examples))
        contexts, modes, materials = [], [], []
        for e in examples:
            solution = self.task.reference_solution(e)
            answer_only = not solution.strip()
            reference = self.task.reference_answer(e) if answer_only else solution
            student = self.task.student_messages(e)
            contexts.append(opsd_messages(student, reference, answer_only))
            modes.append("opsd_answer_only" if answer_only else "opsd")
            materials.append(TeacherMaterial(
                [reference], lambda t, s=student, a=answer_only: opsd_messages(s, t[0], a)))
        # Without `generate` the teacher context is never sampled: no prompt ids; with it,
        # only the examples in `final` are.
        responses, ids = [""] * len(examples), [None] * len(examples)
        if self.config.generate:
            sampled = [i for i in range(len(examples)) if final[i]]
            replies = call_model(generate_chat, self.name, "solve", [contexts[i] for i in sampled], self.config,
                                 self.config.max_tokens)
            responses = [None] * len(examples)
            for k, i in enumerate(sampled):
                responses[i], ids[i] = replies.texts[k], prompt_ids_at(replies, k)
        return [
            skipped_result("solve", ctx, [trace_entry("solve", ctx, resp)]) if f and resp is None  # did not fit
            else HarnessResult(
                teacher_messages=ctx,
                final_response=resp,
                mode=mode,
                trace=[trace_entry("solve", ctx, resp)] if self.config.generate else [],
                teacher_prompt_ids=i,
                teacher_material=material,
            )
            for ctx, resp, i, f, mode, material in zip(contexts, responses, ids, final, modes, materials)
        ]

    def observe(self, examples: list[dict]) -> None:
        """Stateless."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
