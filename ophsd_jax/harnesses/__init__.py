"""Harnesses: multi-call workflows that build the teacher context z(x).

`make_harness(name, task, config)` builds one; every harness has
`run(examples, generate_chat) -> list[HarnessResult]`, `observe(examples)`
and `state_dict()` / `load_state_dict()`. See docs/harnesses.md.
"""

from ophsd_jax.harnesses.base import HarnessError, HarnessResult
from ophsd_jax.harnesses.draft_verify import DraftVerifyConfig, DraftVerifyHarness
from ophsd_jax.harnesses.embedders import embedder_from_state, make_embedder
from ophsd_jax.harnesses.factory import make_harness
from ophsd_jax.harnesses.memory_bank import Hit, MemoryBank
from ophsd_jax.harnesses.opsd import OPSDConfig, OPSDHarness
from ophsd_jax.harnesses.plan_solve import PlanSolveConfig, PlanSolveHarness

__all__ = [
    "DraftVerifyConfig",
    "DraftVerifyHarness",
    "HarnessError",
    "HarnessResult",
    "Hit",
    "MemoryBank",
    "OPSDConfig",
    "OPSDHarness",
    "PlanSolveConfig",
    "PlanSolveHarness",
    "embedder_from_state",
    "make_embedder",
    "make_harness",
]
