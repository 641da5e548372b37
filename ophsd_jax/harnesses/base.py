"""The harness protocol and the one helper every harness uses to call the model.

A harness is an object with

    run(examples, generate_chat) -> list[HarnessResult]
    observe(examples) -> None        # after a training step (memory banks)
    state_dict() / load_state_dict() # for checkpoints (empty when stateless)

`generate_chat(list_of_message_lists, *, temperature, top_p, top_k,
max_new_tokens) -> list[str | None]` is the sampler's batched chat call. Harnesses
never touch the model otherwise, which is why a scripted fake model can test
them. Every phase is one `generate_chat` call for the whole batch. A reply is
None where the prompt is longer than the sampler's largest prompt bucket
(nothing was generated): that example leaves the later phases and its result
is `skipped_result(phase, ...)` (mode `skipped_<phase>`, no teacher context).

Multi-process rule: each process runs the harness on its own share of the
batch, and every `generate_chat` call is collective. So the number and order
of calls must not depend on the examples: always make a phase's call, even
with an empty list (`call_model` does).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

GenerateChat = Callable[..., list]


class HarnessError(RuntimeError):
    pass


SKIPPED = "skipped_"  # mode prefix of skipped results; the phase follows


@dataclasses.dataclass
class HarnessResult:
    """One example's harness output.

    teacher_messages: the teacher context z(x) (messages of the last call).
    final_response:   the harness's answer (last call's response).
    mode:             which path ran (e.g. plan_solve / solve_only / cold_start / draft_only / full).
    trace:            every call for this example: {"name", "messages", "response"}.
    info:             extras for logging (parsed draft labels, retrieved ids, ...).
    """

    teacher_messages: list[dict]
    final_response: str
    mode: str
    trace: list[dict]
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        """A call's prompt did not fit the sampler: no teacher context, no answer."""
        return self.mode.startswith(SKIPPED)


def skipped_result(phase: str, messages: list[dict], trace: list[dict]) -> HarnessResult:
    """The result of an example whose `phase` call got None (its prompt did not fit)."""
    return HarnessResult(messages, "", SKIPPED + phase, trace, {"skipped_phase": phase})


class Harness(Protocol):
    name: str

    def run(self, examples: list[dict], generate_chat: GenerateChat) -> list[HarnessResult]: ...

    def observe(self, examples: list[dict]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclasses.dataclass
class SamplingConfig:
    """Sampling for harness calls; harness configs inherit these fields."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20


def call_model(
    generate_chat: GenerateChat,
    harness: str,
    phase: str,
    message_lists: list[list[dict]],
    sampling: SamplingConfig,
    max_new_tokens: int,
) -> list[str]:
    """One batched call for a phase; checks the reply has one string (or None: the prompt
    did not fit the sampler) per conversation.

    Called even with no conversations: in a multi-process run `generate_chat` is a
    collective call that every process must make, also one whose share is empty.
    """
    responses = generate_chat(
        message_lists,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_new_tokens=max_new_tokens,
    )
    responses = list(responses)
    if len(responses) != len(message_lists):
        raise HarnessError(
            f"{harness}/{phase}: generate_chat returned {len(responses)} responses for {len(message_lists)} prompts"
        )
    for i, r in enumerate(responses):
        if r is not None and not isinstance(r, str):
            raise HarnessError(f"{harness}/{phase}: response {i} is {type(r).__name__}, expected str or None")
    return responses


def trace_entry(name: str, messages: list[dict], response: str) -> dict:
    return {"name": name, "messages": messages, "response": response}


def config_from(cls, config=None, **overrides):
    """Build dataclass `cls` from a dict / ml_collections ConfigDict / instance.

    Unknown keys are an error naming the key, so a typo in a config file
    cannot silently fall back to a default.
    """
    if config is None:
        values = {}
    elif isinstance(config, cls):
        values = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):
        values = config.to_dict()
    else:
        values = dict(config)
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(known)}")
    return cls(**values)
