"""Build a harness from its string name (as written in an ml_collections config)."""

from __future__ import annotations

from ophsd_jax.harnesses.draft_verify import DraftVerifyHarness
from ophsd_jax.harnesses.opsd import OPSDHarness
from ophsd_jax.harnesses.plan_solve import PlanSolveHarness

HARNESSES = {
    PlanSolveHarness.name: PlanSolveHarness,
    DraftVerifyHarness.name: DraftVerifyHarness,
    OPSDHarness.name: OPSDHarness,
}


def make_harness(name: str | None, task, config=None, *, train_examples=None, bank=None):
    """`name` in {plan_solve, draft_verify, opsd}; None picks the task's default.

    `config` is a dict / ConfigDict / config dataclass of the harness's options
    (unknown keys are an error). Draft–Verify also takes `train_examples`
    (to fit the default TF-IDF embedder, or to seed the bank) or a ready `bank`.
    """
    name = name or task.default_harness
    if name not in HARNESSES:
        raise ValueError(f"unknown harness {name!r}; choose from {sorted(HARNESSES)}")
    if name == DraftVerifyHarness.name:
        return DraftVerifyHarness(task, config, bank=bank, train_examples=train_examples)
    return HARNESSES[name](task, config)
