"""Plan–Solve harness for math: a planner call, then a solver call.

1. Plan: the problem (its trailing "\\boxed{}" instruction removed, so the
   planner outlines instead of solving) and, with `use_gt`, the reference
   solution. Thinking blocks are stripped from the plan.
2. Solve: problem + plan (+ the reference answer, for checking only, with
   `use_gt`). Its messages are the teacher context. An empty plan falls back
   to a plain solve prompt (mode `solve_only`).

`use_gt=False` drops the reference answer and solution before any prompt is
built, so nothing from the references can reach the model.
"""

from __future__ import annotations

import dataclasses

from ophsd_jax.data.parsing import strip_boxed_instruction, strip_thinking
from ophsd_jax.harnesses import plan_solve_prompts as prompts
from ophsd_jax.harnesses.base import (HarnessResult, SamplingConfig, TeacherMaterial, call_model, config_from,
                                     final_mask, prompt_ids_at, skipped_result, trace_entry)


@dataclasses.dataclass
class PlanSolveConfig(SamplingConfig):
    use_gt: bool = True
    plan_max_tokens: int = 1024
    solve_max_tokens: int = 4096


class PlanSolveHarness:
    name = "plan_solve"

    def __init__(self, task, config=None):
        self.task = task
        self.config = config_from(PlanSolveConfig, config)

    def _references(self, example: dict) -> tuple[str, str]:
        """(answer, solution) to show, or ("", "") when use_gt is off."""
        if not self.config.use_gt:
            return "", ""
        return self.task.reference_answer(example), self.task.reference_solution(example)

    def run(self, examples: list[dict], generate_chat, final: list[bool] | None = None) -> list[HarnessResult]:
        cfg = self.config
        final = final_mask(final, len(examples))
        problems = [strip_boxed_instruction(self.task.problem_text(e)) for e in examples]
        refs = [self._references(e) for e in examples]

        plan_msgs = [prompts.plan_messages(p, solution) for p, (_, solution) in zip(problems, refs)]
        plans = call_model(generate_chat, self.name, "plan", plan_msgs, cfg, cfg.plan_max_tokens).texts
        todo = [i for i, p in enumerate(plans) if p is not None]  # None: the plan prompt did not fit
        clean_plans = {i: strip_thinking(plans[i]) for i in todo}

        solve_msgs = {
            i: prompts.solve_messages(problems[i], clean_plans[i], refs[i][0]) if clean_plans[i]
            else prompts.solve_only_messages(problems[i], refs[i][0])
            for i in todo
        }
        solved = [i for i in todo if final[i]]  # the others: solve messages only, never sampled
        solve = call_model(generate_chat, self.name, "solve", [solve_msgs[i] for i in solved], cfg,
                           cfg.solve_max_tokens)
        solves = {i: None for i in todo} | dict(zip(solved, solve.texts))
        solve_ids = {i: prompt_ids_at(solve, j) for j, i in enumerate(solved)}

        results = []
        for i in range(len(examples)):
            trace = [trace_entry("plan", plan_msgs[i], plans[i])]
            if i not in solves:
                results.append(skipped_result("plan", plan_msgs[i], trace))
                continue
            trace.append(trace_entry("solve", solve_msgs[i], solves[i]))
            if final[i] and solves[i] is None:
                results.append(skipped_result("solve", solve_msgs[i], trace))
                continue
            results.append(HarnessResult(
                teacher_messages=solve_msgs[i],
                final_response=solves[i],
                mode="plan_solve" if clean_plans[i] else "solve_only",
                trace=trace,
                info={"plan": clean_plans[i]},
                teacher_prompt_ids=solve_ids.get(i),
                # The plan is the inserted material (the answer hint is a few tokens).
                teacher_material=TeacherMaterial(
                    [clean_plans[i]], lambda t, p=problems[i], a=refs[i][0]: prompts.solve_messages(p, t[0], a),
                ) if clean_plans[i] else None,
            ))
        return results

    def observe(self, examples: list[dict]) -> None:
        """Stateless: nothing to learn from labelled examples."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
